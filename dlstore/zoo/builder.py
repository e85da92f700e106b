"""Plan -> cohorts -> train -> commit: builds a zoo spec into a store, resumably.

Runs already in the store are skipped, so rerunning a spec after a crash (or after it finished)
trains only what is missing and adds nothing when nothing is. Each cohort's shards are written as
its checkpoints arrive; its rows are committed when it finishes, runs rows last.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

import dlstore
from dlstore.errors import SpecError
from dlstore.store.store import Store
from dlstore.zoo.data import DatasetTensors, run_data
from dlstore.zoo.models import activation_units, init_state, n_params
from dlstore.zoo.population import (
    Checkpoint,
    CohortPlan,
    CohortTrainer,
    MemberPlan,
    auto_cohort_size,
    resolve_device,
)
from dlstore.zoo.seeds import derive_seed
from dlstore.zoo.spec import RunConfig, ZooSpec

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


def cohort_key(run: RunConfig, total_steps: int, steps: list[int]) -> str:
    """What must be equal for runs to step together (see CohortPlan)."""
    generation = run.dataset.model_dump(mode="json",
                                        exclude={"n_train", "label_noise", "noise_seed"})
    return json.dumps([generation, run.model.family_key(), run.train.optimizer,
                       run.train.schedule, run.train.batch_size, total_steps, steps])


def plan_cohorts(runs: list[RunConfig], cohort_size: int | str = "auto", device: str = "cpu"
                 ) -> list[tuple[list[RunConfig], list[DatasetTensors]]]:
    """Group runs into cohorts (in spec order), each with every member's own data. Groups larger
    than the cohort size are split into near-equal cohorts."""
    groups: dict[str, list[tuple[RunConfig, DatasetTensors]]] = {}
    for run in runs:
        data = run_data(run.dataset, run.seed)
        n_train = data.x_train.shape[0]
        if run.train.batch_size > n_train:
            raise SpecError(f"train.batch_size: {run.train.batch_size} is larger than the "
                            f"{n_train} training examples of run {run.run_id}")
        total = run.train.total_steps(n_train)
        steps = run.checkpoint_steps(total)
        groups.setdefault(cohort_key(run, total, steps), []).append((run, data))
    cohorts = []
    for members in groups.values():
        size = cohort_size
        if size == "auto":
            run, data = max(members, key=lambda m: m[0].model.width)
            size = auto_cohort_size(
                n_params(run.model, data.input_shape, data.n_classes),
                activation_units(run.model, data.input_shape, data.n_classes),
                run.train.batch_size, resolve_device(device))
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


def cohort_plan(runs: list[RunConfig], datas: list[DatasetTensors]) -> CohortPlan:
    first, data = runs[0], datas[0]
    largest = max(range(len(datas)), key=lambda i: datas[i].x_train.shape[0])
    total = first.train.total_steps(data.x_train.shape[0])
    return CohortPlan(
        arch=max((r.model for r in runs), key=lambda m: m.width),
        input_shape=data.input_shape, n_classes=data.n_classes,
        optimizer=first.train.optimizer, schedule=first.train.schedule,
        batch_size=first.train.batch_size, total_steps=total,
        checkpoint_steps=first.checkpoint_steps(total),
        x_train=datas[largest].x_train, x_test=data.x_test, y_test=data.y_test,
        members=[_member(r, d) for r, d in zip(runs, datas)],
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


class _Committer:
    """Collects finished cohorts' rows and commits them in batches (runs rows last, one commit
    id): fewer, larger table files. A crash loses at most the cohorts since the last commit; a
    rebuild retrains them."""

    def __init__(self, store: Store, every: float):
        self.store = store
        self.every = every
        self.last = time.perf_counter()
        self._clear()

    def _clear(self) -> None:
        self.checkpoints: list[dict] = []
        self.metrics: dict[str, list] = _metric_columns()
        self.runs: list[dict] = []

    def add(self, result: CohortResult) -> None:
        self.checkpoints += result.checkpoints
        for k, values in result.metrics.items():
            self.metrics[k] += values
        self.runs += result.runs
        if time.perf_counter() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.runs:
            self.store.commit(self.checkpoints, self.metrics, self.runs)
        self._clear()
        self.last = time.perf_counter()


def build_zoo(spec: ZooSpec, store: Store, device: str = "auto",
              progress: Callable[[int, int], None] | None = None, backend: str = "local",
              address: str | None = None, shard: tuple[int, int] | None = None) -> BuildReport:
    """Train every run of `spec` that `store` does not hold yet and commit it.

    `backend` "local" trains the cohorts one after another in this process; "ray" runs each
    cohort as a Ray task (on the cluster at `address`, or a local one). `shard=(i, n)` builds
    only the i-th of n contiguous blocks of the spec's runs (0 <= i < n), e.g. one Slurm array
    task each. `progress(done, total)` is called with optimizer steps done (summed over
    cohorts; per step locally, per finished cohort on Ray)."""
    started = time.perf_counter()
    dev = resolve_device(device) if backend == "local" else None
    store.check_writable()
    runs = spec.runs if shard is None else shard_runs(spec.runs, *shard)
    done_ids = store.run_ids()
    todo = [r for r in runs if r.run_id not in done_ids]
    if backend == "ray":
        from dlstore.zoo import ray_backend

        execute, plan_device = ray_backend.cohort_runner(store, device, address)
    else:
        execute, plan_device = _local_runner(store, dev), str(dev)
    cohorts = plan_cohorts(todo, spec.build.cohort_size, device=plan_device)
    steps = [runs[0].train.total_steps(datas[0].x_train.shape[0]) for runs, datas in cohorts]
    report = BuildReport(spec.name, len(runs), len(runs) - len(todo), 0, 0, len(cohorts), 0,
                         0.0, 0.0)
    committer = _Committer(store, spec.build.commit_every)
    total = sum(steps)
    for result in execute(spec.name, cohorts, steps,
                          (lambda done: progress(done, total)) if progress else None):
        committer.add(result)
        report.runs_built += len(result.runs)
        report.runs_diverged += sum(r["status"] == "diverged" for r in result.runs)
        report.checkpoints += result.n_checkpoints
        report.train_seconds += result.train_seconds
    committer.flush()
    store.record_zoo({"zoo": spec.name, "spec": spec.text, "spec_hash": spec.spec_hash,
                      "n_runs": len(spec.runs), "dlstore_version": dlstore.__version__})
    report.seconds = time.perf_counter() - started
    return report


def shard_runs(runs: list[RunConfig], index: int, count: int) -> list[RunConfig]:
    """The index-th of `count` contiguous blocks of `runs`: the same runs whatever the store
    holds, and neighbouring grid points (which share cohorts) stay together."""
    if not 0 <= index < count:
        raise SpecError(f"shard {index}/{count}: give I/N with 0 <= I < N")
    return [r for k, r in enumerate(runs) if k * count // len(runs) == index]


Cohorts = list[tuple[list[RunConfig], list[DatasetTensors]]]
Runner = Callable[[str, Cohorts, list[int], Callable[[int], None] | None],
                  Iterator[CohortResult]]


def _local_runner(store: Store, device: torch.device) -> Runner:
    """Cohorts one after another in this process."""

    def execute(zoo: str, cohorts: Cohorts, steps: list[int],
                progress: Callable[[int], None] | None) -> Iterator[CohortResult]:
        for k, (runs, datas) in enumerate(cohorts):
            offset = sum(steps[:k])

            def on_step(step: int, offset: int = offset) -> None:
                if progress:
                    progress(offset + step)

            yield build_cohort(zoo, runs, datas, store, device, on_step)

    return execute


# Checkpoints waiting for the background thread at most; training waits beyond that, so that
# snapshots never pile up in memory when evaluating and writing is slower than training.
MAX_PENDING_CHECKPOINTS = 4


def build_cohort(zoo: str, runs: list[RunConfig], datas: list[DatasetTensors], store: Store,
                 device: torch.device, on_step: Callable[[int], None] | None = None
                 ) -> CohortResult:
    """Train one cohort while a background thread evaluates its checkpoints and writes their
    shards to the store (torch and hashing release the GIL); return its rows once every shard
    they point to is stored. Shared by every backend; the caller commits the rows."""
    trainer = CohortTrainer(cohort_plan(runs, datas), device, on_step=on_step)
    plan = trainer.plan
    groups = _shape_groups(plan)
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlstore-writer") as writer:
        for ck in trainer.run():
            pending.append(writer.submit(_record_checkpoint, zoo, ck, runs, plan, groups, store))
            if len(pending) > MAX_PENDING_CHECKPOINTS:
                pending[-MAX_PENDING_CHECKPOINTS - 1].result()
        checkpoints: list[dict] = []
        metrics = _metric_columns()
        last_step = [-1] * len(runs)
        for future in pending:
            ck_rows, ck_metrics, alive, step = future.result()
            checkpoints += ck_rows
            for k, values in ck_metrics.items():
                metrics[k] += values
            for i in alive:
                last_step[i] = step
    cohort_id = uuid.uuid4().hex[:16]
    run_rows = [_run_row(run, data, plan, cohort_id, last_step[i], int(trainer.diverged_step[i]),
                         trainer.train_seconds / len(runs), trainer.device)
                for i, (run, data) in enumerate(zip(runs, datas))]
    return CohortResult(checkpoints, metrics, run_rows, len(pending), trainer.train_seconds)


def _metric_columns() -> dict[str, list]:
    return {k: [] for k in ("run_id", "step", "metric", "tensor", "value")}


def _record_checkpoint(zoo: str, ck: Checkpoint, runs: list[RunConfig], plan: CohortPlan,
                       groups: list[list[int]], store: Store
                       ) -> tuple[list[dict], dict[str, list], list[int], int]:
    """Evaluate a checkpoint snapshot and write its shards (on the writer thread): returns its
    checkpoint rows, its metric columns, the members alive at it, and its step."""
    alive = ck.alive.nonzero().flatten().tolist()
    ids = [runs[i].run_id for i in alive]
    metrics = _metric_columns()
    for name, values in ck.metrics.items():
        metrics["run_id"] += ids
        metrics["step"] += [ck.step] * len(ids)
        metrics["metric"] += [name] * len(ids)
        metrics["tensor"] += [None] * len(ids)
        metrics["value"] += values[alive].tolist()
    params = {k: v.cpu() for k, v in ck.params.items()}
    rows = []
    for members in groups:
        tensors = _member_slices(params, plan, members)
        meta = _shard_metadata(zoo, plan, [runs[i] for i in members], tensors, ck.step)
        rows += _checkpoint_rows(store.put_shard(tensors, meta), ck, members, runs, plan)
    return rows, metrics, alive, ck.step


def _shape_groups(plan: CohortPlan) -> list[list[int]]:
    """Members with identical true parameter shapes: each group gets its own shard per step, so
    shards hold every member at its own shape, never padded."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(plan.members):
        groups.setdefault(tuple(tuple(v.shape) for v in m.init.values()), []).append(i)
    return list(groups.values())


def _member_slices(params: dict[str, torch.Tensor], plan: CohortPlan,
                   members: list[int]) -> dict[str, torch.Tensor]:
    shapes = plan.members[members[0]].init
    index = torch.tensor(members)
    return {k: v.index_select(0, index)[(slice(None), *(slice(0, n) for n in shapes[k].shape))]
            .contiguous() for k, v in params.items()}


def _checkpoint_rows(blob: str, ck: Checkpoint, members: list[int], runs: list[RunConfig],
                     plan: CohortPlan) -> list[dict]:
    init = plan.members[members[0]].init
    n_bytes = sum(v.numel() * v.element_size() for v in init.values())
    dtype = str(next(iter(init.values())).dtype).removeprefix("torch.")
    return [{"run_id": runs[i].run_id, "step": ck.step, "epoch": float(ck.epoch[i]),
             "blob": blob, "member": position, "dtype": dtype, "n_bytes": n_bytes}
            for position, i in enumerate(members) if ck.alive[i]]


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
        "arch": runs[0].model.model_dump_json(exclude={"init_seed"}),
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
