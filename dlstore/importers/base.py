"""What every published-zoo importer shares: a source is a stream of `SourceRun`s, and
`commit_runs` writes them into a store with the build's commit protocol.

A format's reader (`raytune`, `unterthiner`, `hf`, `csv`) only reads its files: it yields one
`SourceRun` per model, whose checkpoints are read when the committer asks for them, so a zoo
larger than memory streams through. The committer gathers runs into batches of bounded size
(`BATCH_BYTES` of weights, `BATCH_RUNS` runs); per batch it writes one cohort shard per
(checkpoint step, tensor shapes) with a member per run, then the batch's checkpoint and metric
rows and its runs rows last, all under one commit id (`StoreWriter.commit`). A process killed
in the middle leaves shards no row points to (gc removes them) and rows of a commit whose runs
rows never landed (no view shows them): a rerun imports that batch again, and the result is the
result of an uninterrupted import. Run ids are a hash of the zoo and the run's identity in its
source (`SourceRun.key`), so a second import skips every run the store holds complete.

A run whose files are bad (unreadable, no checkpoints, shapes that change) is left out with one
line naming the file (`ImportReport.errors`); the rest of the import goes on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dlstore.errors import DlstoreError
from dlstore.ids import hashed_id
from dlstore.store.leases import BuildLease
from dlstore.store.tracking import RESERVED, typed_columns
from dlstore.store.writer import StoreWriter

if TYPE_CHECKING:
    import torch

    from dlstore.store.store import Store

BATCH_BYTES = 64 * 2**20  # weights held at once before a batch is committed
BATCH_RUNS = 2000


class ImportSourceError(DlstoreError):
    """A source that cannot be imported: one line naming the file and what was expected."""


StateLoader = Callable[[], "dict[str, torch.Tensor]"]


@dataclass
class SourceCheckpoint:
    step: int
    epoch: float | None
    load: StateLoader  # reads the state dict (ImportSourceError naming the file if it cannot)


@dataclass
class SourceRun:
    """One model of a source: its identity, config (the runs row's config JSON: `model`,
    `input_shape` and `n_classes` when dlstore can rebuild its network), metrics by step and
    checkpoints (read lazily)."""

    key: str
    config: dict
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    checkpoints: list[SourceCheckpoint] = field(default_factory=list)
    error: str | None = None  # found while listing it: the run is left out with this line


@dataclass
class ImportReport:
    zoo: str
    format: str
    path: str
    runs: int = 0  # imported by this call
    skipped: int = 0  # complete in the store already
    checkpoints: int = 0
    metric_rows: int = 0
    errors: list[str] = field(default_factory=list)  # one line per run left out
    total_runs: int = 0  # the zoo's, after the import
    total_checkpoints: int = 0
    total_metric_rows: int = 0


def run_id_of(zoo: str, key: str) -> str:
    return hashed_id(zoo, {"source": key})


def commit_runs(store: Store, zoo: str, format: str, path: str, runs: Iterable[SourceRun],
                total: int | None = None,
                progress: Callable[[int, int | None], None] | None = None,
                batch_bytes: int = BATCH_BYTES, batch_runs: int = BATCH_RUNS) -> ImportReport:
    """Import `runs` into `store` as runs of `zoo`; records the zoo's provenance at the end."""
    import dlstore

    if not isinstance(zoo, str) or not zoo:
        raise ImportSourceError("import: give the zoo as a non-empty string (--zoo NAME)")
    writer = StoreWriter(store)
    writer.check_writable()
    report = ImportReport(zoo, format, path)
    complete = set(store.sql("SELECT run_id FROM runs WHERE zoo = ? AND status = 'complete'",
                             [zoo])["run_id"].to_list())
    versions = {"dlstore_version": dlstore.__version__, "torch_version": _torch_version()}
    batch: list[_Pending] = []
    seen = 0

    def room() -> int:
        return batch_bytes - sum(p.nbytes for p in batch)

    def make_room() -> None:
        nonlocal batch
        if batch:
            _commit_batch(writer, zoo, batch, versions, report)
            batch = []

    with BuildLease(store.location, zoo):  # gc spares the shards written before their rows
        for run in runs:
            seen += 1
            run_id = run_id_of(zoo, run.key)
            if run_id in complete:
                report.skipped += 1
            elif run.error:
                report.errors.append(run.error)
            else:
                try:
                    pending = _read_run(writer, zoo, run_id, run, room, make_room)
                except ImportSourceError as e:
                    report.errors.append(str(e))
                else:
                    batch.append(pending)
                    complete.add(run_id)  # a source listing one model twice imports it once
                    if room() <= 0 or len(batch) >= batch_runs:
                        make_room()
            if progress:
                progress(seen, total)
        make_room()
    _record_provenance(store, writer, report)
    return report


@dataclass
class _Pending:
    """A run read and checked, waiting for its batch's commit: checkpoints held in memory
    (`states`), or, for a run larger than a batch, already written shard by shard (`rows`)."""

    run_id: str
    run: SourceRun
    states: list[tuple[SourceCheckpoint, dict]] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    n_params: int | None = None
    nbytes: int = 0  # of the states held


def _read_run(writer: StoreWriter, zoo: str, run_id: str, run: SourceRun,
              room: Callable[[], int], make_room: Callable[[], None]) -> _Pending:
    """Every checkpoint of the run, read and checked (one network throughout). What does not
    fit the batch's room commits the batch first; a run larger than a whole batch is written
    a checkpoint at a time, so memory holds one of its checkpoints (a large checkpoint suite)."""
    pending = _Pending(run_id, run)
    shapes = None
    for ck in sorted(run.checkpoints, key=lambda c: c.step):
        state = ck.load()
        now = {k: tuple(v.shape) for k, v in state.items()}
        if shapes is not None and now != shapes:
            changed = sorted(k for k in now.keys() | shapes.keys() if now.get(k) != shapes.get(k))
            raise ImportSourceError(f"run {run.key}: the checkpoint at step {ck.step} differs "
                                    f"from its earlier ones at {changed[0]!r} "
                                    f"({shapes.get(changed[0])} -> {now.get(changed[0])})")
        if pending.steps and pending.steps[-1] == ck.step:
            raise ImportSourceError(f"run {run.key}: two checkpoints at step {ck.step}")
        shapes = now
        pending.steps.append(ck.step)
        if pending.n_params is None:
            pending.n_params = sum(v.numel() for v in state.values())
        size = _nbytes(state)
        if not pending.rows and pending.nbytes + size > room():
            make_room()  # the runs read before this one commit now
        if pending.rows or pending.nbytes + size > room():  # larger than a batch
            for held_ck, held_state in [*pending.states, (ck, state)]:
                pending.rows += _put_shards(writer, zoo, [(run_id, held_ck, held_state, run)])
            pending.states, pending.nbytes = [], 0
        else:
            pending.states.append((ck, state))
            pending.nbytes += size
    return pending


def _nbytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def _put_shards(writer: StoreWriter, zoo: str,
                entries: list[tuple[str, SourceCheckpoint, dict, SourceRun]]) -> list[dict]:
    """One cohort shard per (step, network) of `entries` (run id, checkpoint, state, run):
    its members are the runs with that checkpoint. Returns their checkpoint rows."""
    import torch

    groups: dict[tuple, list[tuple[str, SourceCheckpoint, dict]]] = {}
    for run_id, ck, state, run in entries:
        model = run.config.get("model")
        arch_json = json.dumps(model, sort_keys=True) if isinstance(model, dict) else ""
        shape = tuple(run.config.get("input_shape") or ())
        n_classes = int(run.config.get("n_classes") or 0)
        signature = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in state.items())
        groups.setdefault((ck.step, signature, arch_json, shape, n_classes), []).append(
            (run_id, ck, state))
    rows = []
    for (step, _, arch_json, shape, n_classes), members in groups.items():
        names = list(members[0][2])
        tensors = {k: torch.stack([m[2][k].detach().cpu() for m in members]) for k in names}
        blob = writer.put_cohort_shard(tensors, zoo=zoo, step=step, arch_json=arch_json,
                                       input_shape=shape, n_classes=n_classes,
                                       run_ids=[m[0] for m in members])
        dtype = str(tensors[names[0]].dtype).removeprefix("torch.")
        n_bytes = _nbytes(members[0][2])
        rows += [{"run_id": run_id, "step": step, "epoch": ck.epoch, "blob": blob,
                  "member": member, "dtype": dtype, "n_bytes": n_bytes}
                 for member, (run_id, ck, _) in enumerate(members)]
    return rows


def _commit_batch(writer: StoreWriter, zoo: str, batch: list[_Pending], versions: dict,
                  report: ImportReport) -> None:
    """The batch's shards, then its checkpoint and metric rows and its runs rows last, under
    one commit id."""
    checkpoints = _put_shards(writer, zoo, [(p.run_id, ck, state, p.run) for p in batch
                                            for ck, state in p.states])
    checkpoints += [row for p in batch for row in p.rows]
    metrics: dict[str, list] = {k: [] for k in ("run_id", "step", "metric", "tensor", "value")}
    runs = []
    for p in batch:
        last_metric = None
        for step, values in p.run.metrics:
            for name, value in values.items():
                if value is None or math.isnan(value):
                    continue  # a missing value is no row
                metrics["run_id"].append(p.run_id)
                metrics["step"].append(step)
                metrics["metric"].append(_metric_name(name))
                metrics["tensor"].append(None)
                metrics["value"].append(float(value))
                report.metric_rows += 1
                last_metric = step if last_metric is None else max(last_metric, step)
        report.checkpoints += len(p.steps)
        config = p.run.config
        shape = config.get("input_shape")
        typed = typed_columns(config)
        if p.n_params is not None:
            typed.setdefault("n_params", p.n_params)
        runs.append({"run_id": p.run_id, "zoo": zoo, "status": "complete",
                     **typed, "input_shape": list(shape) if shape else None,
                     "config": json.dumps(config, sort_keys=True, default=str),
                     "final_step": p.steps[-1] if p.steps else last_metric, **versions})
    report.runs += len(batch)
    writer.commit(checkpoints, metrics, runs)


def _metric_name(name: str) -> str:
    """A metric named like a column of the views gets a suffix (as `Store.track` asks)."""
    return f"{name}_value" if name in RESERVED else name


def _record_provenance(store: Store, writer: StoreWriter, report: ImportReport) -> None:
    """A zoos row saying where the zoo came from and what it holds now; a rerun that adds
    nothing records nothing new (same text, same hash)."""
    counts = store.sql(
        "SELECT (SELECT count(*) FROM runs WHERE zoo = ?) AS runs, "
        "(SELECT count(*) FROM checkpoints c JOIN runs r USING (run_id) WHERE r.zoo = ?) AS ck, "
        "(SELECT count(*) FROM metrics m JOIN runs r USING (run_id) WHERE r.zoo = ?) AS rows",
        [report.zoo] * 3).row(0)
    report.total_runs, report.total_checkpoints, report.total_metric_rows = map(int, counts)
    if report.total_runs == 0:
        return
    spec = json.dumps({"import": report.format, "path": report.path, "runs": counts[0],
                       "checkpoints": counts[1], "metric_rows": counts[2]}, sort_keys=True)
    writer.record_zoo({"zoo": report.zoo, "spec": spec,
                       "spec_hash": hashlib.sha256(spec.encode()).hexdigest(),
                       "n_runs": report.total_runs, "source_format": report.format,
                       "source_path": report.path, "n_checkpoints": report.total_checkpoints,
                       "n_metric_rows": report.total_metric_rows,
                       "created_at": dt.datetime.now(dt.timezone.utc),
                       "dlstore_version": _version()})


def _version() -> str:
    import dlstore

    return dlstore.__version__


def _torch_version() -> str:
    import torch

    return torch.__version__


def read_state_dict(path: Path, prefix: str = "import",
                    error: type[DlstoreError] = ImportSourceError) -> dict:
    """A checkpoint file's state dict (`.safetensors`, or a torch file read with
    `torch.load(weights_only=True)`: never an arbitrary pickle); a dict holding one under
    `state_dict` (as Lightning writes) gives that. `error` (one line, `prefix` first) if the
    file holds anything else."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch's note on a pickle protocol: not the user's
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is this file's fault
        detail = " ".join(str(e).split())[:200]
        raise error(f"{prefix}: {path} cannot be read as a checkpoint ({detail})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and state
            and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise error(f"{prefix}: {path} holds no state dict (a mapping of names to tensors)")
    return state


def json_lines(path: Path, prefix: str = "import",
               error: type[DlstoreError] = ImportSourceError) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file, blank lines skipped; `error` naming the
    line if one is not a JSON object."""
    with path.open() as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError:
                raise error(f"{prefix}: {path} line {line}: not JSON") from None
            if not isinstance(row, dict):
                raise error(f"{prefix}: {path} line {line}: expected an object")
            yield line, row


def source_dirs(root: Path, is_member: Callable[[Path], bool], format: str,
                expected: str) -> list[Path]:
    """The member directories of a source: `root` itself if `is_member(root)`, else its
    subdirectories that are (sorted); one line saying what was `expected` if none."""
    if not root.is_dir():
        raise ImportSourceError(f"import {format}: {root} is not a directory")
    if is_member(root):
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and is_member(p))
    if not found:
        raise ImportSourceError(f"import {format}: {root} holds no {expected}")
    return found


def last_number(text: str) -> int | None:
    """The last run of digits in `text` (a step in a file or folder name), or None."""
    digits = ""
    for ch in reversed(text):
        if ch.isdigit():
            digits = ch + digits
        elif digits:
            break
    return int(digits) if digits else None


def as_float(value) -> float | None:
    """A metric value: None for a missing one (empty, null, not a number)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value) if value.strip() else None
        except ValueError:
            return None
    return None

