"""How the command line prints data: tables that fit the terminal, complete CSV and JSON.

A table wider than the terminal keeps its key columns whole (the first column, `run_id`, `zoo`:
what a user copies into the next command), keeps as many leading and trailing columns as fit,
replaces the middle with a `…` column and says how many columns it hid, as DuckDB's and
polars' own renderers do. When stdout is not a terminal, rows are printed whole, never wrapped.
CSV and JSON always hold every column; lists and structs are JSON text in CSV.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys

import polars as pl
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

KEY_COLUMNS = ("run_id", "zoo")
MAX_CELL = 40  # a non-key column is shown at most this wide (cut with …) in a terminal
HIDDEN = "…"


def to_json_value(value):
    """A Python value JSON can hold: timestamps as ISO text, NaN/inf as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def json_text(data) -> str:
    return json.dumps(to_json_value(data))


def csv_text(frame: pl.DataFrame) -> str:
    """Every column; nested columns (lists, structs, arrays) as JSON text."""
    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
    if nested:
        frame = frame.with_columns(
            pl.Series(name, [None if v is None else json_text(v) for v in frame[name].to_list()],
                      dtype=pl.String) for name in nested)
    return frame.write_csv()


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json_text(value)
    return "" if value is None else str(value)


def print_frame(frame: pl.DataFrame, format: str, console: Console | None = None,
                rows_note: bool = True) -> None:
    """Print a frame as a table (fitted to the terminal), CSV or JSON (a list of rows)."""
    format = getattr(format, "value", format)
    if format == "csv":
        sys.stdout.write(csv_text(frame))
        return
    if format == "json":
        sys.stdout.write(json_text(frame.to_dicts()) + "\n")
        return
    console = console or Console()
    cells = [[cell(v) for v in row] for row in frame.iter_rows()]
    columns = list(frame.columns)
    hidden = 0
    if console.is_terminal:
        keep = fit_columns(columns, cells, console.width)
        hidden = len(columns) - len([k for k in keep if k is not None])
    else:
        keep = list(range(len(columns)))
    table = Table(header_style="bold", highlight=False)
    for k in keep:
        if k is None:
            table.add_column(HIDDEN, no_wrap=True)
            continue
        key = _is_key(columns, k)
        table.add_column(columns[k], no_wrap=True, overflow="ellipsis",
                         max_width=None if key or not console.is_terminal else MAX_CELL)
    for row in cells:
        table.add_row(*(HIDDEN if k is None else row[k] for k in keep))
    if console.is_terminal:
        console.print(table, markup=False)
    else:  # a file or a pipe: every row whole, whatever the width
        wide = Console(file=console.file, width=10**6, color_system=None, highlight=False)
        wide.print(table, markup=False, crop=False)
    note = f"{frame.height} row{'' if frame.height == 1 else 's'}" if rows_note else ""
    if hidden:
        note += (("; " if note else "") + f"{hidden} of {len(columns)} columns hidden; use "
                 "--format csv or --format json for all")
    if note:
        console.print(note, style="dim", markup=False, highlight=False)


def _is_key(columns: list[str], k: int) -> bool:
    return k == 0 or columns[k] in KEY_COLUMNS


def fit_columns(columns: list[str], cells: list[list[str]], width: int) -> list[int | None]:
    """Indices of the columns to show within `width` characters, in order, with None where the
    hidden middle goes: key columns always, then leading and trailing columns alternately."""
    def natural(k: int) -> int:
        size = max([cell_len(columns[k])] + [cell_len(row[k]) for row in cells])
        return (size if _is_key(columns, k) else min(size, MAX_CELL)) + 3  # padding, border

    n = len(columns)
    total = 1 + sum(natural(k) for k in range(n))
    if total <= width:
        return list(range(n))
    chosen = {k for k in range(n) if _is_key(columns, k)}
    budget = width - 1 - (cell_len(HIDDEN) + 3) - sum(natural(k) for k in chosen)
    left, right = 0, n - 1
    take_left = True
    while left <= right:
        k = left if take_left else right
        if k not in chosen:
            if natural(k) > budget:
                break
            budget -= natural(k)
            chosen.add(k)
        if take_left:
            left += 1
        else:
            right -= 1
        take_left = not take_left
    out: list[int | None] = []
    for k in range(n):
        if k in chosen:
            out.append(k)
        elif not out or out[-1] is not None:
            out.append(None)
    return out
