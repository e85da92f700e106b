"""Which checkpoints a metric family runs at: `at = "all" | "last" | [steps]` against the steps
a run saves."""

from __future__ import annotations

from dlstore.errors import SpecError
from dlstore.metrics.families import CheckpointSelection, MetricsOptions


def selected_steps(selection: CheckpointSelection | None, steps: list[int], field: str
                   ) -> set[int]:
    """The checkpoint steps a metric's `at` selects among a run's checkpoint `steps` (sorted)."""
    if selection is None:
        return set()
    if selection == "all":
        return set(steps)
    if selection == "last":
        return {steps[-1]}
    missing = sorted(set(selection) - set(steps))
    if missing:
        raise SpecError(f"{field}: step {missing[0]} is not a checkpoint step of every run "
                        f"(checkpoints at {steps})")
    return set(selection)


def checkpoint_metric_steps(options: MetricsOptions, steps: list[int]) -> dict[str, set[int]]:
    """For each selected family of checkpoint metrics, the steps (among a cohort's checkpoint
    `steps`) at which the spec asks for it; a SpecError names a selected step that is no
    checkpoint."""
    return {name: selected_steps(family.at, steps, f"metrics.{name}" if family.shorthand
                                 else f"metrics.{name}.at")
            for name, family in options.families}
