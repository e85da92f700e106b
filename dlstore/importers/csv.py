"""`dlstore import csv FILE`: metrics-only summaries, one row per (model, epoch), such as the
Phase-Transition Model Zoo's `summary_metrics/*.csv` (`model, trial_id, width, seed, lr, wd,
batchsize, init_type, epoch, train_loss, ..., log_hessian_trace_train`).

A run per distinct `model` value (its id from that value), with metrics and no checkpoints;
the step is `epoch` (or `step`). Hyperparameter columns map onto the typed runs columns by
name (`width`, `seed`, `lr`, `batch_size`, ...; `wd` -> weight_decay, `batchsize` ->
batch_size), or as `--map COLUMN=CSV_COLUMN` says (`--map width=model_width`: the CSV's
`model_width` is the run's width; a COLUMN that is no runs column is a config key); every
text column and every mapped one goes into the config JSON; every other numeric column is a
metric. An empty cell is a missing value (no row), never a zero.

FILE may also be a directory of such CSVs (each file's models are its own runs, their ids
from the file's name and the model). The file is read in passes of a bounded number of models
(polars' lazy CSV reader), so a summary larger than memory imports too, whatever the order of
its rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dlstore.importers.base import ImportSourceError, SourceRun
from dlstore.schemas import HYPERPARAMETER_COLUMNS

ALIASES = {"wd": "weight_decay", "batchsize": "batch_size", "optim_lr": "lr",
           "optim_wd": "weight_decay", "training_batchsize": "batch_size"}
KEY_COLUMNS = ("model",)
STEP_COLUMNS = ("epoch", "step")
IDENTITY = {"trial_id"}  # per-run columns that are no metric although numeric-looking
MODELS_PER_PASS = 5000
# the runs columns a hyperparameter column fills by its name
TYPED = frozenset(HYPERPARAMETER_COLUMNS) - {"run_id", "zoo", "status"}


def csv_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(root.glob("*.csv"))
        if files:
            return files
        raise ImportSourceError(f"import csv: {root} holds no *.csv file")
    raise ImportSourceError(f"import csv: {root} does not exist")


def read_source(root: Path, options: dict) -> tuple[int, Iterator[SourceRun]]:
    mapping = dict(options.get("map") or {})
    files = csv_files(root)
    plans = [_plan(f, mapping) for f in files]  # every header checked before anything is read
    total = sum(len(p[1]) for p in plans)
    return total, (run for f, (scan, models, columns) in zip(files, plans)
                   for run in _runs(f, scan, models, columns, len(files) > 1))


def _scan(path: Path):
    import polars as pl

    return pl.scan_csv(path, infer_schema_length=10_000, null_values=[""],
                       schema_overrides={"model": pl.String, "trial_id": pl.String})


def _plan(path: Path, mapping: dict[str, str]):
    import polars as pl

    scan = _scan(path)
    try:
        schema = scan.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as e:
        raise ImportSourceError(f"import csv: {path} cannot be read as CSV "
                                f"({' '.join(str(e).split())[:160]})") from None
    names = list(schema.names())
    key = next((c for c in KEY_COLUMNS if c in names), None)
    step = next((c for c in STEP_COLUMNS if c in names), None)
    if key is None or step is None:
        raise ImportSourceError(f"import csv: {path}: expected a `model` column and an `epoch` "
                                f"(or `step`) column; it has {names[:12]}")
    for column, source in mapping.items():
        if source not in names:
            raise ImportSourceError(f"import csv: --map {column}={source}: {path} has no column "
                                    f"{source!r}")
    hyper = {source: column for column, source in mapping.items()}
    for name in names:
        target = ALIASES.get(name, name)
        if name not in hyper and target in TYPED and target not in hyper.values():
            hyper[name] = target
    metrics = []
    for name, kind in schema.items():
        if name in (key, step) or name in hyper or name in IDENTITY:
            continue
        if kind.is_numeric():
            metrics.append(name)
        else:
            hyper[name] = name  # text: the run's config
    try:
        models = (scan.select(pl.col(key).drop_nulls().unique(maintain_order=True))
                  .collect()[key].to_list())
    except (pl.exceptions.PolarsError, OSError) as e:
        raise ImportSourceError(f"import csv: {path} cannot be read "
                                f"({' '.join(str(e).split())[:160]})") from None
    return scan, models, (key, step, hyper, metrics)


def _runs(path: Path, scan, models: list[str], columns, prefixed: bool) -> Iterator[SourceRun]:
    import polars as pl

    key, step, hyper, metrics = columns
    identity = [c for c in IDENTITY if c in scan.collect_schema().names()]
    for start in range(0, len(models), MODELS_PER_PASS):
        part = models[start:start + MODELS_PER_PASS]
        try:
            frame = (scan.filter(pl.col(key).is_in(part))
                     .sort([key, step], maintain_order=True).collect())
        except (pl.exceptions.PolarsError, OSError) as e:
            raise ImportSourceError(f"import csv: {path} cannot be read "
                                    f"({' '.join(str(e).split())[:160]})") from None
        for (model,), rows in frame.group_by(key, maintain_order=True):
            yield _run(path, str(model), rows, step, hyper, metrics, identity, prefixed)


def _run(path: Path, model: str, rows, step: str, hyper: dict, metrics: list[str],
         identity: list[str], prefixed: bool) -> SourceRun:
    run_key = f"{path.stem}/{model}" if prefixed else model
    run = SourceRun(key=run_key, config={"source": model})
    first = rows.row(0, named=True)
    for source, column in hyper.items():
        value = first[source]
        if value is not None:
            run.config[column] = value
    for name in identity:
        if first[name] is not None:
            run.config[name] = first[name]
    steps = rows[step].to_list()
    if any(s is None for s in steps):
        run.error = f"import csv: {path}: model {model} has a row without {step}"
        return run
    values = rows.select(metrics).to_dicts() if metrics else [{} for _ in steps]
    merged: dict[int, dict[str, float]] = {}
    for s, row in zip(steps, values):
        if float(s) != int(s) or s < 0:
            run.error = f"import csv: {path}: model {model} has {step} {s!r}, not an integer"
            return run
        target = merged.setdefault(int(s), {})
        target.update({k: float(v) for k, v in row.items() if v is not None})
    run.metrics = sorted(merged.items())
    return run
