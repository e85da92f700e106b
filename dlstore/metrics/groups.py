"""Metrics of groups of runs, computed after the runs are committed, from weights read back
through the store: the seeds of one config can train in different cohorts.

A group is the complete runs of one zoo whose configs are equal but for the seed. For up to
`pairs` pairs of its members (in seed order) it records, averaged over the pairs:

- `train_loss_barrier`, `train_error_barrier`, `test_loss_barrier`, `test_error_barrier`: the
  largest rise of loss / error above the chord along the straight line between the two
  networks' weights (`interpolation_barrier`), on the first `subsample` training examples of the
  group's first run (its labels) and on the test split;
- `mode_connectivity`: Yang et al.'s signed mc on the same line, from the train error;
- `cka`: linear CKA of the two networks' penultimate features on the test split;
- `disagreement`: the fraction of test examples on which they predict different classes.

Resumable: a (group, step) already recorded is skipped, so the step can run after every build
and as `dlstore metrics groups` on an existing store.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dlstore.architectures.registry import run_kernel
from dlstore.datasets.base import RUN_LEVEL
from dlstore.ids import hashed_id
from dlstore.metrics.connectivity import interpolation_barrier, mode_connectivity
from dlstore.metrics.families import GroupOptions
from dlstore.metrics.similarity import disagreement, linear_cka
from dlstore.metrics.steps import selected_steps
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter

GROUP_METRICS = ("train_loss_barrier", "train_error_barrier", "test_loss_barrier",
                 "test_error_barrier", "mode_connectivity", "cka", "disagreement")
# groups whose rows are appended in one commit
COMMIT_GROUPS = 64


@dataclass
class Group:
    group_id: str
    zoo: str
    key: str  # JSON of the shared config
    runs: list[dict]  # runs rows, in seed order


def find_groups(store: Store, zoo: str, run_ids: set[str] | None = None) -> list[Group]:
    """The groups of `zoo` (of its runs in `run_ids` if given) with at least two complete
    runs."""
    rows = store.sql("SELECT run_id, zoo, seed, config, input_shape, n_classes, final_step "
                     "FROM runs WHERE zoo = ? AND status = 'complete' ORDER BY seed, run_id",
                     [zoo]).to_dicts()
    by_key: dict[str, list[dict]] = {}
    for row in rows:
        if run_ids is not None and row["run_id"] not in run_ids:
            continue
        config = json.loads(row["config"])
        config.pop("seed")
        by_key.setdefault(json.dumps(config, sort_keys=True), []).append(row)
    groups = []
    for key, members in by_key.items():
        if len(members) < 2:
            continue
        digest = hashlib.sha256(json.dumps([key, [m["run_id"] for m in members]]).encode())
        groups.append(Group(f"{zoo}-g{digest.hexdigest()[:12]}", zoo, key, members))
    return groups


def compute_group_metrics(writer: StoreWriter, zoo: str, options: GroupOptions,
                          run_ids: set[str] | None = None, device: str | torch.device = "cpu",
                          progress: Callable[[int, int], None] | None = None) -> int:
    """Record the group metrics of every group of `zoo` at the steps `options.at` selects (among
    the checkpoint steps its members share) that the store does not hold yet. Returns the number
    of (group, step) pairs computed."""
    store = writer.store
    groups = find_groups(store, zoo, run_ids)
    done = {(r["group_id"], r["step"]) for r in store.sql(
        "SELECT DISTINCT group_id, step FROM _group_metrics WHERE zoo = ?", [zoo]).to_dicts()}
    columns = empty_columns()
    computed = 0
    for k, group in enumerate(groups):
        for step in group_steps(store, group, options):
            if (group.group_id, step) in done:
                continue
            add_rows(columns, group, step,
                     group_metrics_at(store, group, step, options, torch.device(device)))
            computed += 1
        if (k + 1) % COMMIT_GROUPS == 0:
            writer.record_group_metrics(columns)
            columns = empty_columns()
        if progress:
            progress(k + 1, len(groups))
    writer.record_group_metrics(columns)
    return computed


def add_rows(columns: dict[str, list], group: Group, step: int,
             values: dict[str, float]) -> None:
    """The `group_metrics` rows of `values` ({metric: value}) of `group` at `step`."""
    for name, value in values.items():
        for column, item in (("group_id", group.group_id), ("zoo", group.zoo),
                             ("run_ids", [r["run_id"] for r in group.runs]),
                             ("group_key", group.key), ("step", step),
                             ("metric", name), ("value", value)):
            columns[column].append(item)


def empty_columns() -> dict[str, list]:
    return {k: [] for k in ("group_id", "zoo", "run_ids", "group_key", "step", "metric",
                            "value")}


def group_steps(store: Store, group: Group, options: GroupOptions) -> list[int]:
    ids = [r["run_id"] for r in group.runs]
    shared = store.sql("SELECT step FROM checkpoints WHERE list_contains(?, run_id) "
                       "GROUP BY step HAVING count(DISTINCT run_id) = ? ORDER BY step",
                       [ids, len(ids)])["step"].to_list()
    if not shared:
        return []
    return sorted(selected_steps(options.at, shared, "metrics.groups.at"))


def group_metrics_at(store: Store, group: Group, step: int, options: GroupOptions,
                     device: torch.device) -> dict[str, float]:
    """The group metrics of `group` at `step`, averaged over its first `options.pairs` pairs."""
    first = group.runs[0]
    kernel = run_kernel(first)
    states = [store.load_state_dict(r["run_id"], step) for r in group.runs]
    pairs = list(itertools.islice(itertools.combinations(range(len(states)), 2),
                                  options.pairs))
    a = {k: torch.stack([states[i][k] for i, _ in pairs]).to(device) for k in states[0]}
    b = {k: torch.stack([states[j][k] for _, j in pairs]).to(device) for k in states[0]}
    data = {k: v.to(device) for k, v in store.load_dataset(first["run_id"]).items()}
    x_train = data["x_train"][:options.subsample]
    y_train = data["y_train"][:options.subsample]
    with torch.no_grad():
        train = interpolation_barrier(kernel.forward_shared, a, b, x_train, y_train,
                                      n_points=options.points)
        test = interpolation_barrier(kernel.forward_shared, a, b, data["x_test"],
                                     data["y_test"], n_points=options.points)
        values = {
            "train_loss_barrier": train["loss_barrier"],
            "train_error_barrier": train["error_barrier"],
            "test_loss_barrier": test["loss_barrier"],
            "test_error_barrier": test["error_barrier"],
            "mode_connectivity": mode_connectivity(train["error_path"]),
            "cka": linear_cka(kernel.features_shared(a, data["x_test"]),
                              kernel.features_shared(b, data["x_test"])),
            "disagreement": disagreement(kernel.forward_shared(a, data["x_test"]),
                                         kernel.forward_shared(b, data["x_test"])),
        }
    return {name: float(values[name].mean()) for name in GROUP_METRICS}


def stability_id(a: str, b: str) -> str:
    """The group id of the stability pair (run `a`, its copy `b`)."""
    return "stability-" + hashed_id("pair", {"runs": [a, b]}).removeprefix("pair-")


def record_stability(writer: StoreWriter, pairs: list[tuple[str, str]]) -> int:
    """The instability of networks (Frankle et al. 2020): error and loss barriers on the test
    split between run `a` and its copy `b`, trained from the same weights with another data
    order, for each committed pair that has none yet (`group_metrics`, group id
    `stability-...`, named as the group metrics `test_error_barrier`, `test_loss_barrier`).
    Returns the pairs recorded."""
    if not pairs:
        return 0
    store = writer.store
    present = store.run_ids()
    recorded = set(store.sql("SELECT DISTINCT group_id FROM group_metrics")["group_id"])
    todo = [(a, b) for a, b in pairs if a in present and b in present
            and stability_id(a, b) not in recorded]
    if not todo:
        return 0
    runs = {r["run_id"]: r for r in store.sql(
        "SELECT run_id, zoo, config, input_shape, n_classes, final_step FROM runs "
        "WHERE list_contains(?, run_id)", [sorted({a for a, _ in todo})]).to_dicts()}
    batches: dict[str, list[tuple[str, str]]] = {}
    for a, b in todo:  # pairs that evaluate on the same test split with the same network stack
        config = json.loads(runs[a]["config"])
        dataset = {k: v for k, v in config["dataset"].items() if k not in RUN_LEVEL}
        model = {k: v for k, v in config["model"].items() if k != "init_seed"}
        batches.setdefault(json.dumps([dataset, model], sort_keys=True), []).append((a, b))
    columns = empty_columns()
    for members in batches.values():
        first = runs[members[0][0]]
        kernel = run_kernel(first)
        data = store.load_dataset(first["run_id"])
        states = store.load_state_dicts([(run_id, None) for pair in members for run_id in pair])
        stack = {side: {k: torch.stack([state[k] for state in states[side::2]])
                        for k in states[0]} for side in (0, 1)}  # [pairs, ...] each
        with torch.no_grad():
            barrier = interpolation_barrier(kernel.forward_shared, stack[0], stack[1],
                                            data["x_test"], data["y_test"])
        for i, (a, b) in enumerate(members):
            for metric in ("error_barrier", "loss_barrier"):
                # what the pair shares: the ticket's lineage (its copy differs in data order)
                for column, item in (("group_id", stability_id(a, b)), ("zoo", runs[a]["zoo"]),
                                     ("run_ids", [a, b]),
                                     ("group_key", json.dumps({"stability_of": a})),
                                     ("step", runs[a]["final_step"]),
                                     ("metric", f"test_{metric}"),
                                     ("value", float(barrier[metric][i]))):
                    columns[column].append(item)
    writer.record_group_metrics(columns)
    return len(todo)
