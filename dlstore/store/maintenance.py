"""Store maintenance: check every byte and reference (`verify`), merge small table files
(`compact`), remove what nothing refers to (`gc`).

All three are safe while a build runs: `verify` only reads; `compact` is a Delta commit that
concurrent appends do not conflict with; `gc` removes only shards and table files older than a
retention period, and never a shard a live build may still commit (`leases.py`), for any
retention period.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from dlstore.errors import DlstoreError
from dlstore.schemas import TABLES
from dlstore.store.leases import live_leases
from dlstore.store.store import Store

# shard mtimes come from the filesystem's (or object store's) clock, lease times from the
# builder's: spare a margin for their difference
CLOCK_SLACK = 60.0


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    checkpoints: int = 0
    table_rows: dict[str, int] = field(default_factory=dict)
    damaged_runs: set[str] = field(default_factory=set)  # runs pointing into lost shards
    bad_shards: set[str] = field(default_factory=set)  # shards present but damaged

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: Store) -> VerifyReport:
    """Every Delta table's log runs without gaps and every entry parses; every data file of
    every table's snapshot exists and holds the rows its log records; every shard's bytes hash
    to its name and its header parses; every checkpoint (and mask) row points to a shard that
    exists, verifies and holds its member. Each problem is listed; checking goes on past it."""
    report = VerifyReport()
    for name in TABLES:
        problems = [f"table {name}: {p}" for p in _table_problems(store, name)]
        report.problems += problems
        if problems:
            continue
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
                                 "member, run_id FROM checkpoints",
                  "masks": "SELECT 'mask ' || mask_id, blob, member, run_id FROM masks"}
    for table, query in references.items():
        if table not in report.table_rows or "runs" not in report.table_rows:
            continue
        try:
            rows = store.sql(query)
        except DlstoreError as e:
            report.problems.append(f"table {table}: {e}")
            continue
        if table == "checkpoints":
            report.checkpoints = rows.height
        for what, blob, member, run_id in rows.iter_rows():
            if blob not in members:
                state = "missing" if blob not in blobs else "corrupted"
                report.problems.append(f"{what}: shard {blob} is {state}")
            elif member >= members[blob]:
                report.problems.append(f"{what}: shard {blob} has {members[blob]} members, "
                                       f"not member {member}")
            else:
                continue
            report.damaged_runs.add(run_id)
            if blob in blobs:
                report.bad_shards.add(blob)
    return report


@dataclass
class RepairReport:
    runs: list[str] = field(default_factory=list)  # hidden, so that a rebuild trains them
    shards: list[str] = field(default_factory=list)  # damaged files removed


def repair(store: Store, report: VerifyReport) -> RepairReport:
    """Make the runs whose weights are lost buildable again: remove the damaged shard files
    (a rebuild writes them anew under the same names: a file present under its hash is never
    rewritten) and hide the runs that point into missing or damaged shards (`remove_runs`), so
    that the next `build-zoo` of their spec trains them again. Damage to the tables' logs is not
    repaired: it needs a person (a backup of the store, or the lost log entry)."""
    done = RepairReport(runs=sorted(report.damaged_runs), shards=sorted(report.bad_shards))
    if done.runs:
        store.remove_runs(done.runs)  # first: refused while a build of their zoo runs
    for blob in done.shards:
        store.blobs.remove(blob)
    return done


def _table_problems(store: Store, name: str) -> list[str]:
    problems = store.tables.log_problems(name, every_entry=True)
    if problems:
        return problems
    try:
        files = store.tables.data_files(name)
    except DlstoreError as e:
        return [str(e)]
    for uri, rows in files:
        leaf = uri.rsplit("/", 1)[-1]
        try:
            local = store.location.readable_files([uri])[0]
            found = pq.read_metadata(local).num_rows
        except FileNotFoundError:
            problems.append(f"data file {leaf} is missing")
            continue
        except (OSError, ValueError, DlstoreError) as e:
            problems.append(f"data file {leaf} cannot be read ({str(e).splitlines()[0]})")
            continue
        if rows >= 0 and found != rows:
            problems.append(f"data file {leaf} holds {found} rows; the log records {rows}")
    return problems


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
    live_builds: int = 0  # builds in progress whose shards were spared


def gc(store: Store, older_than_hours: float = 24.0, dry_run: bool = False) -> GcReport:
    """Remove shards that no checkpoint or mask row refers to (committed or not), leftover
    temporary files of interrupted writes, and table files no snapshot of the retention period
    needs; only what is older than `older_than_hours`, and never what a build in progress may
    still commit: shards written since the oldest live build lease started are kept."""
    report = GcReport()
    started = time.time()
    cutoff = started - older_than_hours * 3600
    # leases first, then the references: a build that ends in between has committed (its
    # shards are referenced) before it dropped its lease
    leases = live_leases(store.location, started)
    if leases:
        report.live_builds = len(leases)
        cutoff = min(cutoff, min(float(b.get("started", 0)) for b in leases) - CLOCK_SLACK)
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
    table_cutoff = started - older_than_hours * 3600  # what readers of older snapshots need
    for name in TABLES:
        if store.tables.snapshot(name)[0] < 0:
            continue
        stale = store.tables.stale_files(name, table_cutoff)
        report.table_files += len(stale)
        if not dry_run:
            for path in stale:
                store.tables.remove_file(name, path)
    return report
