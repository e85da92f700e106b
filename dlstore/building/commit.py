"""The commit side of a build: finished cohorts' rows collected and committed in batches through
the store's writer (runs rows last, one commit id per batch).
"""

from __future__ import annotations

import time

from dlstore.building.cohort import CohortResult
from dlstore.interrupts import deferred_interrupts
from dlstore.metrics.evaluate import empty_metric_columns
from dlstore.store.writer import StoreWriter


class Committer:
    """Collects finished cohorts' rows and commits them in batches (runs rows last, one commit
    id): fewer, larger table files. A crash loses at most the cohorts since the last commit; a
    rebuild retrains them."""

    def __init__(self, writer: StoreWriter, every: float):
        self.writer = writer
        self.every = every
        self.last = time.perf_counter()
        self.committed = 0  # runs
        self.dropped = 0  # runs left out because their shards were gone
        self._clear()

    def _clear(self) -> None:
        self.checkpoints: list[dict] = []
        self.metrics: dict[str, list] = empty_metric_columns()
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
                self.writer.commit(*batch)
                self.committed += len(batch[2])
        self.last = time.perf_counter()

    def _drop_runs_without_shards(self) -> None:
        """Leave out runs whose shards are gone: removed by gc while this build was stopped for
        longer than its lease lives (leases.py); a rebuild trains them again."""
        blobs = {row["blob"] for row in [*self.checkpoints, *self.masks]}
        gone = self.writer.store.blobs.missing(blobs)
        if not gone:
            return
        lost = {row["run_id"] for row in [*self.checkpoints, *self.masks] if row["blob"] in gone}
        self.dropped += len(lost)
        self.runs = [r for r in self.runs if r["run_id"] not in lost]
        self.checkpoints = [r for r in self.checkpoints if r["run_id"] not in lost]
        self.masks = [r for r in self.masks if r["run_id"] not in lost]
