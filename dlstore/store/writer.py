"""The writing side of a store: the commit protocol a build (or any writer) follows.

Shards first (`put_cohort_shard`, `put_mask_shard`: content-addressed, invisible until rows
point at them), then rows: checkpoints, metrics and masks, and the runs rows last, all stamped
with one commit id (`commit`). A run is visible once its runs row is: a crash before that
leaves only unreferenced shards, which `gc` removes. Everything a user reads goes through
`Store`; everything that appends goes through here.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING

from dlstore.errors import NotFoundError, StoreError
from dlstore.store import shards
from dlstore.store.leases import live_leases
from dlstore.store.store import Store

if TYPE_CHECKING:
    import torch


class StoreWriter:
    """Appends to `store` (opened by the caller, who also reads through it)."""

    def __init__(self, store: Store):
        self.store = store


    def check_writable(self) -> None:
        """StoreError unless shards can be written: checked before a build trains anything."""
        self.store.blobs.check_writable()

    def put_cohort_shard(self, tensors: dict[str, torch.Tensor], *, zoo: str, step: int,
                         arch_json: str, input_shape: tuple[int, ...], n_classes: int,
                         run_ids: list[str]) -> str:
        """Store one checkpoint step of cohort members that share their shapes (`tensors`:
        [P, ...] each, in state-dict order); returns the shard's hash."""
        return self.store.blobs.put(tensors, shards.cohort_metadata(
            zoo, step, tensors, arch_json, input_shape, n_classes, run_ids))

    def put_mask_shard(self, tensors: dict[str, torch.Tensor], *, zoo: str,
                       mask_ids: list[str], run_ids: list[str]) -> str:
        """Store lottery-ticket masks ([P, ...] 0/1 each); returns the shard's hash."""
        return self.store.blobs.put(tensors, shards.mask_metadata(zoo, mask_ids, run_ids))

    @staticmethod
    def new_commit_id() -> str:
        return uuid.uuid4().hex

    def append_runs(self, runs: list[dict]) -> None:
        """Runs rows on their own (a tracked run's, written when it starts): what they list
        is visible from now on, under each row's commit id."""
        self.store.tables.append("runs", runs)

    def append_rows(self, table: str, rows: list[dict] | dict[str, list]) -> None:
        """Rows of a run already in the store, carrying its commit id (a tracked run's
        checkpoints, metrics and status updates); nothing when there are none."""
        self.store.tables.append(table, rows)

    def commit(self, checkpoints: list[dict], metrics: list[dict] | dict[str, list],
               runs: list[dict], masks: list[dict] = ()) -> str:
        """Append checkpoint, metric and mask rows, then the runs rows last, all stamped with one
        commit id, which is returned. `metrics` may be rows or columns."""
        commit_id = self.new_commit_id()
        now = dt.datetime.now(dt.timezone.utc)
        for row in [*checkpoints, *masks]:
            row["commit_id"] = commit_id
        for row in runs:
            row["commit_id"] = commit_id
            row.setdefault("created_at", now)
        if isinstance(metrics, dict):
            metrics = {**metrics, "commit_id": [commit_id] * len(metrics["run_id"])}
        else:
            for row in metrics:
                row["commit_id"] = commit_id
        self.store.tables.append("checkpoints", checkpoints)
        self.store.tables.append("metrics", metrics)
        self.store.tables.append("masks", list(masks))
        self.store.tables.append("runs", runs)
        return commit_id

    def add_metrics(self, columns: dict[str, list]) -> None:
        """Append metric rows (run_id, step, metric, tensor, value columns) of runs already in
        the store, in one commit. Each row takes its run's commit id, so the views show it with
        the run's other rows."""
        if not columns["run_id"]:
            return
        commits = {r["run_id"]: r["commit_id"] for r in self.store._lookup(
            "SELECT run_id, commit_id FROM runs WHERE list_contains(?, run_id)",
            [sorted(set(columns["run_id"]))])}
        missing = sorted(set(columns["run_id"]) - set(commits))
        if missing:
            raise NotFoundError(f"no run {missing[0]!r} in store {self.store.root}")
        self.store.tables.append("metrics", {**columns,
                                       "commit_id": [commits[r] for r in columns["run_id"]]})

    def record_fit(self, row: dict) -> str:
        """Append an analysis result to the fits table; returns its fit id. A row whose `label`
        an earlier fit has replaces that one in the fits view (the table keeps both)."""
        row = {"fit_id": uuid.uuid4().hex[:16], "created_at": dt.datetime.now(dt.timezone.utc),
               **row}
        self.store.tables.append("fits", [row])
        return row["fit_id"]

    def remove_runs(self, run_ids: list[str], zoo: str | None = None) -> int:
        """Hide runs from every view by one commit of `removed` rows (their shards stay until
        `gc`); `zoo` given: the zoo's spec rows leave the zoos view too. A later rebuild of a
        removed run shows again. Refused while a build of their zoo runs (its lease is live).
        Returns the number of runs removed."""
        known = {r["run_id"]: r["zoo"] for r in self.store._lookup(
            "SELECT run_id, zoo FROM runs WHERE list_contains(?, run_id)", [sorted(set(run_ids))])}
        missing = sorted(set(run_ids) - set(known))
        if missing:
            raise NotFoundError(f"no run {missing[0]!r} in store {self.store.root}")
        building = {b.get("zoo") for b in live_leases(self.store.location)} & {*known.values(), zoo}
        if building:
            raise StoreError(f"a build of zoo {sorted(building)[0]!r} is running in this store; "
                             "remove its runs once it has finished")
        commit_id = uuid.uuid4().hex
        now = dt.datetime.now(dt.timezone.utc)
        rows = [{"run_id": r, "zoo": z, "removed_at": now, "commit_id": commit_id}
                for r, z in sorted(known.items())]
        if zoo is not None:
            rows.append({"run_id": None, "zoo": zoo, "removed_at": now, "commit_id": commit_id})
        self.store.tables.append("removed", rows)
        return len(known)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Tag a run (`{key: value}`; the latest value of a key wins, "" removes the key), in
        one commit; the runs view shows them as its `tags` map."""
        self.store.run(run_id)  # NotFoundError for an unknown run
        now = dt.datetime.now(dt.timezone.utc)
        self.store.tables.append("tags", [{"run_id": run_id, "key": k, "value": v,
                                           "created_at": now} for k, v in tags.items()])

    def record_group_metrics(self, columns: dict[str, list]) -> None:
        """Append group metric rows (columns of the group_metrics table but created_at) in one
        commit: a group's rows appear together or not at all."""
        if columns["group_id"]:
            now = dt.datetime.now(dt.timezone.utc)
            self.store.tables.append("group_metrics",
                               {**columns, "created_at": [now] * len(columns["group_id"])})

    def record_zoo(self, row: dict) -> bool:
        """Add a zoos row unless this exact spec text is already recorded for the zoo."""
        seen = self.store._lookup("SELECT 1 FROM zoos WHERE zoo = ? AND spec_hash = ?",
                            [row["zoo"], row["spec_hash"]])
        if seen:
            return False
        self.store.tables.append("zoos", [{"created_at": dt.datetime.now(dt.timezone.utc), **row}])
        return True
