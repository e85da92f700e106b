"""`dlstore import-runs DIR`: runs already finished, from checkpoint files and a metrics file.

A run is a directory holding any of

- checkpoint files `*.safetensors` or `*.pt` whose name carries the step (its last number:
  `step_1000.safetensors`, `ckpt-500.pt`); a `.pt` is read with `torch.load(weights_only=True)`
  (never an arbitrary pickle) and must hold a state dict (or a dict with one under
  `state_dict`, as Lightning writes);
- `metrics.csv` (a `step` column and one column per metric; an empty cell is a missing value)
  or `metrics.jsonl` (one JSON object per line with `step` and the metrics);
- `config.json`: the run's config (typed columns and `config`, as `Store.track` takes it).

DIR is one run, or holds one run per subdirectory. A run's id is a hash of the zoo and the
run's directory name, so importing again adds nothing; an import cut short resumes (the run is
tracked with `resume=True`, which skips what the store holds).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dlstore.errors import DlstoreError
from dlstore.ids import hashed_id
from dlstore.importers.base import json_lines, read_state_dict
from dlstore.store.store import Store

CHECKPOINT_SUFFIXES = (".safetensors", ".pt")
METRICS_FILES = ("metrics.csv", "metrics.jsonl")
_NUMBER = re.compile(r"\d+")


class RunSourceError(DlstoreError):
    """A source that cannot be imported: one line naming the file and what was expected."""


@dataclass
class ImportReport:
    runs: int = 0
    skipped: int = 0  # complete in the store already
    checkpoints: int = 0
    metric_rows: int = 0


def find_runs(root: Path) -> list[Path]:
    """The run directories under `root`: itself if it holds run files, else its
    subdirectories that do (sorted)."""
    if not root.is_dir():
        raise RunSourceError(f"import-runs: {root} is not a directory")
    if _holds_run(root):
        return [root]
    runs = sorted(p for p in root.iterdir() if p.is_dir() and _holds_run(p))
    if not runs:
        raise RunSourceError(f"import-runs: {root} holds no run: expected checkpoint files "
                           f"({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}) or "
                           f"{' / '.join(METRICS_FILES)}, in it or in its subdirectories")
    return runs


def _holds_run(path: Path) -> bool:
    return any((path / name).is_file() for name in METRICS_FILES) or any(
        p.suffix in CHECKPOINT_SUFFIXES for p in path.iterdir() if p.is_file())


def checkpoint_files(run: Path) -> list[tuple[int, Path]]:
    """(step, file) of the run's checkpoints, by step; the step is the name's last number."""
    found: dict[int, Path] = {}
    for path in sorted(run.iterdir()):
        if not (path.is_file() and path.suffix in CHECKPOINT_SUFFIXES):
            continue
        numbers = _NUMBER.findall(path.stem)
        if not numbers:
            raise RunSourceError(f"import-runs: {path}: no step in the file name (expected one, "
                               "as in step_1000.safetensors)")
        step = int(numbers[-1])
        if step in found:
            raise RunSourceError(f"import-runs: {path} and {found[step]} are both step {step}")
        found[step] = path
    return sorted(found.items())


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file's state dict, without unpickling arbitrary objects."""
    return read_state_dict(path, "import-runs", RunSourceError)


def read_metrics(run: Path) -> Iterator[tuple[int, dict[str, float]]]:
    """(step, {metric: value}) rows of the run's metrics file, in file order."""
    if (run / "metrics.csv").is_file():
        path = run / "metrics.csv"
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "step" not in reader.fieldnames:
                raise RunSourceError(f"import-runs: {path}: expected a header with a `step` "
                                   "column")
            for line, row in enumerate(reader, start=2):
                yield _metric_row(path, line, row)
    elif (run / "metrics.jsonl").is_file():
        path = run / "metrics.jsonl"
        for line, row in json_lines(path, "import-runs", RunSourceError):
            yield _metric_row(path, line, row)


def _metric_row(path: Path, line: int, row: dict) -> tuple[int, dict[str, float]]:
    try:
        step = int(row["step"])
    except (KeyError, TypeError, ValueError):
        raise RunSourceError(f"import-runs: {path} line {line}: `step` must be an integer, got "
                           f"{row.get('step')!r}") from None
    values = {}
    for name, value in row.items():
        if name == "step" or value is None or value == "":
            continue  # an empty cell is a missing value, not a zero
        try:
            values[name] = float(value)
        except (TypeError, ValueError):
            raise RunSourceError(f"import-runs: {path} line {line}: {name} is {value!r}, not a "
                               "number") from None
    return step, values


def import_runs(store: Store, root: str | Path, zoo: str,
                progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """Import every run under `root` into `store` as runs of `zoo`."""
    root = Path(root)
    runs = find_runs(root)
    report = ImportReport()
    status = dict(store.sql("SELECT run_id, status FROM runs WHERE zoo = ?", [zoo]).iter_rows())
    for k, run_dir in enumerate(runs):
        run_id = hashed_id(zoo, {"source": run_dir.name})
        if status.get(run_id) == "complete":
            report.skipped += 1
        else:
            _import_run(store, run_dir, zoo, run_id, run_id in status, report)
            report.runs += 1
        if progress:
            progress(k + 1, len(runs))
    return report


def _import_run(store: Store, run_dir: Path, zoo: str, run_id: str, resume: bool,
                report: ImportReport) -> None:
    config: dict = {}
    if (run_dir / "config.json").is_file():
        try:
            config = json.loads((run_dir / "config.json").read_text())
        except ValueError:
            raise RunSourceError(f"import-runs: {run_dir / 'config.json'} is not JSON") from None
        if not isinstance(config, dict):
            raise RunSourceError(f"import-runs: {run_dir / 'config.json'}: expected an object")
    config.setdefault("source", str(run_dir.resolve()))
    checkpoints = checkpoint_files(run_dir)
    # every file is read before the run is created, so a bad one leaves nothing behind
    by_step: dict[int, dict[str, float]] = {}
    for step, values in read_metrics(run_dir):  # rows of one step (train, eval) merge
        by_step.setdefault(step, {}).update(values)
    metrics = sorted(by_step.items())
    for _, path in checkpoints:
        read_checkpoint(path)
    with store.track(zoo, config, run_id=run_id, resume=resume) as run:
        pending = list(checkpoints)
        for step, values in metrics:
            while pending and pending[0][0] <= step:
                ck_step, path = pending.pop(0)
                run.save(ck_step, read_checkpoint(path))
                report.checkpoints += 1
            finite = {k: v for k, v in values.items() if not math.isnan(v)}
            if finite:
                run.log(step, **finite)
                report.metric_rows += len(finite)
        for ck_step, path in pending:
            run.save(ck_step, read_checkpoint(path))
            report.checkpoints += 1
