"""Delta Lake tables: one per schema in `dlstore.schemas`, appended to with ACID commits.

Several processes may append to the same table at once (Delta's optimistic concurrency); a
reader sees the files of one committed snapshot and never blocks a writer.

On an object store the tables go through deltalake's own object-store support: the Location's
`storage_options` travel with every call (on S3 they keep Delta's conditional-put commits).

When `dlstore.schemas` gains a column, a store written by an older version gets it on its next
write (a Delta schema change that adds the column; older files read it as null), so stores never
need a migration step.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Schema, WriterProperties, write_deltalake
from deltalake.exceptions import DeltaError

from dlstore.errors import StoreError
from dlstore.schemas import CLUSTER_BY, ROW_GROUP_ROWS, TABLES
from dlstore.store.deltalog import LogReplay, UnsupportedTable
from dlstore.store.location import Location

_COMMIT = re.compile(r"^(\d{20})\.json$")
_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint(\.\d+\.\d+)?\.parquet$")
# where each table's high-water mark lives: the newest version a writer saw committed, so that
# a lost newest log entry (deleted, or emptied and then removed) is found, not read as an
# older table
HEADS = "heads"
APPEND_ATTEMPTS = 5  # rounds of deltalake's own commit retries
# Every COMPACT_EVERY-th version of a table, the writer that committed it merges the table's
# small files (see `append`); files grow to COMPACT_TARGET_BYTES at most, which bounds how often
# a merged file is written again
COMPACT_EVERY = 10
COMPACT_TARGET_BYTES = 32 * 2**20
# compactions of a table run one at a time, under this lock: deltalake (1.6) lets two OPTIMIZE
# commits that removed the same files both land (it no longer counts a delete of a file that a
# concurrent compaction also deleted as a conflict), and the rows of those files would then
# show twice. An object store cannot lock: there writers do not compact as they go, and
# `dlstore compact` must run one at a time
COMPACT_LOCK = "locks/compact-{name}"
# a data file no log entry names (a compaction that lost a race, an append that died before
# its commit) is removed by `gc` only once it is this old: an append in flight is seconds old
ORPHAN_SECONDS = 3600.0
_MARKER = "dlstore_append"  # commitInfo key: which commit is this writer's
# deltalake's own default codec, which naming any property would otherwise turn off
_WRITER = WriterProperties(max_row_group_size=ROW_GROUP_ROWS, compression="SNAPPY")


class Tables:
    def __init__(self, location: Location, prefix: str = "tables"):
        self.location = location
        self.prefix = prefix
        self.options = location.storage_options
        self._current: set[str] = set()  # tables whose schema this process has brought up to date
        self._replays: dict[str, LogReplay] = {}  # snapshots read so far, brought up to date
        self._checked: dict[str, int] = {}  # newest log entry checked to parse, per table

    def path(self, name: str) -> str:
        """The table's URI as deltalake opens it (a plain path for a local store)."""
        return self.location.url(f"{self.prefix}/{name}")

    def _open(self, name: str) -> DeltaTable:
        return DeltaTable(self.path(name), storage_options=self.options)

    def create_missing(self) -> None:
        for name in TABLES:
            self._ensure_schema(name)

    def _ensure_schema(self, name: str) -> None:
        """Create the table, or add the columns its schema in `dlstore.schemas` has gained."""
        if name in self._current:
            return
        path, schema = self.path(name), TABLES[name]
        self.check_log(name)
        try:
            if not DeltaTable.is_deltatable(path, storage_options=self.options):
                local = self.location.local_path(f"{self.prefix}/{name}")
                if local is not None:
                    local.mkdir(parents=True, exist_ok=True)
                try:
                    DeltaTable.create(path, schema=schema, mode="ignore",
                                      storage_options=self.options)
                except DeltaError:
                    # another process created it between our look and our commit
                    if not DeltaTable.is_deltatable(path, storage_options=self.options):
                        raise
            else:
                table = self._open(name)
                have = {f.name for f in table.schema().fields}
                missing = pa.schema([f for f in schema if f.name not in have])
                if len(missing):
                    table.alter.add_columns(list(Schema.from_arrow(missing).fields))
        except (DeltaError, OSError) as e:
            raise StoreError(f"cannot create or update table {name!r} at {path}: "
                             f"{_first_line(e)}") from None
        self._current.add(name)

    def append(self, name: str, rows: list[dict] | dict[str, list]) -> None:
        """Append rows (a list of dicts, or a dict of equal-length columns) in one commit, in
        the table's `CLUSTER_BY` order, in row groups of `ROW_GROUP_ROWS`.

        Compaction comes with appending: the writer whose commit is a multiple of
        COMPACT_EVERY versions merges the table's small files, so that a tracker flushing every
        few seconds for days, or a build of thousands of cohorts, leaves a bounded number of
        files for readers to open (a query's cost grows with files more than with rows). Every
        version has one committer, so concurrent writers elect one compactor without talking;
        a compaction that still overlaps an earlier one loses Delta's conflict check, commits
        nothing, and its files wait for `gc` (ORPHAN_SECONDS)."""
        if isinstance(rows, dict):
            table = pa.Table.from_pydict(rows, schema=TABLES[name])
        else:
            table = pa.Table.from_pylist(rows, schema=TABLES[name])
        if table.num_rows == 0:
            return
        if name in CLUSTER_BY:
            table = table.sort_by([(column, "ascending") for column in CLUSTER_BY[name]])
        self._ensure_schema(name)
        self.check_log(name)
        self.location.check_space(table.nbytes, f"appending to table {name!r}")
        marker = uuid.uuid4().hex
        for attempt in range(APPEND_ATTEMPTS):
            try:
                # appends never conflict with each other: deltalake retries a commit whose
                # version another writer took; many writers at once (a job array of tracked
                # runs) can use up its retries, so a few more rounds start after a random pause
                write_deltalake(self.path(name), table, mode="append",
                                storage_options=self.options, writer_properties=_WRITER,
                                commit_properties=CommitProperties(
                                    max_commit_retries=100, custom_metadata={_MARKER: marker}))
                break
            except (DeltaError, OSError) as e:
                if attempt + 1 < APPEND_ATTEMPTS and "Failed to commit transaction" in str(e):
                    time.sleep(random.uniform(0.05, 0.5))
                    continue
                raise StoreError(f"cannot append to table {name!r} at {self.path(name)}: "
                                 f"{_first_line(e)}") from None
        version = self._raise_head(name, marker)
        if version is not None and version > 0 and version % COMPACT_EVERY == 0:
            self._merge_small_files(name)

    def _merge_small_files(self, name: str) -> None:
        """The elected compaction after an append: an optimization, so a failure (a race lost,
        a full disk) leaves the table as it was and the append's success stands."""
        try:
            with self.location.exclusive(COMPACT_LOCK.format(name=name), wait=False) as held:
                if not held:
                    return  # another compaction is running: it merges these files
                # the table opened under the lock: it sees what an earlier holder merged
                self._open(name).optimize.compact(target_size=COMPACT_TARGET_BYTES,
                                                  writer_properties=_WRITER)
        except (DeltaError, OSError):
            return
        self._raise_head(name)

    # -- the log: damage found before deltalake reads it ----------------------------------

    def _log_entries(self, name: str) -> tuple[dict[int, object], dict[int, list[str]]]:
        """(commit version -> FileInfo, checkpoint version -> keys of its parts) of the
        table's _delta_log."""
        folder = f"{self.prefix}/{name}/_delta_log/"
        commits, checkpoints = {}, {}
        for info in self.location.list(folder.rstrip("/")):
            leaf = info.key.removeprefix(folder)
            if "/" in leaf:
                continue
            if m := _COMMIT.match(leaf):
                commits[int(m.group(1))] = info
            elif m := _CHECKPOINT.match(leaf):
                checkpoints.setdefault(int(m.group(1)), []).append(info.key)
        return commits, checkpoints

    def _head(self, name: str) -> int:
        try:
            return int(json.loads(self.location.read_bytes(f"{HEADS}/{name}.json"))["version"])
        except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
            return -1

    def _raise_head(self, name: str, marker: str | None = None) -> int | None:
        """Record the newest committed version as the table's mark (never lowered by this
        writer; a concurrent writer may leave a lower one, which only weakens the check).
        Returns the version of the commit whose commitInfo carries `marker` (the newest few
        entries are looked at; None when not found there)."""
        commits, _ = self._log_entries(name)
        if commits and max(commits) > self._head(name):
            try:
                self.location.write_atomic(f"{HEADS}/{name}.json",
                                           json.dumps({"version": max(commits)}).encode())
            except OSError:
                pass  # the mark is a check, not data: a failed write loses nothing
        if marker is None:
            return None
        for version in sorted(commits, reverse=True)[:64]:
            try:
                data = self.location.read_bytes(commits[version].key)
            except FileNotFoundError:
                continue
            for line in data.splitlines():
                if line.startswith(b'{"commitInfo"'):
                    info = json.loads(line)["commitInfo"]
                    if isinstance(info, dict) and info.get(_MARKER) == marker:
                        return version
        return None

    def _listing(self, name: str) -> tuple[int, dict[int, object], dict[int, list[str]]]:
        """(the table's mark, its commits, its checkpoints): the mark read before the listing,
        so that the listing holds at least the version the mark names."""
        head = self._head(name)
        return (head, *self._log_entries(name))

    def log_problems(self, name: str, every_entry: bool = False, listing=None) -> list[str]:
        """What is wrong with the table's log, in words: a missing entry (the log must run
        without gaps from 0, or from its newest checkpoint, to its last entry), an entry that
        is empty or not JSON (every entry with `every_entry`, else the newest only), or a last
        entry older than the version the table's mark says was committed. [] when sound.
        `listing`: `_listing(name)` when the caller has read it already."""
        head, commits, checkpoints = listing or self._listing(name)
        if not commits and not checkpoints:
            return [f"its log holds no entries, but version {head} was committed"] if head >= 0 \
                else []
        newest = max([*commits, *checkpoints])
        start = max(checkpoints) + 1 if checkpoints else 0
        problems = []
        gaps = [v for v in range(start, newest + 1) if v not in commits]
        if gaps:
            problems.append(f"log entry {gaps[0]} is missing" + (
                f" ({len(gaps)} entries missing)" if len(gaps) > 1 else "")
                + f" between versions {start} and {newest}")
        if head > newest:
            problems.append(f"its log ends at version {newest} but version {head} was committed "
                            "(the newest log entries are lost)")
        wanted = [v for v in commits if v >= start] if every_entry else (
            [newest] if newest in commits else [])
        for version in sorted(wanted):
            if not every_entry and self._checked.get(name) == version:
                continue
            problem = self._entry_problem(commits[version].key, version)
            if problem:
                problems.append(problem)
            elif not every_entry:
                self._checked[name] = version
        return problems

    def _entry_problem(self, key: str, version: int) -> str | None:
        try:
            data = self.location.read_bytes(key)
        except FileNotFoundError:
            return f"log entry {version} is missing"
        if not data.strip():
            return f"log entry {version} is empty (truncated)"
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                action = json.loads(line)
            except ValueError:
                return f"log entry {version} is not valid JSON (line {number})"
            if not isinstance(action, dict) or not action:
                return f"log entry {version} has a line that is no Delta action (line {number})"
        return None

    def check_log(self, name: str, listing=None) -> None:
        """StoreError naming the damage, before deltalake sees a damaged log (it would print
        Rust panics and debug dumps, or read fewer rows)."""
        problems = self.log_problems(name, listing=listing)
        if problems:
            raise StoreError(f"table {name!r} is damaged: {problems[0]}; run `dlstore verify` "
                             "for the whole report")

    def compact(self, name: str) -> dict:
        """Merge the table's small Parquet files (a Delta OPTIMIZE commit); readers of older
        snapshots keep working, concurrent appends are not lost."""
        self.check_log(name)
        size = sum(f.size for f in self.location.list(f"{self.prefix}/{name}"))
        self.location.check_space(size, f"compacting table {name!r}")
        with self.location.exclusive(COMPACT_LOCK.format(name=name), wait=True):
            try:  # opened under the lock: it sees what an earlier holder merged
                result = self._open(name).optimize.compact(target_size=COMPACT_TARGET_BYTES,
                                                           writer_properties=_WRITER)
            except (DeltaError, OSError) as e:
                raise StoreError(f"cannot compact table {name!r} at {self.path(name)}: "
                                 f"{_first_line(e)}") from None
        self._raise_head(name)
        return result

    def stale_files(self, name: str, cutoff: float) -> list[str]:
        """Data files of the table that no snapshot since `cutoff` (seconds since the epoch)
        needs: removed from the table (by a compaction) before `cutoff`, and still present;
        and files no log entry ever added (a compaction that lost a race, an append that died
        before its commit) written before `cutoff` and at least ORPHAN_SECONDS ago, so that an
        append in flight, whose file is not in the log yet, is never among them."""
        self.check_log(name)
        try:
            tombstoned = self._open(name).vacuum(retention_hours=0, dry_run=True,
                                                 enforce_retention_duration=False)
        except (DeltaError, OSError) as e:
            raise StoreError(f"cannot list old files of table {name!r}: {_first_line(e)}"
                             ) from None
        removed_at, added = self._removal_times(name)
        live = set(self._replay(name).files)
        present = {info.key.rsplit("/", 1)[-1]: info
                   for info in self.location.list(f"{self.prefix}/{name}")
                   if info.key.count("/") == self.prefix.count("/") + 2}  # not in _delta_log/
        orphan_before = min(cutoff, time.time() - ORPHAN_SECONDS)
        # a tombstone whose log entry was cleaned up is older than the log's retention
        stale = {path for path in tombstoned if path in present
                 and removed_at.get(path, 0.0) < cutoff}
        stale |= {path for path, info in present.items() if path.endswith(".parquet")
                  and path not in live and path not in added and path not in tombstoned
                  and info.mtime < orphan_before}
        return sorted(stale)

    def remove_file(self, name: str, path: str) -> None:
        self.location.remove(f"{self.prefix}/{name}/{path}")

    def _removal_times(self, name: str) -> tuple[dict[str, float], set[str]]:
        """(data file -> when a commit removed it from the table (seconds), every data file a
        log entry still present added), from the log."""
        commits, _ = self._log_entries(name)
        removed, added = {}, set()
        for version in sorted(commits):
            try:
                data = self.location.read_bytes(commits[version].key)
            except FileNotFoundError:  # cleaned up after a checkpoint meanwhile
                continue
            for line in data.splitlines():
                action = json.loads(line) if line.strip() else {}
                if not isinstance(action, dict):
                    continue
                if isinstance(action.get("remove"), dict) and "path" in action["remove"]:
                    removed[action["remove"]["path"]] = float(
                        action["remove"].get("deletionTimestamp", 0)) / 1000
                if isinstance(action.get("add"), dict) and "path" in action["add"]:
                    added.add(action["add"]["path"])
        return removed, added

    def snapshot(self, name: str) -> tuple[int, list[str]]:
        """(version, Parquet file URIs) of the table's current snapshot, replayed from its log
        (`dlstore.store.deltalog`: only the entries committed since the last call are read).
        A table that a newer dlstore added and this store has not written yet reads as empty
        (version -1)."""
        replay = self._replay(name)
        base = self.path(name)
        return replay.version, [f"{base}/{path}" for path in replay.files]

    def _replay(self, name: str) -> LogReplay:
        replay = self._replays.setdefault(name, LogReplay())
        for _ in range(3):
            listing = self._listing(name)  # one listing for the check and the replay
            self.check_log(name, listing)
            _, commits, checkpoints = listing
            if not commits and not checkpoints:
                if self.location.list(f"{self.prefix}/{name}"):
                    raise StoreError(f"table {name!r} is missing from the store "
                                     f"({self.path(name)})")
                return replay
            try:
                replay.advance({v: info.key for v, info in commits.items()}, checkpoints,
                               self.location.read_bytes)
                return replay
            except FileNotFoundError:
                continue  # a log clean-up after a new checkpoint removed entries we listed
            except UnsupportedTable as e:
                raise StoreError(f"table {name!r} uses a Delta feature dlstore does not read "
                                 f"({e}): {self.path(name)}") from None
            except (ValueError, KeyError, TypeError, OSError, pa.ArrowException) as e:
                raise StoreError(f"table {name!r} cannot be read ({self.path(name)}): "
                                 f"{_first_line(e)}; run `dlstore verify`") from None
        raise StoreError(f"table {name!r} cannot be read ({self.path(name)}): its log changed "
                         "under three readings in a row")

    def data_files(self, name: str) -> list[tuple[str, int]]:
        """(URI, rows the log records) of every data file of the current snapshot."""
        replay = self._replay(name)
        base = self.path(name)
        return [(f"{base}/{path}", rows) for path, rows in replay.files.items()]


def _first_line(error: Exception) -> str:
    """The first line of a deltalake / OS error, without Rust's debug dumps."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    line = re.split(r"\b[A-Z]\w+ \{ ", line)[0].rstrip(": ")  # a Rust value's Debug text
    return line if len(line) <= 300 else line[:300] + "..."
