"""The live data files of a Delta table, read from its `_delta_log` directly.

Opening a `deltalake.DeltaTable` costs about 5 ms of fixed work per table on a 2-core machine,
and a query over `final` reads five tables: a cold `dlstore sql` spent a quarter of its time
there. A reader needs much less than deltalake builds: the table's version and which Parquet
files its snapshot holds. That is a replay of the log (Delta protocol, "Action Reconciliation"):
start from the newest checkpoint (its `add` rows are the files live at its version), then apply
each later JSON entry in order, an `add` making a file live and a `remove` retiring it.

Only what dlstore's tables use is read: no partition columns, no deletion vectors, no column
mapping. A table that needs any of them raises, rather than being read wrongly. Writes,
compaction and vacuum stay with deltalake; `tests/test_deltalog.py` holds this replay against
`DeltaTable.file_uris()` after appends, compactions, checkpoints and log clean-ups.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

# reader features (Delta protocol) this replay honours: the timestamp types change how values
# are read, which DuckDB does from the files themselves, not which files are live
_READER_FEATURES = {"timestampNtz"}


class UnsupportedTable(ValueError):
    """The log uses a Delta feature this replay does not read (the message says which)."""


class LogReplay:
    """One table's snapshot, brought forward entry by entry as the log grows.

    `files` maps each live file's path (relative to the table, unquoted) to its row count from
    the log's statistics (-1 where a writer recorded none)."""

    def __init__(self) -> None:
        self.version = -1
        self.files: dict[str, int] = {}

    def advance(self, commits: dict[int, str], checkpoints: dict[int, list[str]],
                read: Callable[[str], bytes]) -> None:
        """Bring the snapshot to the newest version of the log listing (`commits`: version ->
        key of its JSON entry; `checkpoints`: version -> keys of its parts), reading files
        through `read`. A listing whose entries after this snapshot are all present is applied
        on top of it; otherwise the replay starts again from the newest checkpoint."""
        newest = max([*commits, *checkpoints], default=-1)
        if newest <= self.version:
            return
        if not all(v in commits for v in range(self.version + 1, newest + 1)):
            start = max((v for v in checkpoints if v <= newest), default=-1)
            files = {}
            if start >= 0:
                for key in checkpoints[start]:
                    _apply_checkpoint(read(key), files)
            self.version, self.files = start, files
        for version in range(self.version + 1, newest + 1):
            _apply_entry(read(commits[version]), self.files)
            self.version = version


def _apply_entry(data: bytes, files: dict[str, int]) -> None:
    for line in data.splitlines():
        if not line.strip():
            continue
        action = json.loads(line)
        if "add" in action:
            add = action["add"]
            _check_add(add)
            files[unquote(add["path"])] = _records(add.get("stats"))
        elif "remove" in action:
            files.pop(unquote(action["remove"]["path"]), None)
        elif "protocol" in action:
            _check_protocol(action["protocol"])
        elif "metaData" in action:
            _check_metadata(action["metaData"])


def _apply_checkpoint(data: bytes, files: dict[str, int]) -> None:
    table = pq.read_table(pa.BufferReader(data))
    names = set(table.column_names)
    for row in table.select([n for n in ("add", "protocol", "metaData") if n in names]
                            ).to_pylist():
        if row.get("protocol"):
            _check_protocol(row["protocol"])
        if row.get("metaData"):
            _check_metadata(row["metaData"])
        add = row.get("add")
        if add:
            _check_add(add)
            files[unquote(add["path"])] = _records(add.get("stats"))


def _check_add(add: dict) -> None:
    if add.get("deletionVector"):
        raise UnsupportedTable("a data file with a deletion vector")
    if add.get("partitionValues"):
        raise UnsupportedTable("a partitioned data file")


def _check_protocol(protocol: dict) -> None:
    if int(protocol.get("minReaderVersion", 1)) > 3:
        raise UnsupportedTable(f"reader version {protocol['minReaderVersion']}")
    unknown = set(protocol.get("readerFeatures") or ()) - _READER_FEATURES
    if unknown:
        raise UnsupportedTable("reader features " + ", ".join(sorted(unknown)))


def _check_metadata(metadata: dict) -> None:
    if metadata.get("partitionColumns"):
        raise UnsupportedTable("partition columns")
    configuration = dict(metadata.get("configuration") or {})  # a checkpoint's map: pairs
    mode = configuration.get("delta.columnMapping.mode") or "none"
    if mode != "none":
        raise UnsupportedTable(f"column mapping ({mode})")


def _records(stats: str | None) -> int:
    if not stats:
        return -1
    return int(json.loads(stats).get("numRecords", -1))
