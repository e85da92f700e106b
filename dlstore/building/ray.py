"""Cohorts as Ray tasks: the same build as the local one, fanned out over a cluster.

The driver plans the cohorts exactly as a local build does, phase by phase, and commits their
rows the same way (batched, runs rows last, one commit id per batch); each task opens the store
itself, takes its phase from the experiment (a tickets level reads the masks and rewind weights
earlier phases committed), trains one cohort with the shared `build_cohort` and writes its
shards there. A task that dies (its worker
or node lost) or fails to reach the store is retried; shards are content-addressed, so a retry
rewrites identical bytes under the same names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from dlstore.building.cohort import CohortResult, build_cohort
from dlstore.building.plan import Cohorts
from dlstore.building.runners import Runner
from dlstore.errors import StoreError, UsageError
from dlstore.experiments.base import Experiment
from dlstore.metrics.families import MetricsOptions
from dlstore.spec import RunConfig
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter

RETRIES = 3


def cohort_runner(store: Store, experiment: Experiment, device: str, address: str | None,
                  metrics: MetricsOptions) -> tuple[Runner, str]:
    """(a runner that yields cohort results as Ray tasks finish, the device the tasks train on).
    Connects to the cluster at `address`, or starts a local Ray instance unless one is up."""
    try:
        import ray
    except ImportError:
        raise UsageError("--backend ray needs Ray: pip install 'dlstore[ray]'") from None
    if not ray.is_initialized():
        extra = {} if address else {"include_dashboard": False}
        ray.init(address=address, logging_level=logging.WARNING, **extra)
    gpus = 1 if device == "cuda" or (
        device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1) else 0
    task_device = "cuda" if gpus else "cpu"
    task = ray.remote(_cohort_task).options(
        num_gpus=gpus, max_retries=RETRIES, retry_exceptions=[StoreError, OSError])
    # the store as another process opens it (a local path must be shared by the workers)
    root = str(store.root)
    options = store.storage_options

    def execute(cohorts: Cohorts, steps: list[int], index: int,
                progress: Callable[[int], None]) -> Iterator[CohortResult]:
        pending = {task.remote(root, options, experiment, index, runs, task_device, metrics): k
                   for k, (runs, _) in enumerate(cohorts)}
        done = 0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                k = pending.pop(ready[0])
                result = ray.get(ready[0])
                done += steps[k]
                progress(done)
                yield result
        finally:  # a failure (or an interrupted driver) stops the rest of the build
            for ref in pending:
                ray.cancel(ref, force=True)

    return execute, task_device


def _cohort_task(root: str | Path, storage_options: dict[str, str], experiment: Experiment,
                 index: int, runs: list[RunConfig], device: str, metrics: MetricsOptions
                 ) -> CohortResult:
    from dlstore.datasets.base import run_data
    from dlstore.training.device import resolve_device

    writer = StoreWriter(Store(root, storage_options=storage_options))
    datas = [run_data(r.dataset, r.seed) for r in runs]  # regenerated here: nothing large travels
    # the phase reads what earlier phases committed (a tickets level: masks, rewind weights)
    phase = experiment.phase(index, writer)
    return build_cohort(experiment.spec.name, runs, datas, writer, resolve_device(device),
                        metrics, phase=phase)
