"""Store maintenance: check every byte and every reference (`verify`).

Everything here reads the store through the same objects the rest of dlstore uses and reports
problems by name; nothing here changes a store.
"""

from __future__ import annotations

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
    checkpoint row points to a shard that exists, verifies and holds its member."""
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
    if "checkpoints" in report.table_rows:
        rows = store.sql("SELECT run_id, step, blob, member FROM checkpoints")
        report.checkpoints = rows.height
        for run_id, step, blob, member in rows.iter_rows():
            if blob not in members:
                state = "missing" if blob not in blobs else "corrupted"
                report.problems.append(f"checkpoint {run_id} step {step}: shard {blob} is {state}")
            elif member >= members[blob]:
                report.problems.append(f"checkpoint {run_id} step {step}: shard {blob} has "
                                       f"{members[blob]} members, not member {member}")
    return report
