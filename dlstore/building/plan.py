"""Planning a build before anything is created: the runs by phase, those still to build, their
cohorts (runs that can train together) and step counts, every spec check passed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from dlstore.architectures.base import init_state
from dlstore.building.limits import Estimate, check_length, check_memory, estimate_cohorts
from dlstore.datasets.base import DatasetTensors, run_data
from dlstore.errors import SpecError
from dlstore.experiments.base import experiment_for
from dlstore.metrics.families import MetricsOptions
from dlstore.metrics.steps import checkpoint_metric_steps
from dlstore.seeds import seed_for
from dlstore.spec import RunConfig, ZooSpec
from dlstore.training.device import auto_cohort_size, resolve_device
from dlstore.training.plan import CohortPlan, MemberPlan


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
        run.model.check_targets(data.y_train.dim() == 2, run.dataset.name)
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
        order_seed=seed_for(t.order_seed, run.seed, "order"),
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
        start_step=first.start_step, entropy_rate=data.entropy_rate,
    )


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


def plan_build(spec: ZooSpec, device: str = "auto", shard: tuple[int, int] | None = None,
               done_ids: frozenset[str] = frozenset(), plan_device: str | None = None) -> BuildPlan:
    """Check everything about `spec` that can be checked without a store (sizes against memory
    first, before any data is generated) and plan the runs not in `done_ids`; cohort sizes are
    chosen for `plan_device` (default: `device` resolved)."""
    dev = resolve_device(device)
    experiment = experiment_for(spec)
    phases = experiment.phases(shard)
    zoo_runs = experiment.zoo_runs()
    check_memory([r for phase in phases for r in phase], spec.build.cohort_size, dev)
    experiment.check()
    todo = [[r for r in phase if r.run_id not in done_ids] for phase in phases]
    plan_device = plan_device or str(dev)
    planned = [plan_cohorts(runs, spec.build.cohort_size, device=plan_device, metrics=spec.metrics)
               for runs in todo]
    steps = [[runs[0].train.total_steps(datas[0].x_train.shape[0]) - runs[0].start_step
              for runs, datas in cohorts] for cohorts in planned]
    return BuildPlan(phases, zoo_runs, frozenset(done_ids), todo, planned, steps, plan_device)


Cohorts = list[tuple[list[RunConfig], list[DatasetTensors]]]
