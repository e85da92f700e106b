"""Delta Lake tables: one per schema in `dlstore.schemas`, appended to with ACID commits.

Several processes may append to the same table at once (Delta's optimistic concurrency); a
reader sees the files of one committed snapshot and never blocks a writer.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

from dlstore.errors import StoreError
from dlstore.schemas import TABLES


class Tables:
    def __init__(self, root: Path):
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / name

    def create_missing(self) -> None:
        for name, schema in TABLES.items():
            if not DeltaTable.is_deltatable(str(self.path(name))):
                self.path(name).mkdir(parents=True, exist_ok=True)
                DeltaTable.create(str(self.path(name)), schema=schema, mode="ignore")

    def append(self, name: str, rows: list[dict] | dict[str, list]) -> None:
        """Append rows (a list of dicts, or a dict of equal-length columns) in one commit."""
        if isinstance(rows, dict):
            table = pa.Table.from_pydict(rows, schema=TABLES[name])
        else:
            table = pa.Table.from_pylist(rows, schema=TABLES[name])
        if table.num_rows == 0:
            return
        try:
            write_deltalake(str(self.path(name)), table, mode="append")
        except (DeltaError, OSError) as e:
            raise StoreError(f"cannot append to table {name!r} at {self.path(name)}: "
                             f"{str(e).splitlines()[0] if str(e) else e}") from None

    def compact(self, name: str) -> dict:
        """Merge the table's small Parquet files (a Delta OPTIMIZE commit); readers of older
        snapshots keep working, concurrent appends are not lost."""
        return DeltaTable(str(self.path(name))).optimize.compact()

    def vacuum(self, name: str, retention_hours: int, dry_run: bool) -> list[str]:
        """Files no snapshot younger than `retention_hours` needs: removed unless `dry_run`."""
        return DeltaTable(str(self.path(name))).vacuum(
            retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False)

    def snapshot(self, name: str) -> tuple[int, list[str]]:
        """(version, Parquet file URIs) of the table's current snapshot. A table that a newer
        dlstore added and this store has not written yet reads as empty (version -1)."""
        if not self.path(name).exists():
            return -1, []
        try:
            table = DeltaTable(str(self.path(name)))
        except TableNotFoundError:
            raise StoreError(f"table {name!r} is missing from the store ({self.path(name)})"
                             ) from None
        except (DeltaError, OSError) as e:
            raise StoreError(f"table {name!r} cannot be read ({self.path(name)}): {e}") from None
        return table.version(), table.file_uris()
