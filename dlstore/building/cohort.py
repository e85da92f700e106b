"""One cohort trained and stored: shards written while it trains, its checkpoints, metrics and
runs rows returned for the committer. Shared by every backend.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

import dlstore
from dlstore.architectures.base import n_params
from dlstore.building.plan import cohort_plan
from dlstore.datasets.base import DatasetTensors
from dlstore.experiments.base import Phase
from dlstore.metrics.evaluate import empty_metric_columns, metric_columns
from dlstore.metrics.families import MetricsOptions
from dlstore.seeds import seed_for
from dlstore.spec import RunConfig
from dlstore.stacks import member_slices
from dlstore.store.writer import StoreWriter
from dlstore.training.cohort import CohortTrainer, shape_groups
from dlstore.training.plan import CohortPlan


@dataclass
class CohortResult:
    """A trained cohort whose shards are in the store: the rows that make it visible (committed
    by `Committer`, runs rows last) and what the build report counts."""

    checkpoints: list[dict]
    metrics: dict[str, list]
    runs: list[dict]
    n_checkpoints: int
    train_seconds: float
    masks: list[dict] = field(default_factory=list)  # lottery-ticket masks found


def build_cohort(zoo: str, runs: list[RunConfig], datas: list[DatasetTensors],
                 writer: StoreWriter, device: torch.device, metrics: MetricsOptions,
                 on_step: Callable[[int], None] | None = None, phase: Phase | None = None
                 ) -> CohortResult:
    """Train one cohort, evaluating each checkpoint here while a background thread writes its
    shards to the store; return its rows once every shard they point to is stored. Shared by
    every backend; the caller commits the rows.

    Only the writing (serialising and hashing, which release the GIL) goes to the background:
    with any torch work on the writer thread too (evaluation, slicing), a 1,000-run CPU build
    took 74-96 s instead of 45 s, its training steps slowed 2-3x by the second thread."""
    phase = phase or Phase()
    plan = cohort_plan(runs, datas, metrics)
    phase.prepare(plan, runs)
    trainer = CohortTrainer(plan, device, on_step=on_step)
    groups = shape_groups(plan.members)
    # (shard future, step, epoch, alive, members): never the snapshot, whose weights may be on a GPU
    pending: list[tuple] = []
    metric_rows = empty_metric_columns()
    last_step = [-1] * len(runs)
    arch_json = runs[0].model.model_dump_json(exclude={"init_seed", "init"})
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlstore-writer") as background:
        for ck in trainer.run():
            params = {k: v.cpu() for k, v in ck.params.items()}
            for members in groups:
                tensors = member_slices(params, plan.members[members[0]].init, members)
                shard = {"zoo": zoo, "step": ck.step, "arch_json": arch_json,
                         "input_shape": plan.input_shape, "n_classes": plan.n_classes,
                         "run_ids": [runs[i].run_id for i in members]}
                pending.append((background.submit(writer.put_cohort_shard, tensors, **shard),
                                ck.step, ck.epoch, ck.alive, members))
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
    checkpoints, metric_rows, run_rows, masks = phase.finish(
        (checkpoints, metric_rows, run_rows), runs, zoo)
    n_checkpoints = len({step for _, step, *_ in pending})
    return CohortResult(checkpoints, metric_rows, run_rows, n_checkpoints, trainer.train_seconds,
                        masks)


def _checkpoint_rows(blob: str, step: int, epoch: torch.Tensor, alive: torch.Tensor,
                     members: list[int], runs: list[RunConfig], plan: CohortPlan) -> list[dict]:
    init = plan.members[members[0]].init
    n_bytes = sum(v.numel() * v.element_size() for v in init.values())
    dtype = str(next(iter(init.values())).dtype).removeprefix("torch.")
    return [{"run_id": runs[i].run_id, "step": step, "epoch": float(epoch[i]),
             "blob": blob, "member": position, "dtype": dtype, "n_bytes": n_bytes}
            for position, i in enumerate(members) if alive[i]]


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
        "init_seed": seed_for(run.model.init_seed, run.seed, "init"),
        "order_seed": seed_for(t.order_seed, run.seed, "order"),
        "noise_seed": seed_for(d.noise_seed, run.seed, "noise"),
        "n_classes": data.n_classes, "input_shape": list(data.input_shape),
        "config": json.dumps(run.full(), sort_keys=True),
        "final_step": final_step if final_step >= 0 else None,
        "diverged_step": diverged_step if diverged_step >= 0 else None,
        "parent_run_id": None, "cohort_id": cohort_id,
        "data_hash": data.fingerprint, "device": str(device),
        "train_seconds": train_seconds,
        "dlstore_version": dlstore.__version__, "torch_version": torch.__version__,
    }
