"""Plan -> cohorts -> train -> commit: builds a zoo spec into a store, resumably.

Runs already in the store are skipped, so rerunning a spec after a crash (or after it finished)
trains only what is missing and adds nothing when nothing is. Each cohort's shards are written as
its checkpoints arrive; its rows are committed when it finishes, runs rows last.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

import dlstore
from dlstore.errors import SpecError
from dlstore.store.store import Store
from dlstore.zoo.data import DatasetTensors, run_data
from dlstore.zoo.models import init_state, n_params
from dlstore.zoo.population import CohortPlan, CohortTrainer, MemberPlan, resolve_device
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
    return json.dumps([generation, run.model.shape_key(), run.train.optimizer,
                       run.train.schedule, run.train.batch_size, total_steps, steps])


def plan_cohorts(runs: list[RunConfig], cohort_size: int
                 ) -> list[tuple[list[RunConfig], list[DatasetTensors]]]:
    """Group runs into cohorts (in spec order), each with every member's own data."""
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
        for start in range(0, len(members), cohort_size):
            chunk = members[start:start + cohort_size]
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
    widest = max(range(len(datas)), key=lambda i: datas[i].x_train.shape[0])
    total = first.train.total_steps(data.x_train.shape[0])
    return CohortPlan(
        arch=first.model, input_shape=data.input_shape, n_classes=data.n_classes,
        optimizer=first.train.optimizer, schedule=first.train.schedule,
        batch_size=first.train.batch_size, total_steps=total,
        checkpoint_steps=first.checkpoint_steps(total),
        x_train=datas[widest].x_train, x_test=data.x_test, y_test=data.y_test,
        members=[_member(r, d) for r, d in zip(runs, datas)],
    )


def build_zoo(spec: ZooSpec, store: Store, device: str = "auto",
              progress: Callable[[int, int], None] | None = None) -> BuildReport:
    """Train every run of `spec` that `store` does not hold yet and commit it.

    `progress(done, total)` is called with optimizer steps done (summed over cohorts)."""
    started = time.perf_counter()
    dev = resolve_device(device)
    done_ids = store.run_ids()
    todo = [r for r in spec.runs if r.run_id not in done_ids]
    cohorts = plan_cohorts(todo, spec.build.cohort_size)
    plans = [cohort_plan(runs, datas) for runs, datas in cohorts]
    total_work = sum(p.total_steps for p in plans)
    report = BuildReport(spec.name, len(spec.runs), len(spec.runs) - len(todo), 0, 0,
                         len(plans), 0, 0.0, 0.0)
    work_done = 0
    for (runs, datas), plan in zip(cohorts, plans):
        trainer = CohortTrainer(plan, dev)
        checkpoint_rows: list[dict] = []
        metric_rows: list[dict] = []
        last_step = [-1] * len(runs)
        for ck in trainer.run():
            blob = store.put_shard(ck.params, _shard_metadata(spec.name, plan, runs, ck.step))
            member_bytes = sum(v[0].numel() * v.element_size() for v in ck.params.values())
            dtype = str(next(iter(ck.params.values())).dtype).removeprefix("torch.")
            for i, run in enumerate(runs):
                if not ck.alive[i]:
                    continue
                last_step[i] = ck.step
                checkpoint_rows.append({
                    "run_id": run.run_id, "step": ck.step, "epoch": float(ck.epoch[i]),
                    "blob": blob, "member": i, "dtype": dtype, "n_bytes": member_bytes})
                for name, values in ck.metrics.items():
                    metric_rows.append({"run_id": run.run_id, "step": ck.step, "metric": name,
                                        "tensor": None, "value": float(values[i])})
            report.checkpoints += 1
            if progress:
                progress(work_done + ck.step, total_work)
        work_done += plan.total_steps
        cohort_id = uuid.uuid4().hex[:16]
        run_rows = [
            _run_row(run, data, plan, cohort_id, last_step[i],
                     int(trainer.diverged_step[i]), trainer.train_seconds / len(runs), dev)
            for i, (run, data) in enumerate(zip(runs, datas))
        ]
        store.commit(checkpoint_rows, metric_rows, run_rows)
        report.runs_built += len(runs)
        report.runs_diverged += sum(r["status"] == "diverged" for r in run_rows)
        report.train_seconds += trainer.train_seconds
        if progress:
            progress(work_done, total_work)
    store.record_zoo({"zoo": spec.name, "spec": spec.text, "spec_hash": spec.spec_hash,
                      "n_runs": len(spec.runs), "dlstore_version": dlstore.__version__})
    report.seconds = time.perf_counter() - started
    return report


def _shard_metadata(zoo: str, plan: CohortPlan, runs: list[RunConfig], step: int) -> dict:
    """What makes a shard readable without the tables: layout, architecture, members."""
    first = plan.members[0].init
    layout = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
              for k, v in first.items()]
    return {
        "format": SHARD_FORMAT,
        "zoo": zoo,
        "step": str(step),
        "layout": json.dumps(layout),
        "arch": plan.arch.model_dump_json(exclude={"init_seed"}),
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
        "data_hash": data.fingerprint(), "device": str(device),
        "train_seconds": train_seconds,
        "dlstore_version": dlstore.__version__, "torch_version": torch.__version__,
    }
