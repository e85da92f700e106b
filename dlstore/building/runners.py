"""Runners execute a phase's cohorts: the local one trains them one after another in this
process (`dlstore.building.ray` fans them out over a Ray cluster). Either way a cohort is
`build_cohort` with the experiment's phase, and its rows come back for the committer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from dlstore.building.cohort import CohortResult, build_cohort
from dlstore.building.plan import Cohorts
from dlstore.experiments.base import Experiment
from dlstore.metrics.families import MetricsOptions
from dlstore.store.writer import StoreWriter

# (cohorts, their step counts, the phase's index, progress(steps done)) -> results
Runner = Callable[[Cohorts, list[int], int, Callable[[int], None]], Iterator[CohortResult]]


def local_runner(writer: StoreWriter, experiment: Experiment, device: torch.device,
                 metrics: MetricsOptions) -> Runner:
    """Cohorts one after another in this process."""
    zoo = experiment.spec.name

    def execute(cohorts: Cohorts, steps: list[int], index: int,
                progress: Callable[[int], None]) -> Iterator[CohortResult]:
        phase = experiment.phase(index, writer)  # shared by the phase's cohorts (its caches)
        for k, (runs, datas) in enumerate(cohorts):
            def on_step(step: int, offset: int = sum(steps[:k]) - runs[0].start_step) -> None:
                progress(offset + step)

            yield build_cohort(zoo, runs, datas, writer, device, metrics, on_step, phase)

    return execute
