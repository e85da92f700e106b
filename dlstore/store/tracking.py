"""Runs from a user's own training loop, logged into the store as rows of the same tables.

    with store.track(zoo="my-sweep", config={"lr": 0.1, "width": 64, "seed": 0}) as run:
        for step in range(steps):
            run.log(step, train_loss=loss, test_acc=acc)     # buffered
            if step % 500 == 0:
                run.save(step, model)                        # a shard now, its row at the flush

The runs a process tracks into one `Store` share its `Tracker`: their rows (the runs row, status
updates, metric and checkpoint rows) are buffered together and appended in one commit per table
by a flush, every `flush_every` seconds, every `flush_rows` rows, at `run.flush()`, when the
store is read through (`Store.sql` sees its own writes) or closed, and when the process exits.
So a thousand short runs cost a few commits, not a few per run, and a process killed outright
loses at most the rows of the last `flush_every` seconds. Within a flush the commit protocol
holds: checkpoint and metric rows first, the runs rows of new runs after them, then status
updates. While runs are open or rows are buffered the tracker holds a lease, so that `gc` spares
the shards a run has written before their rows land.

A run is `running` from its first flush; every flush, and a heartbeat every `HEARTBEAT_SECONDS`
while it is open, appends a `run_updates` row, and the runs view shows a `running` run whose
latest update is older than `catalog.STALE_SECONDS` (3 minutes) as `died`. On a clean exit it is
`complete`, on an exception (Ctrl-C included) `failed` with the error's text.

A run's id is a hash of its zoo and config unless given; tracking a run that exists is refused
unless `resume=True`, which continues it: values at steps it already holds are skipped, so a loop
restarted from its last checkpoint does not log them twice.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import math
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

from dlstore.errors import DlstoreError
from dlstore.ids import hashed_id
from dlstore.schemas import HYPERPARAMETER_COLUMNS, RUNS
from dlstore.store.leases import BuildLease
from dlstore.store.writer import StoreWriter

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dlstore.store.store import Store

FLUSH_SECONDS = 5.0
FLUSH_ROWS = 100_000  # ~10 MB of buffered rows; fewer, larger table files
HEARTBEAT_SECONDS = 60.0
# names a metric may not take: the columns beside metric values in the views (metrics_wide
# pivots metric names into columns next to these)
RESERVED = frozenset(HYPERPARAMETER_COLUMNS) | {"step", "epoch", "metric", "tensor", "value"}
# the typed runs columns a config key fills when its value has the column's type
_TYPED = {name: RUNS.field(name).type for name in (
    "arch", "dataset", "width", "depth", "n_params", "n_train", "label_noise", "optimizer", "lr",
    "momentum", "weight_decay", "batch_size", "schedule", "epochs", "total_steps", "seed",
    "n_classes")}


class TrackingError(DlstoreError):
    """Bad use of a tracked run: one line, nothing written."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def typed_columns(config: dict[str, Any]) -> dict[str, Any]:
    """The runs columns a config fills: its top-level keys (and those of its `model`,
    `dataset`, `train` tables) that name a typed column and hold a value of its type."""
    import pyarrow as pa

    found: dict[str, Any] = {}
    tables = [config] + [config[k] for k in ("model", "dataset", "train")
                         if isinstance(config.get(k), dict)]
    for table in tables:
        for key, value in table.items():
            kind = _TYPED.get(key)
            if kind is None or key in found or isinstance(value, bool) or value is None:
                continue
            if pa.types.is_integer(kind) and isinstance(value, int):
                found[key] = value
            elif pa.types.is_floating(kind) and isinstance(value, (int, float)):
                found[key] = float(value)
            elif pa.types.is_string(kind) and isinstance(value, str):
                found[key] = value
    if isinstance(config.get("model"), dict) and isinstance(config["model"].get("arch"), str):
        found.setdefault("arch", config["model"]["arch"])
    if isinstance(config.get("dataset"), dict) and isinstance(config["dataset"].get("name"), str):
        found.setdefault("dataset", config["dataset"]["name"])
    return found


class Tracker:
    """The tracked runs of one `Store` object in this process and their buffered rows."""

    def __init__(self, store: Store, flush_every: float = FLUSH_SECONDS,
                 flush_rows: int = FLUSH_ROWS):
        self.store = store
        self.writer = StoreWriter(store)
        self.flush_every, self.flush_rows = flush_every, flush_rows
        self.open: dict[str, TrackedRun] = {}
        self._lock = threading.RLock()
        self._clear()
        self._lease: BuildLease | None = None
        self._flushed_at = self._beat_at = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        atexit.register(self.close)

    def _clear(self) -> None:
        self._runs: list[dict] = []
        self._updates: list[dict] = []
        self._checkpoints: list[dict] = []
        self._metrics: dict[str, list] = {k: [] for k in
                                          ("run_id", "step", "metric", "tensor", "value",
                                           "commit_id")}

    def buffered_runs(self) -> set[str]:
        with self._lock:
            return {row["run_id"] for row in self._runs}

    @property
    def pending(self) -> bool:
        return bool(self._runs or self._updates or self._checkpoints or self._metrics["run_id"])

    def start(self, run: TrackedRun) -> None:
        with self._lock:
            if self._lease is None:
                self._lease = BuildLease(self.store.location, run.zoo).__enter__()
            self.open[run.id] = run
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._background, daemon=True,
                                                name="dlstore-track")
                self._thread.start()

    def add(self, *, run: dict | None = None, update: dict | None = None,
            checkpoint: dict | None = None, metrics: list[tuple] = ()) -> None:
        """Buffer rows; a flush follows once `flush_rows` are waiting."""
        with self._lock:
            if run is not None:
                self._runs.append(run)
            if update is not None:
                self._updates.append(update)
            if checkpoint is not None:
                self._checkpoints.append(checkpoint)
            for row in metrics:
                for key, item in zip(self._metrics, row):
                    self._metrics[key].append(item)
            full = len(self._metrics["run_id"]) >= self.flush_rows
        if full:
            self.flush()

    def finish(self, run: TrackedRun, update: dict) -> None:
        with self._lock:
            self._updates.append(update)
            self.open.pop(run.id, None)

    def flush(self) -> None:
        """Append everything buffered: one commit per table, in the commit protocol's order.
        A flush that fails keeps its rows for the next one."""
        with self._lock:
            now = _now()
            for run in self.open.values():  # every open run beats with every flush
                self._updates.append(run.update_row("running", now))
            if not self.pending:
                return
            batch = {"checkpoints": self._checkpoints, "metrics": self._metrics,
                     "runs": self._runs, "run_updates": self._updates}
            self._clear()
            done = []
            try:
                for table, rows in batch.items():  # the commit protocol's order
                    self.writer.append_rows(table, rows)
                    done.append(table)
            except BaseException:
                # what landed is not repeated; the rest waits for the next flush
                self._restore({k: v for k, v in batch.items() if k not in done})
                raise
            self._flushed_at = self._beat_at = time.monotonic()
            if not self.open and self._lease is not None:
                self._lease.__exit__(None, None, None)
                self._lease = None

    def _restore(self, batch: dict) -> None:
        self._checkpoints[:0] = batch.get("checkpoints", [])
        for key, items in batch.get("metrics", {}).items():
            self._metrics[key][:0] = items
        self._runs[:0] = batch.get("runs", [])
        self._updates[:0] = batch.get("run_updates", [])

    def close(self) -> None:
        """Flush what is left and stop the background thread (at exit, or `Store.close`)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        try:
            self.flush()
        finally:
            if self._lease is not None and not self.open:
                self._lease.__exit__(None, None, None)
                self._lease = None

    def _background(self) -> None:
        """Flush by time, beat while runs are open; errors wait for the next try."""
        while not self._stop.wait(min(1.0, self.flush_every)):
            now = time.monotonic()
            try:
                if now - self._flushed_at >= self.flush_every and self.pending or (
                        self.open and now - self._beat_at >= HEARTBEAT_SECONDS):
                    self.flush()
            except DlstoreError as e:
                warnings.warn(f"tracked runs: a background flush failed ({e}); retried",
                              stacklevel=1)


class TrackedRun:
    """One run of a user's loop: `log` metrics, `save` checkpoints; close it (or leave the
    `with` block) to mark it complete. Its rows go through the store's `Tracker`."""

    def __init__(self, store: Store, zoo: str, config: dict[str, Any] | None, *,
                 run_id: str | None = None, resume: bool = False):
        config = dict(config or {})
        try:
            config_json = json.dumps(config, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TrackingError(f"track: the config is not JSON-serialisable ({e}); give "
                                "numbers, strings, booleans, lists and tables") from None
        if not isinstance(zoo, str) or not zoo:
            raise TrackingError("track: give the run's zoo as a non-empty string")
        self.store = store
        self.tracker: Tracker = store.tracker()
        self.zoo = zoo
        self.config = config
        self.id = run_id or hashed_id(zoo, {"config": json.loads(config_json)})
        if self.id in self.tracker.open:
            raise TrackingError(f"track: run {self.id} is open already in this process")
        self._lock = threading.RLock()
        self._last: dict[str, int] = {}  # metric -> last step logged (stored or buffered)
        self._saved: dict[int, str] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._warned: set[str] = set()
        self._final_step: int | None = None
        self._stored: dict[str, int] = {}  # what a resumed run held: metric -> last step
        self._stored_checkpoint = -1
        self._closed = False
        existing = self._existing()
        if existing:
            self._resume(existing[0], resume)
        else:
            self.commit_id = StoreWriter.new_commit_id()
        self.tracker.start(self)
        if not existing:
            self.tracker.add(run=self._runs_row(config_json))

    def _existing(self) -> list[dict]:
        """The run's row if the store (or this process's buffer) holds it. A new run, the
        common case, costs one look at the raw runs table and no flush."""
        query = "SELECT 1 FROM _runs WHERE run_id = ? LIMIT 1"
        if self.id not in self.tracker.buffered_runs() and not self.store.catalog.refresh(
                query).execute(query, [self.id]).fetchall():
            return []
        return self.store.sql("SELECT commit_id, status, final_step, zoo FROM runs "
                              "WHERE run_id = ?", [self.id]).to_dicts()

    def _runs_row(self, config_json: str) -> dict:
        import dlstore

        shape = self.config.get("input_shape")
        return {"run_id": self.id, "zoo": self.zoo, "status": "running", "config": config_json,
                **typed_columns(self.config),
                "input_shape": list(shape) if isinstance(shape, (list, tuple)) else None,
                "commit_id": self.commit_id, "created_at": _now(),
                "dlstore_version": dlstore.__version__}

    def _resume(self, row: dict, resume: bool) -> None:
        if not resume:
            raise TrackingError(f"track: run {self.id} is already in the store (status "
                                f"{row['status']}); pass resume=True to continue it, or another "
                                "config or run_id for a new run")
        if row["zoo"] != self.zoo:
            raise TrackingError(f"track: run {self.id} belongs to zoo {row['zoo']!r}, not "
                                f"{self.zoo!r}")
        self.commit_id = row["commit_id"]
        self._final_step = row["final_step"]
        self._stored = dict(self.store.sql(
            "SELECT metric, max(step) FROM metrics WHERE run_id = ? GROUP BY metric",
            [self.id]).iter_rows())
        self._last = dict(self._stored)
        self._saved = dict(self.store.sql("SELECT step, blob FROM checkpoints WHERE run_id = ?",
                                          [self.id]).iter_rows())
        if self._saved:
            self._stored_checkpoint = max(self._saved)
            last = self.store.load_state_dict(self.id, self._stored_checkpoint)
            self._shapes = {k: tuple(v.shape) for k, v in last.items()}

    # -- the loop's calls -------------------------------------------------------------------

    def log(self, step: int, /, **metrics: float) -> None:
        """Metric values at `step` (an int >= 0; a metric's steps go forward). Values at steps
        a resumed run already holds are skipped."""
        step = self._check_step(step, "log")
        rows = []
        for name, value in metrics.items():
            if name in RESERVED:
                raise TrackingError(f"log: metric name {name!r} is a column of the views; "
                                    f"rename it (e.g. {name}_value)")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TrackingError(f"log: {name} at step {step} is {value!r}, not a number"
                                    ) from None
            last = self._last.get(name)
            if last is not None and step <= last:
                if step <= self._stored.get(name, -1):
                    continue  # a restarted loop replaying steps the store holds
                raise TrackingError(f"log: {name} is already logged at step {last}; steps go "
                                    f"forward (got {step})")
            if not math.isfinite(value) and name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"run {self.id}: {name} at step {step} is {value}; stored as "
                              f"{value} (SQL sees it as a DOUBLE {value})", stacklevel=2)
            rows.append((self.id, step, name, None, value, self.commit_id))
        with self._lock:
            for _, _, name, *_ in rows:
                self._last[name] = step
            if rows:
                self._final_step = max(self._final_step or -1, step)
        self.tracker.add(metrics=rows)

    def save(self, step: int, model_or_state_dict: nn.Module | dict[str, torch.Tensor]) -> None:
        """A checkpoint at `step`: the state dict's tensors go to a shard now, its row lands
        with the next flush. Every checkpoint of a run has the same tensor names and shapes."""
        import torch

        step = self._check_step(step, "save")
        if step <= self._stored_checkpoint:
            return  # a resumed run: the store holds checkpoints up to here
        if self._saved and step <= max(self._saved):
            raise TrackingError(f"save: run {self.id} has a checkpoint at step "
                                f"{max(self._saved)}; steps go forward (got {step})")
        state = (model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict")
                 else model_or_state_dict)
        if not isinstance(state, dict) or not state or not all(
                isinstance(v, torch.Tensor) for v in state.values()):
            raise TrackingError("save: give a torch.nn.Module or a state dict of tensors")
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if self._shapes is not None and shapes != self._shapes:
            changed = sorted(k for k in shapes.keys() | self._shapes.keys()
                             if shapes.get(k) != self._shapes.get(k))
            name = changed[0]
            raise TrackingError(f"save: the state dict at step {step} differs from the run's "
                                f"earlier checkpoints at {name!r} ({self._shapes.get(name)} -> "
                                f"{shapes.get(name)}); a run keeps one network")
        tensors = {k: v.detach().cpu().contiguous().unsqueeze(0) for k, v in state.items()}
        model = self.config.get("model")
        blob = self.tracker.writer.put_cohort_shard(
            tensors, zoo=self.zoo, step=step,
            arch_json=json.dumps(model, sort_keys=True) if isinstance(model, dict) else "",
            input_shape=tuple(self.config.get("input_shape") or ()),
            n_classes=int(self.config.get("n_classes") or 0), run_ids=[self.id])
        first = next(iter(state.values()))
        with self._lock:
            self._shapes = shapes
            self._saved[step] = blob
            self._final_step = max(self._final_step or -1, step)
        self.tracker.add(checkpoint={
            "run_id": self.id, "step": step, "epoch": None, "blob": blob, "member": 0,
            "dtype": str(first.dtype).removeprefix("torch."),
            "n_bytes": sum(v.numel() * v.element_size() for v in state.values()),
            "commit_id": self.commit_id})

    def flush(self) -> None:
        """Append what this process has buffered now (this run's rows and the others')."""
        self.tracker.flush()

    def close(self, error: BaseException | None = None) -> None:
        """Mark the run complete (or failed, with `error`'s text); its rows land with the next
        flush, within `flush_every` seconds (or at exit, or when the store is read)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if error is None:
            self.tracker.finish(self, self.update_row("complete"))
        else:
            text = " ".join(f"{type(error).__name__}: {error}".split())[:500].rstrip(": ")
            self.tracker.finish(self, self.update_row("failed", error=text))

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(error)  # Ctrl-C too: a run cut short is not complete

    # -- inside -----------------------------------------------------------------------------

    def update_row(self, status: str, now: dt.datetime | None = None,
                   error: str | None = None) -> dict:
        return {"run_id": self.id, "status": status, "final_step": self._final_step,
                "error": error, "created_at": now or _now()}

    def _check_step(self, step: int, verb: str) -> int:
        if self._closed:
            raise TrackingError(f"{verb}: run {self.id} is closed; track it again with "
                                "resume=True to add to it")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TrackingError(f"{verb}: step must be an int >= 0, got {step!r}")
        return step
