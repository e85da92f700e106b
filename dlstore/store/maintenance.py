"""Store maintenance: check every byte and reference (`verify`), merge small table files
(`compact`), remove what nothing refers to (`gc`).

All three are safe while a build runs: `verify` only reads; `compact` is a Delta commit that
concurrent appends do not conflict with; `gc` removes only shards and table files older than a
retention period, so a shard written by a running build before its rows are committed survives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dlstore.errors import DlstoreError
from dlstore.schemas import TABLES
from dlstore.store.store import Store


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    checkpoints: int = 0
    table_rows: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: Store) -> VerifyReport:
    """Every Delta table reads; every shard's bytes hash to its name and its header parses; every
    checkpoint (and mask) row points to a shard that exists, verifies and holds its member."""
    report = VerifyReport()
    for name in TABLES:
        try:
            count = store.sql(f"SELECT count(*) AS n FROM _{name}")["n"][0]
            report.table_rows[name] = int(count)
        except DlstoreError as e:
            report.problems.append(f"table {name}: {e}")
    blobs, temporary = store.blobs.list()
    members: dict[str, int] = {}
    for blob in blobs:
        try:
            store.blobs.verify(blob, force=True)
            shapes = store.blobs.shape(blob)
            members[blob] = min(shape[0] for shape in shapes.values()) if shapes else 0
        except DlstoreError as e:
            report.problems.append(str(e))
    report.shards = len(blobs)
    if temporary:
        report.notes.append(f"{len(temporary)} temporary files of interrupted shard writes "
                            "(harmless; nothing refers to them)")
    references = {"checkpoints": "SELECT 'checkpoint ' || run_id || ' step ' || step, blob, "
                                 "member FROM checkpoints",
                  "masks": "SELECT 'mask ' || mask_id, blob, member FROM masks"}
    for table, query in references.items():
        if table not in report.table_rows:
            continue
        rows = store.sql(query)
        if table == "checkpoints":
            report.checkpoints = rows.height
        for what, blob, member in rows.iter_rows():
            if blob not in members:
                state = "missing" if blob not in blobs else "corrupted"
                report.problems.append(f"{what}: shard {blob} is {state}")
            elif member >= members[blob]:
                report.problems.append(f"{what}: shard {blob} has {members[blob]} members, "
                                       f"not member {member}")
    return report


def compact(store: Store) -> dict[str, int]:
    """Merge each table's small files; returns files removed per table."""
    return {name: int(store.tables.compact(name).get("numFilesRemoved", 0)) for name in TABLES
            if store.tables.snapshot(name)[0] >= 0}


@dataclass
class GcReport:
    shards: list[str] = field(default_factory=list)
    shard_bytes: int = 0
    temporary: int = 0
    table_files: int = 0


def gc(store: Store, older_than_hours: float = 24.0, dry_run: bool = False) -> GcReport:
    """Remove shards that no checkpoint or mask row refers to (committed or not), leftover
    temporary files of interrupted writes, and table files no snapshot of the retention period
    needs; only what is older than `older_than_hours`."""
    report = GcReport()
    cutoff = time.time() - older_than_hours * 3600
    # rows of runs hidden by `dlstore rm` refer to nothing (uncommitted rows still do)
    gone = ("NOT EXISTS (SELECT 1 FROM _runs r JOIN _removed x ON x.run_id = r.run_id AND "
            "x.removed_at >= r.created_at WHERE r.run_id = t.run_id AND r.commit_id = t.commit_id)")
    referenced = set(store.sql(f"SELECT blob FROM _checkpoints t WHERE {gone} "
                               f"UNION SELECT blob FROM _masks t WHERE {gone}")["blob"])
    blobs, temporary = store.blobs.list()
    for blob, info in blobs.items():
        if blob not in referenced and info.mtime < cutoff:
            report.shards.append(blob)
            report.shard_bytes += info.size if dry_run else store.blobs.remove(blob)
    for leftover in temporary:
        if leftover.mtime < cutoff:
            report.temporary += 1
            if not dry_run:
                store.blobs.remove_temporary(leftover)
    for name in TABLES:
        if store.tables.snapshot(name)[0] >= 0:
            report.table_files += len(store.tables.vacuum(name, int(older_than_hours), dry_run))
    return report
