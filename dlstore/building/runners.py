"""Runners execute a phase's cohorts: the local one trains them one after another in this
process (`dlstore.building.ray` fans them out over a Ray cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from dlstore.building.cohort import CohortResult, build_cohort
from dlstore.building.plan import Cohorts
from dlstore.experiments.tickets import (
    TicketPhase,
)
from dlstore.metrics.families import MetricsOptions
from dlstore.store.store import Store

# (zoo, cohorts, their step counts, the tickets phase or None, progress(steps done)) -> results
Runner = Callable[[str, Cohorts, list[int], TicketPhase | None, Callable[[int], None]],
                  Iterator[CohortResult]]


def local_runner(store: Store, device: torch.device, metrics: MetricsOptions) -> Runner:
    """Cohorts one after another in this process."""

    def execute(zoo: str, cohorts: Cohorts, steps: list[int], phase: TicketPhase | None,
                progress: Callable[[int], None]) -> Iterator[CohortResult]:
        for k, (runs, datas) in enumerate(cohorts):
            def on_step(step: int, offset: int = sum(steps[:k]) - runs[0].start_step) -> None:
                progress(offset + step)

            yield build_cohort(zoo, runs, datas, store, device, metrics, on_step, phase)

    return execute
