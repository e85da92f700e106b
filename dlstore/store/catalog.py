"""A DuckDB connection with one view per table over its current Delta snapshot, plus the
convenience views researchers query (`final`, `curves`, `metrics_wide`), defined here in SQL.

Views read the snapshot's Parquet file list directly (`read_parquet([...])`), which is several
times faster for filtered aggregates than going through a registered Arrow dataset. On an object
store DuckDB reads local copies of the same files (see `Location.readable_files`): no extension
is downloaded.
"""

from __future__ import annotations

import duckdb

from dlstore.schemas import HYPERPARAMETER_COLUMNS, TABLES
from dlstore.store.tables import Tables

_HYPER = ", ".join(f"r.{c}" for c in HYPERPARAMETER_COLUMNS)

# Raw tables are `_<name>`; user-facing views hide rows of commits whose runs row never landed.
VIEWS = {
    # concurrent builders of one spec may each record it: show the first
    "zoos": """
        SELECT * EXCLUDE (_rank) FROM (
            SELECT *, row_number() OVER (PARTITION BY zoo, spec_hash ORDER BY created_at)
                AS _rank
            FROM _zoos)
        WHERE _rank = 1""",
    "fits": "SELECT * FROM _fits",
    "runs": """
        SELECT * EXCLUDE (_rank) FROM (
            SELECT *, row_number() OVER (PARTITION BY run_id ORDER BY created_at, commit_id)
                AS _rank
            FROM _runs)
        WHERE _rank = 1""",
    "checkpoints": """
        SELECT c.* EXCLUDE (commit_id) FROM _checkpoints c
        JOIN runs r ON c.run_id = r.run_id AND c.commit_id = r.commit_id""",
    "metrics": """
        SELECT m.* EXCLUDE (commit_id) FROM _metrics m
        JOIN runs r ON m.run_id = r.run_id AND m.commit_id = r.commit_id""",
    # each run's metrics at its last checkpoint with weights, with its hyperparameters
    "final": f"""
        SELECT {_HYPER}, m.step, m.metric, m.tensor, m.value
        FROM metrics m JOIN runs r ON m.run_id = r.run_id AND m.step = r.final_step""",
    # whole-model metrics along training, with epochs and hyperparameters
    "curves": f"""
        SELECT {_HYPER}, m.step, c.epoch, m.metric, m.value
        FROM metrics m JOIN runs r ON m.run_id = r.run_id
        LEFT JOIN checkpoints c ON c.run_id = m.run_id AND c.step = m.step
        WHERE m.tensor IS NULL""",
}

# one row per (run, step), one column per whole-model metric; DuckDB views need the pivot
# columns spelled out, so the list is read from the data whenever the metrics table changes
_WIDE = """
    PIVOT (SELECT run_id, step, metric, value FROM metrics WHERE tensor IS NULL)
    ON metric IN ({names}) USING first(value) GROUP BY run_id, step"""


class Catalog:
    def __init__(self, tables: Tables):
        self.tables = tables
        self.con = duckdb.connect(":memory:")
        self._versions: dict[str, int] = {}

    def refresh(self) -> duckdb.DuckDBPyConnection:
        """Point the views at the tables' current snapshots (only those that changed)."""
        changed = False
        for name, schema in TABLES.items():
            version, files = self.tables.snapshot(name)
            if self._versions.get(name) == version:
                continue
            # the empty table of the current schema first: every column exists, in schema order,
            # null in files written before a column was added
            self.con.register(f"_empty_{name}", schema.empty_table())
            source = f"SELECT * FROM _empty_{name}"
            if files:
                files = self.tables.location.readable_files(files)
                listing = ", ".join(_sql_string(f) for f in files)
                source += (" UNION ALL BY NAME SELECT * FROM "
                           f"read_parquet([{listing}], union_by_name = true)")
            self.con.execute(f"CREATE OR REPLACE VIEW _{name} AS {source}")
            self._versions[name] = version
            changed = True
        if changed:
            for name, body in VIEWS.items():
                self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
            names = [r[0] for r in self.con.execute(
                "SELECT DISTINCT metric FROM _metrics WHERE tensor IS NULL ORDER BY 1").fetchall()]
            wide = (_WIDE.format(names=", ".join(_sql_string(n) for n in names)) if names
                    else "SELECT run_id, step FROM metrics WHERE false")
            self.con.execute(f"CREATE OR REPLACE VIEW metrics_wide AS {wide}")
        return self.con


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
