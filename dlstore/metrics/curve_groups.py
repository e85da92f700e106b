"""Curve mode connectivity of a zoo's groups (`[metrics] curve`), computed after the runs are
committed, from weights read back through the store (`metrics.curves` holds the curve itself).

For up to `pairs` pairs of seeds of each group (in seed order, as `metrics.groups` pairs them) at
the steps `at` selects, it trains the bend of the pair's quadratic Bezier curve and records,
averaged over the pairs, the `curves.CURVE_METRICS`: train and test loss / error barriers along
the trained curve and Yang et al.'s signed mc of the train error (`curve_mode_connectivity`). The
train split of a pair is its group's first run's (its subset, its labels): the bend trains on it
and the train barriers are measured on its first `subsample` examples.

Vectorised: the pairs of every (group, step) whose networks have the same shapes and whose data
share one pool (the dataset's options but for the run-level ones, as the cohort trainer shares
them: training-set sizes and label noise may differ) train their bends together, one stacked
member per pair. Resumable: a (group, step) with `curve_mode_connectivity` recorded is skipped.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import torch

from dlstore.architectures.registry import run_architecture, run_kernel, run_shapes
from dlstore.datasets.base import RUN_LEVEL
from dlstore.metrics.curves import (
    CURVE_METRICS,
    CurveSampler,
    NormStatistics,
    curve_metrics,
    train_bends,
)
from dlstore.metrics.families import CurveOptions
from dlstore.metrics.groups import Group, add_rows, empty_columns, find_groups, group_steps
from dlstore.seeds import derive_seed
from dlstore.stacks import stack_labels
from dlstore.store.writer import StoreWriter

# pairs whose bends train in one stack (bounds the memory of the curve's evaluation points)
MAX_PAIRS = 512


def pair_seed(seed: int, run_a: str, run_b: str) -> int:
    """The seed of a pair's t and batches: from the spec's seed and the two runs, never from
    where the pair sits in a stack."""
    return derive_seed(seed, f"curve:{run_a}:{run_b}")


def compute_curve_metrics(writer: StoreWriter, zoo: str, options: CurveOptions,
                          run_ids: set[str] | None = None, device: str | torch.device = "cpu",
                          progress: Callable[[int, int], None] | None = None) -> int:
    """Record the curve metrics of every group of `zoo` at the steps `options.at` selects that
    the store does not hold yet. Returns the number of (group, step) pairs computed."""
    store = writer.store
    device = torch.device(device)
    done = {(r["group_id"], r["step"]) for r in store.sql(
        "SELECT DISTINCT group_id, step FROM _group_metrics WHERE zoo = ? AND metric = ?",
        [zoo, "curve_mode_connectivity"]).to_dicts()}
    batches: dict[str, list[tuple[Group, int]]] = {}
    for group in find_groups(store, zoo, run_ids):
        config = json.loads(group.key)
        dataset = {k: v for k, v in config["dataset"].items() if k not in RUN_LEVEL}
        model = {k: v for k, v in config["model"].items() if k != "init_seed"}
        key = json.dumps([dataset, model], sort_keys=True)
        for step in group_steps(store, group, options):
            if (group.group_id, step) not in done:
                batches.setdefault(key, []).append((group, step))
    per_stack = max(1, MAX_PAIRS // options.pairs)  # (group, step)s
    items = [batch[i:i + per_stack] for batch in batches.values()
             for i in range(0, len(batch), per_stack)]
    computed = 0
    for k, batch in enumerate(items):
        columns = empty_columns()
        for (group, step), values in zip(batch, curve_metrics_of(store, batch, options, device)):
            add_rows(columns, group, step, values)
            computed += 1
        writer.record_group_metrics(columns)
        if progress:
            progress(k + 1, len(items))
    return computed


def curve_metrics_of(store, batch: list[tuple[Group, int]], options: CurveOptions,
                   device: torch.device) -> list[dict[str, float]]:
    """The curve metrics of each (group, step) of `batch`, all its pairs trained together."""
    first = batch[0][0].runs[0]
    kernel = run_kernel(first)
    norms = NormStatistics(run_architecture(first), *run_shapes(first))
    pairs, owners, labels = [], [], []
    datas = {}
    for item, (group, step) in enumerate(batch):
        owner = group.runs[0]["run_id"]
        if owner not in datas:
            datas[owner] = store.load_dataset(owner)
        states = store.load_state_dicts([(r["run_id"], step) for r in group.runs])
        for i, j in itertools.islice(itertools.combinations(range(len(states)), 2),
                                     options.pairs):
            pairs.append((states[i], states[j],
                          pair_seed(options.seed, group.runs[i]["run_id"],
                                    group.runs[j]["run_id"])))
            owners.append(item)
            labels.append(datas[owner]["y_train"])
    # the shared pool: the longest training split of the batch (the others are its prefixes)
    longest = max(datas.values(), key=lambda d: d["x_train"].shape[0])
    x_train = longest["x_train"].to(device)
    y_train, n_train = stack_labels(labels)
    y_train, n_train = y_train.to(device), n_train.to(device)
    a = {k: torch.stack([p[0][k] for p in pairs]).to(device) for k in pairs[0][0]}
    b = {k: torch.stack([p[1][k] for p in pairs]).to(device) for k in pairs[0][0]}
    sampler = CurveSampler([p[2] for p in pairs], n_train.tolist(), options.batch_size, device)
    bend = train_bends(kernel, a, b, x_train, y_train, sampler, options.steps, options.lr,
                       options.momentum, options.weight_decay)
    values = curve_metrics(kernel, norms, a, bend, b, x_train, y_train,
                           n_train.clamp(max=options.subsample), longest["x_test"].to(device),
                           longest["y_test"].to(device), options.points)
    owner_of = torch.tensor(owners, device=device)
    return [{name: float(values[name][owner_of == item].mean()) for name in CURVE_METRICS}
            for item in range(len(batch))]
