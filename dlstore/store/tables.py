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

import pyarrow as pa
from deltalake import DeltaTable, Schema, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

from dlstore.errors import StoreError
from dlstore.schemas import TABLES
from dlstore.store.location import Location


class Tables:
    def __init__(self, location: Location, prefix: str = "tables"):
        self.location = location
        self.prefix = prefix
        self.options = location.storage_options
        self._current: set[str] = set()  # tables whose schema this process has brought up to date
        self._loaded: dict[str, DeltaTable] = {}  # snapshots read so far, brought up to date

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
        try:
            if not DeltaTable.is_deltatable(path, storage_options=self.options):
                local = self.location.local_path(f"{self.prefix}/{name}")
                if local is not None:
                    local.mkdir(parents=True, exist_ok=True)
                DeltaTable.create(path, schema=schema, mode="ignore",
                                  storage_options=self.options)
            else:
                table = self._open(name)
                have = {f.name for f in table.schema().fields}
                missing = pa.schema([f for f in schema if f.name not in have])
                if len(missing):
                    table.alter.add_columns(list(Schema.from_arrow(missing).fields))
        except (DeltaError, OSError) as e:
            raise StoreError(f"cannot create or update table {name!r} at {path}: "
                             f"{str(e).splitlines()[0] if str(e) else e}") from None
        self._current.add(name)

    def append(self, name: str, rows: list[dict] | dict[str, list]) -> None:
        """Append rows (a list of dicts, or a dict of equal-length columns) in one commit."""
        if isinstance(rows, dict):
            table = pa.Table.from_pydict(rows, schema=TABLES[name])
        else:
            table = pa.Table.from_pylist(rows, schema=TABLES[name])
        if table.num_rows == 0:
            return
        self._ensure_schema(name)
        try:
            write_deltalake(self.path(name), table, mode="append",
                            storage_options=self.options)
        except (DeltaError, OSError) as e:
            raise StoreError(f"cannot append to table {name!r} at {self.path(name)}: "
                             f"{str(e).splitlines()[0] if str(e) else e}") from None

    def compact(self, name: str) -> dict:
        """Merge the table's small Parquet files (a Delta OPTIMIZE commit); readers of older
        snapshots keep working, concurrent appends are not lost."""
        return self._open(name).optimize.compact()

    def vacuum(self, name: str, retention_hours: int, dry_run: bool) -> list[str]:
        """Files no snapshot younger than `retention_hours` needs: removed unless `dry_run`."""
        return self._open(name).vacuum(
            retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False)

    def snapshot(self, name: str) -> tuple[int, list[str]]:
        """(version, Parquet file URIs) of the table's current snapshot. A table that a newer
        dlstore added and this store has not written yet reads as empty (version -1)."""
        try:
            table = self._loaded.get(name)
            if table is None:
                table = self._loaded[name] = self._open(name)
            else:  # only the log entries committed since (on an object store: fewer requests)
                table.update_incremental()
        except TableNotFoundError:
            if not self.location.list(f"{self.prefix}/{name}"):
                return -1, []
            raise StoreError(f"table {name!r} is missing from the store ({self.path(name)})"
                             ) from None
        except (DeltaError, OSError) as e:
            raise StoreError(f"table {name!r} cannot be read ({self.path(name)}): {e}") from None
        return table.version(), table.file_uris()
