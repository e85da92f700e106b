"""The phase protocol: what a zoo's runs are, in which phases they train, and what a phase adds
to its cohorts. The builder calls an `Experiment`; an experiment never reaches into the builder.

A phase is a set of runs that trains once every earlier phase is committed, so it may read what
they stored (weights to rewind to, masks to prune further). Per cohort, `Phase.prepare` may give
members their start weights and masks before training, and `Phase.finish` may add columns to
their runs rows and return rows of its own (masks) once trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlstore.spec import RunConfig, ZooSpec
from dlstore.store.writer import StoreWriter
from dlstore.training.plan import CohortPlan

Rows = tuple[list[dict], dict[str, list], list[dict]]  # checkpoints, metric columns, runs rows


class Phase:
    """A phase of a plain zoo: nothing to prepare, nothing to add."""

    def prepare(self, plan: CohortPlan, runs: list[RunConfig]) -> None:
        """Give the members of `plan` (the cohort of `runs`) their start weights and masks."""

    def finish(self, rows: Rows, runs: list[RunConfig], zoo: str
               ) -> tuple[list[dict], dict[str, list], list[dict], list[dict]]:
        """The cohort's rows, completed, plus its masks rows."""
        return (*rows, [])


@dataclass
class Experiment:
    """A plain zoo: every run of the spec in one phase."""

    spec: ZooSpec

    def phases(self, shard: tuple[int, int] | None = None) -> list[list[RunConfig]]:
        """The runs by phase; `shard` (I, N): the I-th of N parts that build independently."""
        runs = list(self.spec.runs)
        return [runs if shard is None else shard_runs(runs, *shard)]

    def zoo_runs(self) -> int:
        """The runs of the whole zoo (every shard's)."""
        return len(self.spec.runs)

    def check(self) -> None:
        """Checks beyond the spec's own, before anything is created."""

    def phase(self, index: int, writer: StoreWriter) -> Phase:
        """The phase `index` of the build, reading and writing through `writer`."""
        return Phase()

    def after_phase(self, writer: StoreWriter, phases: list[list[RunConfig]]) -> None:
        """Called once a phase is committed (what needs the phase's runs together)."""


def shard_runs(runs: list[RunConfig], index: int, count: int) -> list[RunConfig]:
    """The index-th of `count` contiguous blocks of `runs`: the same runs whatever the store
    holds, and neighbouring grid points (which share cohorts) stay together."""
    from dlstore.errors import SpecError

    if not 0 <= index < count:
        raise SpecError(f"shard {index}/{count}: give I/N with 0 <= I < N")
    return [r for k, r in enumerate(runs) if k * count // len(runs) == index]


def experiment_for(spec: ZooSpec) -> Experiment:
    """The experiment a spec describes: lottery tickets if it has a [tickets] section."""
    if spec.tickets is not None:
        from dlstore.experiments.tickets import Tickets

        return Tickets(spec)
    return Experiment(spec)
