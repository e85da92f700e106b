"""The published-zoo formats `dlstore import` reads, by name, and `import_zoo`, the one call
behind the command: read a source with its format's reader, commit it with `commit_runs`.

    from dlstore.importers import import_zoo
    report = import_zoo(store, "unterthiner", "small-cnn-zoo/mnist", zoo="sczoo-mnist")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dlstore.importers import csv, hf, raytune, unterthiner
from dlstore.importers.base import ImportReport, ImportSourceError, commit_runs

if TYPE_CHECKING:
    from dlstore.store.store import Store

# name -> reader: (path, options) -> (number of runs, iterator of SourceRun)
FORMATS = {"raytune": raytune.read_source, "unterthiner": unterthiner.read_source,
           "hf": hf.read_source, "csv": csv.read_source}


def check_source(format: str, path: str | Path, mapping: dict[str, str] | None = None) -> None:
    """Refuse an unknown format or an unreadable source before a store is opened or made."""
    reader = _reader(format)
    if mapping and format != "csv":
        raise ImportSourceError(f"import {format}: --map applies to the csv format only")
    reader(Path(path), {"map": mapping})


def import_zoo(store: Store, format: str, path: str | Path, zoo: str,
               mapping: dict[str, str] | None = None,
               progress: Callable[[int, int | None], None] | None = None,
               batch_bytes: int | None = None) -> ImportReport:
    """Import the published zoo at `path` (in `format`: raytune, unterthiner, hf, csv) into
    `store` as zoo `zoo`. Resumable and idempotent; runs whose files are bad are left out with
    one line each in the report's `errors`. `mapping` (csv only): runs column -> CSV column."""
    reader = _reader(format)
    if mapping and format != "csv":
        raise ImportSourceError(f"import {format}: --map applies to the csv format only")
    source = Path(path)
    total, runs = reader(source, {"map": mapping})
    extra = {} if batch_bytes is None else {"batch_bytes": batch_bytes}
    return commit_runs(store, zoo, format, str(source.resolve()), runs, total, progress,
                       **extra)


def _reader(format: str):
    if format not in FORMATS:
        raise ImportSourceError(f"import: unknown format {format!r}; use one of "
                                f"{', '.join(FORMATS)}")
    return FORMATS[format]
