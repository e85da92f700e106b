"""Plan -> cohorts -> train -> commit: builds a zoo spec into a store, resumably.

Runs already in the store are skipped, so rerunning a spec after a crash (or after it finished)
trains only what is missing and adds nothing when nothing is. Each cohort's shards are written as
its checkpoints arrive; its rows are committed when it finishes, runs rows last. When the spec
asks for group metrics, they are computed last, from the committed runs (`groups.py`).

A build is a sequence of phases, each a set of cohorts trained and committed as above. A plain
zoo is one phase. A zoo with `[tickets]` has one per pruning level (`tickets.py`): level k's
masks and start weights are read back from what level k-1 committed, so a rebuild after a crash
continues from the last committed level.

`plan_build` makes every check a spec can fail (its sizes against memory, before any data is
generated) and plans the cohorts; the CLI calls it before it creates a store. Ctrl-C (or SIGTERM,
which the CLI turns into the same exception) commits the cohorts already finished and raises
BuildInterrupted: at most the cohort in flight is lost, and a rerun resumes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

import dlstore
from dlstore.errors import BuildInterrupted, DlstoreError, SpecError, UsageError
from dlstore.interrupts import deferred_interrupts, exit_code
from dlstore.store.leases import BuildLease
from dlstore.store.store import Store
from dlstore.zoo.data import DatasetTensors, run_data
from dlstore.zoo.groups import compute_group_metrics
from dlstore.zoo.limits import Estimate, check_length, check_memory, estimate_cohorts
from dlstore.zoo.models import init_state, n_params
from dlstore.zoo.population import (
    CohortPlan,
    CohortTrainer,
    MemberPlan,
    auto_cohort_size,
    member_slices,
    resolve_device,
    shape_groups,
)
from dlstore.zoo.seeds import derive_seed
from dlstore.zoo.spec import MetricsOptions, RunConfig, ZooSpec, checkpoint_metric_steps
from dlstore.zoo.tickets import (
    TicketPhase,
    check_transfer_shapes,
    record_stability,
    stability_pairs,
    ticket_phases,
)

SHARD_FORMAT = "dlstore-cohort/1"


@dataclass
class BuildReport:
    zoo: str
    runs_total: int
    runs_skipped: int
    runs_built: int
    runs_diverged: int
    cohorts: int
    checkpoints: int
    seconds: float
    train_seconds: float
    group_steps: int = 0  # (group, step) pairs whose group metrics were computed
    runs_dropped: int = 0  # trained, but their shards were gone at commit: rebuilt next time


def cohort_key(run: RunConfig, total_steps: int, steps: list[int]) -> str:
    """What must be equal for runs to step together (see CohortPlan)."""
    generation = run.dataset.model_dump(mode="json",
                                        exclude={"n_train", "label_noise", "noise_seed"})
    return json.dumps([generation, run.model.family_key(), run.train.optimizer,
                       run.train.schedule, run.train.batch_size, total_steps, run.start_step,
                       steps])


def plan_cohorts(runs: list[RunConfig], cohort_size: int | str = "auto", device: str = "cpu",
                 metrics: MetricsOptions | None = None
                 ) -> list[tuple[list[RunConfig], list[DatasetTensors]]]:
    """Group runs into cohorts (in spec order), each with every member's own data. Groups larger
    than the cohort size are split into near-equal cohorts. `metrics` is checked against every
    run's checkpoint steps before anything trains."""
    groups: dict[str, list[tuple[RunConfig, DatasetTensors]]] = {}
    for run in runs:
        data = run_data(run.dataset, run.seed)
        n_train = data.x_train.shape[0]
        if run.train.batch_size > n_train:
            raise SpecError(f"train.batch_size: {run.train.batch_size} is larger than the "
                            f"{n_train} training examples of run {run.run_id}")
        total = check_length(run, n_train)
        steps = run.checkpoint_steps(total)
        if metrics is not None:
            checkpoint_metric_steps(metrics, steps)
        groups.setdefault(cohort_key(run, total, steps), []).append((run, data))
    cohorts = []
    for members in groups.values():
        size = cohort_size
        if size == "auto":
            run, data = max(members, key=lambda m: m[0].model.width or 0)
            net = run.model.size(data.input_shape, data.n_classes)
            size = auto_cohort_size(net.params, net.activations, run.train.batch_size,
                                    resolve_device(device))
        n_chunks = -(-len(members) // size)
        for k in range(n_chunks):
            chunk = members[k * len(members) // n_chunks:(k + 1) * len(members) // n_chunks]
            cohorts.append(([r for r, _ in chunk], [d for _, d in chunk]))
    return cohorts


def _member(run: RunConfig, data: DatasetTensors) -> MemberPlan:
    t = run.train
    return MemberPlan(
        run_id=run.run_id,
        init=init_state(run.model, data.input_shape, data.n_classes, run.seed),
        y_train=data.y_train,
        order_seed=t.order_seed if t.order_seed is not None else derive_seed(run.seed, "order"),
        lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum, betas=t.betas, eps=t.eps,
    )


def cohort_plan(runs: list[RunConfig], datas: list[DatasetTensors],
                metrics: MetricsOptions | None = None) -> CohortPlan:
    first, data = runs[0], datas[0]
    largest = max(range(len(datas)), key=lambda i: datas[i].x_train.shape[0])
    total = first.train.total_steps(data.x_train.shape[0])
    return CohortPlan(
        arch=max((r.model for r in runs), key=lambda m: m.width or 0),
        input_shape=data.input_shape, n_classes=data.n_classes,
        optimizer=first.train.optimizer, schedule=first.train.schedule,
        batch_size=first.train.batch_size, total_steps=total,
        checkpoint_steps=first.checkpoint_steps(total),
        x_train=datas[largest].x_train, x_test=data.x_test, y_test=data.y_test,
        members=[_member(r, d) for r, d in zip(runs, datas)],
        metrics=metrics if metrics is not None else MetricsOptions(),
        start_step=first.start_step,
    )


@dataclass
class CohortResult:
    """A trained cohort whose shards are in the store: the rows that make it visible (committed
    by `_Committer`, runs rows last) and what the build report counts."""

    checkpoints: list[dict]
    metrics: dict[str, list]
    runs: list[dict]
    n_checkpoints: int
    train_seconds: float
    masks: list[dict] = field(default_factory=list)  # lottery-ticket masks found


class _Committer:
    """Collects finished cohorts' rows and commits them in batches (runs rows last, one commit
    id): fewer, larger table files. A crash loses at most the cohorts since the last commit; a
    rebuild retrains them."""

    def __init__(self, store: Store, every: float):
        self.store = store
        self.every = every
        self.last = time.perf_counter()
        self.committed = 0  # runs
        self.dropped = 0  # runs left out because their shards were gone
        self._clear()

    def _clear(self) -> None:
        self.checkpoints: list[dict] = []
        self.metrics: dict[str, list] = _metric_columns()
        self.runs: list[dict] = []
        self.masks: list[dict] = []

    def add(self, result: CohortResult) -> None:
        self.checkpoints += result.checkpoints
        for k, values in result.metrics.items():
            self.metrics[k] += values
        self.runs += result.runs
        self.masks += result.masks
        if time.perf_counter() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        """Commit what was collected. Ctrl-C or SIGTERM waits for the commit; the batch is
        taken first, so a commit cut short (a second signal, an error) is never repeated with
        runs rows it may already have written, which would list those runs twice."""
        if self.runs:
            self._drop_runs_without_shards()
        batch = (self.checkpoints, self.metrics, self.runs, self.masks)
        self._clear()
        if batch[2]:
            with deferred_interrupts():
                self.store.commit(*batch)
                self.committed += len(batch[2])
        self.last = time.perf_counter()

    def _drop_runs_without_shards(self) -> None:
        """Leave out runs whose shards are gone: removed by gc while this build was stopped for
        longer than its lease lives (leases.py); a rebuild trains them again."""
        gone = self.store.blobs.missing({row["blob"] for row in [*self.checkpoints, *self.masks]})
        if not gone:
            return
        lost = {row["run_id"] for row in [*self.checkpoints, *self.masks] if row["blob"] in gone}
        self.dropped += len(lost)
        self.runs = [r for r in self.runs if r["run_id"] not in lost]
        self.checkpoints = [r for r in self.checkpoints if r["run_id"] not in lost]
        self.masks = [r for r in self.masks if r["run_id"] not in lost]


@dataclass
class BuildPlan:
    """What a build will do, worked out (and every spec check passed) before anything is
    created: the runs by phase, those still to build, their cohorts and step counts."""

    phases: list[list[RunConfig]]
    zoo_runs: int  # the whole zoo's runs (every shard's), recorded in the zoos table
    done_ids: frozenset[str]  # runs the store held when planned
    todo: list[list[RunConfig]]
    cohorts: list[Cohorts]
    steps: list[list[int]]  # optimizer steps of each cohort
    device: str  # what the cohort sizes were chosen for

    @property
    def n_runs(self) -> int:
        return sum(map(len, self.phases))

    @property
    def n_new(self) -> int:
        return sum(map(len, self.todo))

    @property
    def n_cohorts(self) -> int:
        return sum(map(len, self.cohorts))

    @property
    def total_steps(self) -> int:
        return sum(map(sum, self.steps))

    def estimate(self) -> Estimate:
        return estimate_cohorts([c for cohorts in self.cohorts for c in cohorts],
                                torch.device(self.device))


def plan_build(spec: ZooSpec, device: str = "auto", backend: str = "local",
               shard: tuple[int, int] | None = None, done_ids: frozenset[str] = frozenset(),
               plan_device: str | None = None) -> BuildPlan:
    """Check everything about `spec` that can be checked without a store (sizes against memory
    first, before any data is generated) and plan the runs not in `done_ids`; cohort sizes are
    chosen for `plan_device` (default: `device` resolved)."""
    dev = resolve_device(device)
    check_backend(spec, backend, shard)
    if spec.tickets is not None:
        phases = ticket_phases(spec)
        zoo_runs = sum(map(len, phases))
    else:
        phases = [list(spec.runs if shard is None else shard_runs(spec.runs, *shard))]
        zoo_runs = len(spec.runs)
    check_memory([r for phase in phases for r in phase], spec.build.cohort_size, dev)
    if spec.transfer is not None:
        check_transfer_shapes(spec)
    todo = [[r for r in phase if r.run_id not in done_ids] for phase in phases]
    plan_device = plan_device or str(dev)
    planned = [plan_cohorts(runs, spec.build.cohort_size, device=plan_device, metrics=spec.metrics)
               for runs in todo]
    steps = [[runs[0].train.total_steps(datas[0].x_train.shape[0]) - runs[0].start_step
              for runs, datas in cohorts] for cohorts in planned]
    return BuildPlan(phases, zoo_runs, frozenset(done_ids), todo, planned, steps, plan_device)


def build_zoo(spec: ZooSpec, store: Store, device: str = "auto",
              progress: Callable[[int, int], None] | None = None, backend: str = "local",
              address: str | None = None, shard: tuple[int, int] | None = None,
              grow: bool = False, plan: BuildPlan | None = None,
              runs_progress: Callable[[int, int], None] | None = None) -> BuildReport:
    """Train every run of `spec` that `store` does not hold yet and commit it, phase by phase.

    `progress(done, total)` is called with optimizer steps done (summed over cohorts),
    `runs_progress(done, total)` with runs trained of runs to train (first with 0, total).
    `backend` "ray" trains the cohorts as tasks on the Ray cluster at `address` (`ray_backend`);
    `shard` (I, N) builds only the I-th of N contiguous blocks of the runs, so that N processes
    can share a zoo. A zoo name the store already holds from another spec (other runs) is
    refused unless `grow`. The build holds a lease for its whole duration, so that `gc` spares
    the shards it has written and not committed yet. `plan` (from `plan_build` with the same
    arguments) is used unless the store changed since.

    Ctrl-C (KeyboardInterrupt) commits the cohorts already finished, then raises
    BuildInterrupted: at most the cohort in flight is lost."""
    store.check_writable()
    if not grow:
        check_same_zoo(spec, store)
    with BuildLease(store.location, spec.name):
        return _build_zoo(spec, store, device, progress, backend, address, shard, plan,
                          runs_progress)


def _build_zoo(spec: ZooSpec, store: Store, device: str,
               progress: Callable[[int, int], None] | None, backend: str,
               address: str | None, shard: tuple[int, int] | None,
               plan: BuildPlan | None,
               runs_progress: Callable[[int, int], None] | None) -> BuildReport:
    started = time.perf_counter()
    dev = resolve_device(device)
    check_backend(spec, backend, shard)
    done_ids = frozenset(store.run_ids())
    if backend == "ray":
        from dlstore.zoo import ray_backend

        execute, plan_device = ray_backend.cohort_runner(store, device, address, spec.metrics)
    else:
        execute, plan_device = _local_runner(store, dev, spec.metrics), str(dev)
    if plan is None or plan.done_ids != done_ids or plan.device != plan_device:
        plan = plan_build(spec, device, backend, shard, done_ids, plan_device)
    total = plan.total_steps
    report = BuildReport(spec.name, plan.n_runs, plan.n_runs - plan.n_new, 0, 0, plan.n_cohorts,
                         0, 0.0, 0.0)
    committer = _Committer(store, spec.build.commit_every)
    done = 0
    if runs_progress:
        runs_progress(0, plan.n_new)
    try:
        for cohorts, cohort_steps in zip(plan.cohorts, plan.steps):
            phase = TicketPhase(spec, store) if spec.tickets is not None else None

            def phase_progress(steps_done: int, before: int = done) -> None:
                if progress:
                    progress(before + steps_done, total)

            for result in execute(spec.name, cohorts, cohort_steps, phase, phase_progress):
                for row in result.runs:
                    row["spec_hash"] = spec.spec_hash
                committer.add(result)
                report.runs_built += len(result.runs)
                if runs_progress:
                    runs_progress(report.runs_built, plan.n_new)
                report.runs_diverged += sum(r["status"] == "diverged" for r in result.runs)
                report.checkpoints += result.n_checkpoints
                report.train_seconds += result.train_seconds
            done += sum(cohort_steps)
            # the next phase reads what this one trained
            committer.flush()
            if phase is not None:
                record_stability(store, stability_pairs(plan.phases))
        if spec.metrics.groups is not None:
            report.group_steps = compute_group_metrics(
                store, spec.name, spec.metrics.groups, {r.run_id for r in spec.runs}, device=dev)
        store.record_zoo({"zoo": spec.name, "spec": spec.text, "spec_hash": spec.spec_hash,
                          "n_runs": plan.zoo_runs, "dlstore_version": dlstore.__version__})
    except KeyboardInterrupt as stop:
        committer.flush()  # the finished cohorts: only the one in flight is lost
        raise BuildInterrupted(
            f"interrupted: {committer.committed} runs built by this build are kept "
            f"({report.runs_skipped} were in the store before), "
            f"{plan.n_new - committer.committed} not built; rerun the same command to resume",
            exit_code(stop)) from None
    report.runs_dropped = committer.dropped
    report.runs_built -= committer.dropped
    report.seconds = time.perf_counter() - started
    return report


def check_same_zoo(spec: ZooSpec, store: Store) -> None:
    """SpecError if the store holds zoo `spec.name` built from a spec with other runs: two
    specs' runs in one zoo would be merged silently (and averaged by every recipe plot)."""
    for text, spec_hash in store.sql("SELECT spec, spec_hash FROM zoos WHERE zoo = ?",
                                     [spec.name]).iter_rows():
        if spec_hash == spec.spec_hash:
            continue
        try:
            same = ZooSpec.from_text(text).identity == spec.identity
        except DlstoreError:  # a spec this version no longer reads: only its text can match
            same = False
        if not same:
            raise SpecError(f"zoo {spec.name!r} in this store was built from another spec "
                            f"(other runs; spec hash {spec_hash[:12]}); give --grow to add this "
                            "spec's runs to that zoo, or give this spec another name")


def check_backend(spec: ZooSpec, backend: str, shard: tuple[int, int] | None) -> None:
    """Refuse what a backend cannot build, before anything is created."""
    if spec.tickets is not None and (backend != "local" or shard is not None):
        raise UsageError("a [tickets] zoo is built level by level from what the previous level "
                         "committed: build it with the local backend and no --shard")


def shard_runs(runs: list[RunConfig], index: int, count: int) -> list[RunConfig]:
    """The index-th of `count` contiguous blocks of `runs`: the same runs whatever the store
    holds, and neighbouring grid points (which share cohorts) stay together."""
    if not 0 <= index < count:
        raise SpecError(f"shard {index}/{count}: give I/N with 0 <= I < N")
    return [r for k, r in enumerate(runs) if k * count // len(runs) == index]


Cohorts = list[tuple[list[RunConfig], list[DatasetTensors]]]
# (zoo, cohorts, their step counts, the tickets phase or None, progress(steps done)) -> results
Runner = Callable[[str, Cohorts, list[int], TicketPhase | None, Callable[[int], None]],
                  Iterator[CohortResult]]


def _local_runner(store: Store, device: torch.device, metrics: MetricsOptions) -> Runner:
    """Cohorts one after another in this process."""

    def execute(zoo: str, cohorts: Cohorts, steps: list[int], phase: TicketPhase | None,
                progress: Callable[[int], None]) -> Iterator[CohortResult]:
        for k, (runs, datas) in enumerate(cohorts):
            def on_step(step: int, offset: int = sum(steps[:k]) - runs[0].start_step) -> None:
                progress(offset + step)

            yield build_cohort(zoo, runs, datas, store, device, metrics, on_step, phase)

    return execute


def build_cohort(zoo: str, runs: list[RunConfig], datas: list[DatasetTensors], store: Store,
                 device: torch.device, metrics: MetricsOptions,
                 on_step: Callable[[int], None] | None = None, phase: TicketPhase | None = None
                 ) -> CohortResult:
    """Train one cohort, evaluating each checkpoint here while a background thread writes its
    shards to the store; return its rows once every shard they point to is stored. Shared by
    every backend; the caller commits the rows.

    Only the writing (serialising and hashing, which release the GIL) goes to the background:
    with any torch work on the writer thread too (evaluation, slicing), a 1,000-run CPU build
    took 74-96 s instead of 45 s, its training steps slowed 2-3x by the second thread."""
    plan = cohort_plan(runs, datas, metrics)
    if phase is not None:
        phase.prepare(plan, runs)
    trainer = CohortTrainer(plan, device, on_step=on_step)
    groups = shape_groups(plan.members)
    # (shard future, step, epoch, alive, members): never the snapshot, whose weights may be on a GPU
    pending: list[tuple] = []
    metric_rows = _metric_columns()
    last_step = [-1] * len(runs)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlstore-writer") as writer:
        for ck in trainer.run():
            params = {k: v.cpu() for k, v in ck.params.items()}
            for members in groups:
                tensors = member_slices(params, plan.members[members[0]].init, members)
                meta = _shard_metadata(zoo, plan, [runs[i] for i in members], tensors, ck.step)
                pending.append((writer.submit(store.put_shard, tensors, meta), ck.step,
                                ck.epoch, ck.alive, members))
            alive = ck.alive.nonzero().flatten().tolist()
            for i in alive:
                last_step[i] = ck.step
            for k, values in metric_columns(ck.metrics, ck.step,
                                            [runs[i].run_id for i in alive], alive).items():
                metric_rows[k] += values
        checkpoints = [row for future, *where in pending
                       for row in _checkpoint_rows(future.result(), *where, runs, plan)]
    cohort_id = uuid.uuid4().hex[:16]
    run_rows = [_run_row(run, data, plan, cohort_id, last_step[i], int(trainer.diverged_step[i]),
                         trainer.train_seconds / len(runs), trainer.device)
                for i, (run, data) in enumerate(zip(runs, datas))]
    masks: list[dict] = []
    if phase is not None:
        checkpoints, metric_rows, run_rows, masks = phase.finish(
            (checkpoints, metric_rows, run_rows), runs, zoo)
    n_checkpoints = len({step for _, step, *_ in pending})
    return CohortResult(checkpoints, metric_rows, run_rows, n_checkpoints, trainer.train_seconds,
                        masks)


def _metric_columns() -> dict[str, list]:
    return {k: [] for k in ("run_id", "step", "metric", "tensor", "value")}


def metric_columns(values: dict, step: int, ids: list[str], members: list[int]
                   ) -> dict[str, list]:
    """Metric rows of `members` (positions in the stack; `ids` their run ids) at `step`, as
    columns, from an evaluator's [P] values; per-tensor metrics carry the state-dict name in
    `tensor`. A NaN value means the metric is undefined for that member (e.g. `alpha`
    of a matrix with fewer than 8 eigenvalues): it gets no row."""
    metrics = _metric_columns()
    for key, column in values.items():
        name, tensor = key if isinstance(key, tuple) else (key, None)
        picked = column[members]
        keep = ~torch.isnan(picked)
        kept = [i for i, k in zip(ids, keep.tolist()) if k] if not bool(keep.all()) else ids
        metrics["run_id"] += kept
        metrics["step"] += [step] * len(kept)
        metrics["metric"] += [name] * len(kept)
        metrics["tensor"] += [tensor] * len(kept)
        metrics["value"] += picked[keep].tolist()
    return metrics


def _checkpoint_rows(blob: str, step: int, epoch: torch.Tensor, alive: torch.Tensor,
                     members: list[int], runs: list[RunConfig], plan: CohortPlan) -> list[dict]:
    init = plan.members[members[0]].init
    n_bytes = sum(v.numel() * v.element_size() for v in init.values())
    dtype = str(next(iter(init.values())).dtype).removeprefix("torch.")
    return [{"run_id": runs[i].run_id, "step": step, "epoch": float(epoch[i]),
             "blob": blob, "member": position, "dtype": dtype, "n_bytes": n_bytes}
            for position, i in enumerate(members) if alive[i]]


def _shard_metadata(zoo: str, plan: CohortPlan, runs: list[RunConfig],
                    tensors: dict[str, torch.Tensor], step: int) -> dict:
    """What makes a shard readable without the tables: layout, architecture, members."""
    layout = [{"name": k, "shape": list(v.shape[1:]),
               "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()]
    return {
        "format": SHARD_FORMAT,
        "zoo": zoo,
        "step": str(step),
        "layout": json.dumps(layout),
        "arch": runs[0].model.model_dump_json(exclude={"init_seed", "init"}),
        "input_shape": json.dumps(list(plan.input_shape)),
        "n_classes": str(plan.n_classes),
        "run_ids": json.dumps([r.run_id for r in runs]),
    }


def _run_row(run: RunConfig, data: DatasetTensors, plan: CohortPlan, cohort_id: str,
             final_step: int, diverged_step: int, train_seconds: float,
             device: torch.device) -> dict:
    t, d = run.train, run.dataset
    return {
        "run_id": run.run_id, "zoo": run.zoo,
        "status": "diverged" if diverged_step >= 0 else "complete",
        "arch": run.model.arch, "dataset": d.name,
        "width": run.model.width, "depth": run.model.depth,
        "n_params": n_params(run.model, data.input_shape, data.n_classes),
        "n_train": int(data.x_train.shape[0]), "label_noise": d.label_noise,
        "optimizer": t.optimizer, "lr": t.lr,
        "momentum": t.momentum if t.optimizer == "sgd" else None,
        "weight_decay": t.weight_decay, "batch_size": t.batch_size, "schedule": t.schedule,
        "epochs": t.epochs, "total_steps": plan.total_steps, "seed": run.seed,
        "init_seed": run.model.init_seed if run.model.init_seed is not None
        else derive_seed(run.seed, "init"),
        "order_seed": t.order_seed if t.order_seed is not None else derive_seed(run.seed, "order"),
        "noise_seed": d.noise_seed if d.noise_seed is not None else derive_seed(run.seed, "noise"),
        "n_classes": data.n_classes, "input_shape": list(data.input_shape),
        "config": json.dumps(run.full(), sort_keys=True),
        "final_step": final_step if final_step >= 0 else None,
        "diverged_step": diverged_step if diverged_step >= 0 else None,
        "parent_run_id": None, "cohort_id": cohort_id,
        "data_hash": data.fingerprint, "device": str(device),
        "train_seconds": train_seconds,
        "dlstore_version": dlstore.__version__, "torch_version": torch.__version__,
    }
