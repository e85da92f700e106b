"""Checkpoint metrics added to runs already in a store: what a spec's `[metrics]` asks for that
the store lacks (a rebuild skips complete runs, so it never computes metrics added to a spec
after its runs were built).

Checkpoints are read back through the store, one shard at a time (the members of a shard share
their shapes, so one evaluation covers them), evaluated with the same `CheckpointEvaluator` the
builder uses, on the data each run trained on (regenerated and checked against its
fingerprint), and appended under each run's commit id. A (run, step, family) already recorded is
skipped, so the command can be rerun after an interruption.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from dlstore.architectures.registry import run_kernel
from dlstore.metrics.evaluate import CheckpointEvaluator, empty_metric_columns, metric_columns
from dlstore.metrics.families import MetricsOptions
from dlstore.metrics.steps import checkpoint_metric_steps
from dlstore.stacks import stack_labels
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter


class PlannedRun(Protocol):
    """A run as its spec plans it (`dlstore.spec.RunConfig`): its id and checkpoint steps."""

    run_id: str

    def checkpoint_steps(self, total_steps: int) -> list[int]: ...


def missing_checkpoint_metrics(store: Store, zoo: str, planned: Sequence[PlannedRun],
                               options: MetricsOptions) -> dict[tuple[str, int], set[str]]:
    """(run_id, step) -> the families `options` selects there that the store lacks, for the
    `planned` runs of `zoo` that the store holds (complete or diverged)."""
    runs = store.sql("SELECT run_id, total_steps FROM runs WHERE zoo = ?", [zoo]).to_dicts()
    wanted_ids = {r.run_id for r in planned}
    total_steps = {r["run_id"]: r["total_steps"] for r in runs if r["run_id"] in wanted_ids}
    present = set(total_steps)
    if not present:
        return {}
    # a metric whose row marks a family as recorded at a (run, step): each family declares it
    markers = {name: family.marker_name() for name, family in options.families}
    checkpoints = store.sql("SELECT run_id, list(step ORDER BY step) AS steps FROM checkpoints "
                            "WHERE list_contains(?, run_id) GROUP BY run_id",
                            [sorted(present)]).to_dicts()
    have = {(r["run_id"], r["step"], r["metric"]) for r in store.sql(
        "SELECT DISTINCT run_id, step, metric FROM metrics WHERE list_contains(?, run_id) "
        "AND list_contains(?, metric)",
        [sorted(present), sorted(set(markers.values()))]).to_dicts()}
    configs = {r.run_id: r for r in planned}
    missing: dict[tuple[str, int], set[str]] = {}
    for row in checkpoints:
        # the steps the spec would have saved: `at = "last"` means the run's planned last step
        steps = configs[row["run_id"]].checkpoint_steps(total_steps[row["run_id"]])
        selected = checkpoint_metric_steps(options, steps)
        for family, marker in markers.items():
            for step in selected[family] & set(row["steps"]):
                if (row["run_id"], step, marker) not in have:
                    missing.setdefault((row["run_id"], step), set()).add(family)
    return missing


def backfill_checkpoint_metrics(writer: StoreWriter, zoo: str, planned: Sequence[PlannedRun],
                                options: MetricsOptions, device: str | torch.device = "cpu",
                                progress: Callable[[int, int], None] | None = None) -> int:
    """Compute and append the checkpoint metrics `options` selects for the `planned` runs of
    `zoo` that the store lacks; returns the number of (run, step) checkpoints that gained
    metrics."""
    store = writer.store
    missing = missing_checkpoint_metrics(store, zoo, planned, options)
    if not missing:
        return 0
    ids = sorted({run_id for run_id, _ in missing})
    rows = store.sql("SELECT run_id, step, blob, member FROM checkpoints "
                     "WHERE list_contains(?, run_id) ORDER BY blob, member", [ids]).to_dicts()
    shards: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        if (row["run_id"], row["step"]) in missing:
            shards.setdefault((row["blob"], row["step"]), []).append(row)
    done = 0
    for k, ((blob, step), members) in enumerate(shards.items()):
        families = set().union(*(missing[(m["run_id"], step)] for m in members))
        values = _evaluate(options, store, blob, step, members, families, torch.device(device))
        columns = empty_metric_columns()
        for family in families:
            keep = [i for i, m in enumerate(members) if family in missing[(m["run_id"], step)]]
            part = metric_columns(_family_values(values, options.get(family)), step,
                                  [members[i]["run_id"] for i in keep], keep)
            for name, items in part.items():
                columns[name] += items
        writer.add_metrics(columns)
        done += len(members)
        if progress:
            progress(k + 1, len(shards))
    return done


def _family_values(values: dict, family) -> dict:
    """The evaluator's values that belong to `family` (the names it declares)."""
    names = set(family.values)
    return {k: v for k, v in values.items()
            if (isinstance(k, tuple) and family.per_tensor and k[0] in names)
            or (not isinstance(k, tuple) and not family.per_tensor and k in names)}


def _evaluate(options: MetricsOptions, store: Store, blob: str, step: int, members: list[dict],
              families: set[str], device: torch.device) -> dict:
    """Evaluate `families` for the members of one shard at `step`, as the builder would have."""
    params = {k: v.to(device) for k, v in
              store.load_members(blob, [m["member"] for m in members]).items()}
    run = store.run(members[0]["run_id"])
    kernel = run_kernel(run)
    datas = [store.load_dataset(m["run_id"]) for m in members]
    y_train, n_train = stack_labels([d["y_train"] for d in datas])
    largest = int(n_train.argmax())
    evaluator = CheckpointEvaluator(
        kernel, init={}, x_train=datas[largest]["x_train"].to(device),
        y_train=y_train.to(device), n_train=n_train.to(device),
        x_test=datas[0]["x_test"].to(device),
        y_test=datas[0]["y_test"].to(device), chunk=1024, n_classes=run["n_classes"],
        shape_groups=[list(range(len(members)))],
        shapes=[{k: v[0] for k, v in params.items()}], masks={}, options=options,
        steps={family: {step} for family in families})
    return evaluator(params, step)
