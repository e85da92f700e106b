"""Export a weights pull to the file layouts weight-space models already read.

- `unterthiner`: the Small CNN Zoo layout (Unterthiner et al. 2020): `weights.npy` [n, d], one
  row per checkpoint; `metrics.csv`, one row per checkpoint in the same order (run
  hyperparameters, metrics at that step); `layout.csv` (varname, start_idx, end_idx, shape)
  mapping columns of weights.npy to tensors.
- `nfn`: per-layer lists as the NFN library's `WeightSpaceFeatures` holds them (Zhou et al.
  2023): `weight_{i}.npy` [n, 1, out, in, ...] and `bias_{i}.npy` [n, 1, out] (a channel axis
  of 1 after the batch axis).
- `dwsnets`: per-layer lists as DWSNets reads MLP weights (Navon et al. 2023): `weight_{i}.npy`
  [n, in, out, 1] (transposed) and `bias_{i}.npy` [n, out, 1].

Every format also writes `metrics.csv`, `layout.csv`, `splits.csv` (row, run_id, step, split),
`splits.json` ({split: row indices}) and `export.json` (what was exported, from which query).
Splits are by run, as `WeightDataset` makes them. Weights are streamed through memory-mapped
arrays, so an export larger than memory works. Files go to a new directory next to the output
and are renamed into place at the end: an interrupted export leaves no half-written output. The
store itself is never written to.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from dlstore.analysis.wsl import (
    DEFAULT_SPLITS,
    WeightSpaceError,
    canonical_flat,
    runs_architecture,
    split_runs,
    weight_bias_pairs,
)
from dlstore.errors import LayoutError, QueryError
from dlstore.layout import Layout
from dlstore.schemas import HYPERPARAMETER_COLUMNS

if TYPE_CHECKING:
    from dlstore.store.store import Store

FORMATS = ("unterthiner", "nfn", "dwsnets")


@dataclass
class ExportReport:
    out: Path
    format: str
    rows: int
    runs: int
    layout: Layout
    files: list[str]
    split_sizes: dict[str, int]


def export(store: Store, query: str, format: str, out: str | Path, seed: int = 0,
           splits: Mapping[str, float] | None = None, canonical: bool = False,
           pad: bool = False, batch_size: int = 4096, params: list | None = None
           ) -> ExportReport:
    """Write the checkpoints a query returns (run_id, step columns) to directory `out` (new or
    empty) in `format`. `canonical` writes permutation-canonical weights; `pad` zero-pads runs
    of several widths into one layout (`Layout.union`)."""
    if format not in FORMATS:
        raise WeightSpaceError(f"unknown export format {format!r}; use one of {FORMATS}")
    out = Path(out)
    _check_output(out, Path(store.root))
    frame = store.sql(query, params)
    if "run_id" not in frame.columns or "step" not in frame.columns:
        raise QueryError(f"an export query must return run_id and step columns; it returned "
                         f"{frame.columns}")
    if frame.height == 0:
        raise QueryError("the query returned no checkpoints")
    keys = frame.select("run_id", "step")
    layouts, _ = store.weight_layouts(keys)
    if len(layouts) > 1 and not pad:
        raise LayoutError(f"the query mixes {len(layouts)} weight layouts ({layouts[0].describe()}"
                          f" vs {layouts[1].describe()}); pad them into one (--pad) or select "
                          "runs of one shape")
    layout = Layout.union(layouts)
    layers = _layers(layout, format)  # refuse a layout the format cannot hold before writing
    fractions = dict(DEFAULT_SPLITS if splits is None else splits)
    split_of_run = split_runs(sorted(set(keys["run_id"].to_list())), fractions, seed)
    split = keys.with_row_index("row").with_columns(
        pl.Series("split", [split_of_run[r] for r in keys["run_id"]]))

    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir(parents=True)
        files = _write_weights(store, keys, layout, layers, format, tmp, canonical, batch_size)
        _metrics_frame(store, frame).write_csv(tmp / "metrics.csv")
        pl.DataFrame(layout.rows()).write_csv(tmp / "layout.csv")
        split.write_csv(tmp / "splits.csv")
        (tmp / "splits.json").write_text(json.dumps(
            {name: split.filter(pl.col("split") == name)["row"].to_list() for name in fractions}))
        (tmp / "export.json").write_text(json.dumps({
            "format": format, "query": query, "rows": frame.height,
            "runs": len(split_of_run), "canonical": canonical, "padded": len(layouts) > 1,
            "layout": json.loads(layout.to_json()), "splits": fractions, "seed": seed,
            "store": str(store.root), "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "dlstore_version": _version()}, indent=1))
        files += ["metrics.csv", "layout.csv", "splits.csv", "splits.json", "export.json"]
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except OSError as e:
        raise WeightSpaceError(f"cannot write the export to {out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    sizes = {name: int((split["split"] == name).sum()) for name in fractions}
    return ExportReport(out, format, frame.height, len(split_of_run), layout, files, sizes)


def _check_output(out: Path, store_root: Path) -> None:
    target = out.resolve()
    root = store_root.resolve()
    if target == root or root in target.parents:
        raise WeightSpaceError(f"{out} is inside the store {store_root}; exports never write "
                               "into a store, choose a directory outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeightSpaceError(f"{out} already exists and is not an empty directory; choose a "
                               "new output directory")


def _layers(layout: Layout, format: str) -> list[tuple[str, str]]:
    if format == "unterthiner":
        return []
    layers = weight_bias_pairs(layout)
    if format == "dwsnets":
        deep = [w for w, _ in layers if len(layout[w].shape) != 2]
        if deep:
            raise WeightSpaceError(f"the dwsnets format holds MLP weights (2-D matrices); "
                                   f"{deep[0]} has shape {list(layout[deep[0]].shape)}")
    return layers


def _write_weights(store: Store, keys: pl.DataFrame, layout: Layout,
                   layers: list[tuple[str, str]], format: str, directory: Path, canonical: bool,
                   batch_size: int) -> list[str]:
    n = keys.height
    arrays: dict[str, np.memmap] = {}
    if format == "unterthiner":
        arrays["weights.npy"] = _array(directory / "weights.npy", (n, layout.size))
    for i, (weight, bias) in enumerate(layers):
        w, b = layout[weight].shape, layout[bias].shape
        if format == "nfn":
            arrays[f"weight_{i}.npy"] = _array(directory / f"weight_{i}.npy", (n, 1, *w))
            arrays[f"bias_{i}.npy"] = _array(directory / f"bias_{i}.npy", (n, 1, *b))
        else:
            arrays[f"weight_{i}.npy"] = _array(directory / f"weight_{i}.npy", (n, w[1], w[0], 1))
            arrays[f"bias_{i}.npy"] = _array(directory / f"bias_{i}.npy", (n, *b, 1))
    start = 0
    arch = runs_architecture(store, keys["run_id"].to_list()) if canonical else None
    for _, flat in store.iter_weights(keys, batch_size=batch_size, layout=layout):
        if canonical:
            flat = canonical_flat(flat, layout, arch)
        stop = start + flat.shape[0]
        if format == "unterthiner":
            arrays["weights.npy"][start:stop] = flat.numpy()
        tensors = layout.unflatten(flat)
        for i, (weight, bias) in enumerate(layers):
            w, b = tensors[weight], tensors[bias]
            if format == "nfn":
                w, b = w.unsqueeze(1), b.unsqueeze(1)
            else:
                w, b = w.transpose(1, 2).unsqueeze(-1), b.unsqueeze(-1)
            arrays[f"weight_{i}.npy"][start:stop] = w.numpy()
            arrays[f"bias_{i}.npy"][start:stop] = b.numpy()
        start = stop
    for array in arrays.values():
        array.flush()
    return list(arrays)


def _array(path: Path, shape: tuple[int, ...]) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def _metrics_frame(store: Store, frame: pl.DataFrame) -> pl.DataFrame:
    """One row per exported checkpoint, in order: the query's columns, the run's
    hyperparameters, the checkpoint's epoch and every whole-model metric at its step (and the
    generalization gap, train_acc - test_acc, as the Small CNN Zoo has it)."""
    run_ids = frame["run_id"].unique().to_list()
    hyper = [c for c in HYPERPARAMETER_COLUMNS if c == "run_id" or c not in frame.columns]
    runs = store.sql(f"SELECT {', '.join(hyper)} FROM runs "
                     "WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [run_ids])
    ckpt = store.sql("SELECT run_id, step, epoch FROM checkpoints "
                     "WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [run_ids])
    wide = store.sql("SELECT * FROM metrics_wide WHERE run_id IN (SELECT unnest(?::VARCHAR[]))",
                     [run_ids])
    taken = set(frame.columns) | set(hyper)
    ckpt = ckpt.select("run_id", "step", *[c for c in ("epoch",) if c not in taken])
    taken |= set(ckpt.columns)
    wide = wide.select("run_id", "step", *[c for c in wide.columns if c not in taken])
    out = (frame.with_row_index("_row").join(runs, on="run_id", how="left")
           .join(ckpt, on=["run_id", "step"], how="left")
           .join(wide, on=["run_id", "step"], how="left").sort("_row").drop("_row"))
    if {"train_acc", "test_acc"} <= set(out.columns) and "generalization_gap" not in out.columns:
        out = out.with_columns((pl.col("train_acc") - pl.col("test_acc"))
                               .alias("generalization_gap"))
    # CSV holds flat values only: nested columns (lists such as input_shape) as JSON text
    nested = [c for c, t in out.schema.items() if t.is_nested()]
    return out.with_columns(pl.col(c).map_elements(lambda v: json.dumps(v.to_list()),
                                                   return_dtype=pl.String) for c in nested)


def _version() -> str:
    from dlstore import __version__

    return __version__

