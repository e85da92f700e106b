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

from collections.abc import Callable

import torch

from dlstore.architectures.kernels import kernel_for
from dlstore.architectures.registry import parse_arch_options
from dlstore.metrics.evaluate import CheckpointEvaluator, metric_columns
from dlstore.metrics.steps import checkpoint_metric_steps
from dlstore.spec import ZooSpec
from dlstore.store.store import Store


def missing_checkpoint_metrics(spec: ZooSpec, store: Store) -> dict[tuple[str, int], set[str]]:
    """(run_id, step) -> the families `spec.metrics` selects there that the store lacks, for the
    spec's complete or diverged runs in the store."""
    runs = store.sql("SELECT run_id, total_steps FROM runs WHERE zoo = ?", [spec.name]).to_dicts()
    wanted_ids = {r.run_id for r in spec.runs}
    total_steps = {r["run_id"]: r["total_steps"] for r in runs if r["run_id"] in wanted_ids}
    present = set(total_steps)
    if not present:
        return {}
    # a metric whose row marks a family as recorded at a (run, step): each family declares it
    markers = {name: family.marker_name() for name, family in spec.metrics.families}
    checkpoints = store.sql("SELECT run_id, list(step ORDER BY step) AS steps FROM checkpoints "
                            "WHERE list_contains(?, run_id) GROUP BY run_id",
                            [sorted(present)]).to_dicts()
    have = {(r["run_id"], r["step"], r["metric"]) for r in store.sql(
        "SELECT DISTINCT run_id, step, metric FROM metrics WHERE list_contains(?, run_id) "
        "AND list_contains(?, metric)",
        [sorted(present), sorted(set(markers.values()))]).to_dicts()}
    configs = {r.run_id: r for r in spec.runs}
    missing: dict[tuple[str, int], set[str]] = {}
    for row in checkpoints:
        # the steps the spec would have saved: `at = "last"` means the run's planned last step
        run = configs[row["run_id"]]
        planned = run.checkpoint_steps(total_steps[row["run_id"]])
        selected = checkpoint_metric_steps(spec.metrics, planned)
        for family, marker in markers.items():
            for step in selected[family] & set(row["steps"]):
                if (row["run_id"], step, marker) not in have:
                    missing.setdefault((row["run_id"], step), set()).add(family)
    return missing


def backfill_checkpoint_metrics(spec: ZooSpec, store: Store, device: str | torch.device = "cpu",
                                progress: Callable[[int, int], None] | None = None) -> int:
    """Compute and append the checkpoint metrics `spec.metrics` selects that the store lacks;
    returns the number of (run, step) checkpoints that gained metrics."""
    missing = missing_checkpoint_metrics(spec, store)
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
        values = _evaluate(spec, store, blob, step, members, families, torch.device(device))
        columns = _empty_columns()
        for family in families:
            keep = [i for i, m in enumerate(members) if family in missing[(m["run_id"], step)]]
            part = metric_columns(_family_values(values, spec.metrics.get(family)), step,
                                  [members[i]["run_id"] for i in keep], keep)
            for name, items in part.items():
                columns[name] += items
        store.add_metrics(columns)
        done += len(members)
        if progress:
            progress(k + 1, len(shards))
    return done


def _empty_columns() -> dict[str, list]:
    return {k: [] for k in ("run_id", "step", "metric", "tensor", "value")}


def _family_values(values: dict, family) -> dict:
    """The evaluator's values that belong to `family` (the names it declares)."""
    names = set(family.values)
    return {k: v for k, v in values.items()
            if (isinstance(k, tuple) and family.per_tensor and k[0] in names)
            or (not isinstance(k, tuple) and not family.per_tensor and k in names)}


def _evaluate(spec: ZooSpec, store: Store, blob: str, step: int, members: list[dict],
              families: set[str], device: torch.device) -> dict:
    """Evaluate `families` for the members of one shard at `step`, as the builder would have."""
    params = {k: v.to(device) for k, v in
              store.load_members(blob, [m["member"] for m in members]).items()}
    run = store.run(members[0]["run_id"])
    config = run["config"]
    kernel = kernel_for(parse_arch_options(config["model"]), tuple(run["input_shape"]),
                        run["n_classes"])
    datas = [store.load_dataset(m["run_id"]) for m in members]
    n_train = torch.tensor([d["x_train"].shape[0] for d in datas], device=device)
    largest = int(n_train.argmax())
    y_train = torch.zeros((len(members), int(n_train.max())), dtype=torch.long)
    for i, d in enumerate(datas):
        y_train[i, :d["y_train"].shape[0]] = d["y_train"]
    evaluator = CheckpointEvaluator(
        kernel, init={}, x_train=datas[largest]["x_train"].to(device),
        y_train=y_train.to(device), n_train=n_train, x_test=datas[0]["x_test"].to(device),
        y_test=datas[0]["y_test"].to(device), chunk=1024, n_classes=run["n_classes"],
        shape_groups=[list(range(len(members)))],
        shapes=[{k: v[0] for k, v in params.items()}], masks={}, options=spec.metrics,
        steps={family: {step} for family in families})
    return evaluator(params, step)
