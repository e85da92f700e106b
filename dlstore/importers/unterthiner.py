"""`dlstore import unterthiner DIR`: the Small CNN Zoo (Unterthiner et al. 2020, "Predicting
Neural Network Accuracy from Weights"), and what `dlstore wsl export --format unterthiner`
writes.

DIR holds

- `weights.npy` [n, d]: one row per checkpoint (read memory-mapped: it may exceed memory);
- `metrics.csv` or `metrics.csv.gz`: one row per checkpoint, in the same order: the run
  (`modeldir`, or `run_id` in dlstore's export), `step`, its hyperparameters (`config.*`
  columns; dlstore's export: the runs columns) and its metrics (`train_accuracy`,
  `test_accuracy`, `train_loss`, `test_loss`, ...);
- `layout.csv`: `varname, start_idx, end_idx, shape` (a `size` column may sit beside them):
  which columns of a row are which tensor.

The published files name TensorFlow variables (`sequential/conv2d/kernel:0`, shape
(3, 3, c_in, c_out): HWIO; dense kernels (in, out)); these are transposed to PyTorch's order
(OIHW, (out, in)) and renamed to the registered `cnn2d` network's state dict (`convs.<i>`,
`out`), whose default is the paper's 4,970-parameter CNN. A layout that already names PyTorch
tensors (dlstore's export) is taken as it is, so an export imports back bit for bit.

`*_accuracy` metrics are stored as `*_acc` (dlstore's names; the export writes them back under
the names it reads), `generalization_gap` is left out (it is train_acc - test_acc, which the
export derives again). A run per model directory, one checkpoint per row, its step from `step`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

from dlstore.importers.base import ImportSourceError, SourceCheckpoint, SourceRun, as_float
from dlstore.schemas import HYPERPARAMETER_COLUMNS

_CONFIG_TYPED = {"config.learning_rate": "lr", "config.l2reg": "weight_decay",
                 "config.optimizer": "optimizer", "config.dataset": "dataset",
                 "config.activation": "activation", "config.train_fraction": "train_fraction",
                 "config.dropout": "dropout"}
# image shape by dataset name (the zoo's four datasets)
_DATASETS = {"mnist": [1, 28, 28], "fashion_mnist": [1, 28, 28], "cifar10": [3, 32, 32],
             "svhn_cropped": [3, 32, 32]}
_NOT_METRICS = {"step", "epoch", "modeldir", "run_id", "generalization_gap", "split",
                "input_shape", "config", *HYPERPARAMETER_COLUMNS}


def read_source(root: Path, options: dict) -> tuple[int, Iterator[SourceRun]]:
    if not root.is_dir():
        raise ImportSourceError(f"import unterthiner: {root} is not a directory")
    weights_path = root / "weights.npy"
    if not weights_path.is_file():
        raise ImportSourceError(f"import unterthiner: {weights_path} is missing")
    try:
        weights = np.load(weights_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ImportSourceError(f"import unterthiner: {weights_path} is not a .npy array ({e})"
                                ) from None
    if weights.ndim != 2:
        raise ImportSourceError(f"import unterthiner: {weights_path} has shape "
                                f"{list(weights.shape)}; expected [checkpoints, parameters]")
    layout, tf_order = read_layout(root / "layout.csv", weights.shape[1])
    metrics_path, frame = _read_metrics(root)
    if frame.height != weights.shape[0]:
        raise ImportSourceError(f"import unterthiner: {metrics_path} has {frame.height} rows "
                                f"and {weights_path} {weights.shape[0]}; they must match one "
                                "to one")
    key_column = next((c for c in ("modeldir", "run_id") if c in frame.columns), None)
    if key_column is None or "step" not in frame.columns:
        raise ImportSourceError(f"import unterthiner: {metrics_path}: expected the columns "
                                "modeldir (or run_id) and step")
    groups = (frame.with_row_index("_row").group_by(key_column, maintain_order=True)
              .agg(pl.col("_row")))
    return groups.height, (_run(str(key), index, frame, weights, layout, tf_order, metrics_path)
                           for key, index in groups.iter_rows())


def read_layout(path: Path, width: int) -> tuple[list[tuple[str, str, tuple, tuple, int, int]],
                                                 bool]:
    """(dlstore name, source name, source shape, PyTorch shape, start, end) per tensor, and
    whether the source is in TensorFlow's order."""
    import csv

    if not path.is_file():
        raise ImportSourceError(f"import unterthiner: {path} is missing")
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise ImportSourceError(f"import unterthiner: {path} cannot be read ({e})") from None
    if not rows or not {"varname", "start_idx", "end_idx", "shape"} <= set(rows[0]):
        raise ImportSourceError(f"import unterthiner: {path}: expected the columns varname, "
                                "start_idx, end_idx, shape")
    entries = []
    tf_order = any(":" in r["varname"] or "/" in r["varname"] for r in rows)
    convs = 0
    for line, r in enumerate(rows, start=2):
        try:
            shape = tuple(int(n) for n in _shape(r["shape"]))
            start, end = int(r["start_idx"]), int(r["end_idx"])
        except (ValueError, SyntaxError, TypeError):
            raise ImportSourceError(f"import unterthiner: {path} line {line}: start_idx, "
                                    "end_idx and shape must be integers") from None
        if end - start != int(np.prod(shape)) or start < 0 or end > width:
            raise ImportSourceError(
                f"import unterthiner: {path} line {line}: {r['varname']} has shape "
                f"{list(shape)} but columns {start}:{end}, and weights.npy has {width} columns;"
                " layout and weights do not match")
        name, torch_shape = r["varname"], shape
        if tf_order:
            kind = "kernel" if "kernel" in name else "bias" if "bias" in name else None
            if kind is None or len(shape) not in (1, 2, 4):
                raise ImportSourceError(f"import unterthiner: {path} line {line}: cannot map "
                                        f"{name} {list(shape)} to a conv or dense layer")
            if len(shape) == 4:
                torch_shape = (shape[3], shape[2], shape[0], shape[1])
            elif len(shape) == 2:
                torch_shape = (shape[1], shape[0])
            dense = "dense" in name or (kind == "kernel" and len(shape) == 2)
            if kind == "kernel" and not dense:
                convs += 1
            layer = "out" if dense else f"convs.{convs - 1 if kind == 'bias' else convs - 1}"
            name = f"{layer}.{'weight' if kind == 'kernel' else 'bias'}"
        entries.append((name, r["varname"], shape, torch_shape, start, end))
    covered = max(e[5] for e in entries)
    if covered != width:
        raise ImportSourceError(f"import unterthiner: {path} covers {covered} columns and "
                                f"weights.npy has {width}; layout and weights do not match")
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ImportSourceError(f"import unterthiner: {path}: two tensors map to one name "
                                f"({names})")
    return entries, tf_order


def _shape(text: str) -> tuple:
    value = ast.literal_eval(text.strip())
    if isinstance(value, int):
        return (value,)
    return tuple(value)


def _read_metrics(root: Path):
    """The metrics file as a frame of text columns (columnar: tens of bytes a checkpoint, the
    weights stay on disk); values are parsed run by run."""
    for name in ("metrics.csv", "metrics.csv.gz"):
        path = root / name
        if path.is_file():
            break
    else:
        raise ImportSourceError(f"import unterthiner: {root} has no metrics.csv or "
                                "metrics.csv.gz")
    try:
        frame = pl.read_csv(path, infer_schema_length=0)  # every column as text
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as e:
        raise ImportSourceError(f"import unterthiner: {path} cannot be read as CSV "
                                f"({' '.join(str(e).split())[:160]})") from None
    return path, frame


def _run(key: str, index: list[int], frame, weights: np.ndarray, layout: list, tf_order: bool,
         metrics_path: Path) -> SourceRun:
    contiguous = index[-1] - index[0] + 1 == len(index)  # as published: a model's rows together
    rows = (frame.slice(index[0], len(index)) if contiguous else frame[index]).to_dicts()
    run = SourceRun(key=key, config={"source": key, **_config(rows[0], layout, tf_order)})
    for i, row in zip(index, rows):
        try:
            step = int(float(row["step"]))
        except (TypeError, ValueError):
            run.error = (f"import unterthiner: {metrics_path} row {i + 2}: step "
                         f"{row['step']!r} is not an integer")
            return run
        epoch = as_float(row.get("epoch"))
        run.checkpoints.append(SourceCheckpoint(
            step, epoch, lambda i=i: _state(weights, i, layout, tf_order)))
        values = {}
        for name, text in row.items():
            if not name or name in _NOT_METRICS or name.startswith("config."):
                continue
            value = as_float(text)
            if value is not None:
                values[re.sub(r"_accuracy$", "_acc", name)] = value
        run.metrics.append((step, values))
    return run


def _state(weights: np.ndarray, i: int, layout: list, tf_order: bool) -> dict:
    import torch

    row = np.asarray(weights[i], dtype=weights.dtype)
    state = {}
    for name, _, shape, _, start, end in layout:
        tensor = torch.from_numpy(np.array(row[start:end])).reshape(shape)
        if tf_order and tensor.dim() == 4:
            tensor = tensor.permute(3, 2, 0, 1)
        elif tf_order and tensor.dim() == 2:
            tensor = tensor.t()
        state[name] = tensor.contiguous()
    return state


def _config(row: dict, layout: list, tf_order: bool) -> dict:
    config: dict = {}
    for name, text in row.items():
        if name and name.startswith("config."):
            value = as_float(text)
            config[name.removeprefix("config.")] = (text if value is None else
                                                    int(value) if value.is_integer()
                                                    and "." not in text else value)
            if name in _CONFIG_TYPED:
                config[_CONFIG_TYPED[name]] = config[name.removeprefix("config.")]
        elif name in HYPERPARAMETER_COLUMNS and name not in ("run_id", "status", "zoo"):
            value = as_float(text)
            if text not in (None, ""):
                config[name] = (text if value is None else int(value)
                                if value.is_integer() and name not in _FLOAT_COLUMNS else value)
        elif name == "input_shape" and text:
            config["input_shape"] = json.loads(text)
    if isinstance(config.get("optimizer"), str):
        config["optimizer"] = config["optimizer"].lower()
    model = _cnn2d(layout, config)
    if model is not None:
        config["model"] = model
        shapes = {e[0]: e[3] for e in layout}
        config.setdefault("n_classes", shapes["out.weight"][0])
        channels = shapes["convs.0.weight"][1]
        dataset = str(config.get("dataset", ""))
        config.setdefault("input_shape", _DATASETS.get(
            dataset, [channels, 28, 28] if channels == 1 else [channels, 32, 32]))
    return config


_FLOAT_COLUMNS = {"lr", "momentum", "weight_decay", "label_noise", "density"}


def _cnn2d(layout: list, config: dict) -> dict | None:
    """The registered cnn2d network the layout is, if it is one."""
    shapes = {e[0]: e[3] for e in layout}
    depth = sum(1 for n in shapes if re.fullmatch(r"convs\.\d+\.weight", n))
    expected = [f"convs.{i}.{p}" for i in range(depth) for p in ("weight", "bias")]
    if depth == 0 or [e[0] for e in layout] != expected + ["out.weight", "out.bias"]:
        return None
    width = shapes["convs.0.weight"][0]
    if any(shapes[f"convs.{i}.weight"][0] != width for i in range(depth)):
        return None
    activation = str(config.get("activation", "relu")).lower()
    model = {"arch": "cnn2d", "width": width, "depth": depth}
    if activation in ("relu", "tanh", "gelu"):
        model["activation"] = activation
    else:
        return None  # no registered network has it: weights and metrics only
    config.setdefault("width", width)
    config.setdefault("depth", depth)
    return model
