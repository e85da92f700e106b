"""A DuckDB connection with one view per table over its current Delta snapshot, plus the
convenience views researchers query (`final`, `curves`, `metrics_wide`), defined here in SQL.

Views read the snapshot's Parquet file list directly (`read_parquet([...])`), which is several
times faster for filtered aggregates than going through a registered Arrow dataset. On an object
store DuckDB reads local copies of the same files (see `Location.readable_files`): no extension
is downloaded.
"""

from __future__ import annotations

import hashlib
import re

import duckdb
import pyarrow as pa

from dlstore.errors import StoreError
from dlstore.schemas import HYPERPARAMETER_COLUMNS, TABLES
from dlstore.store.sandbox import sandboxed_connection
from dlstore.store.tables import Tables

_HYPER = ", ".join(f"r.{c}" for c in HYPERPARAMETER_COLUMNS)
# what the members of a group share: their first run's hyperparameters but the per-run ones
_GROUP_HYPER = ", ".join(f"r.{c}" for c in HYPERPARAMETER_COLUMNS
                         if c not in ("run_id", "zoo", "status", "seed"))

# a tracked run whose latest `running` update (its heartbeat) is older than this has died
STALE_SECONDS = 180.0

# Raw tables are `_<name>`; user-facing views hide rows of commits whose runs row never landed.
VIEWS = {
    # concurrent builders of one spec may each record it: show the first
    # a zoo removed whole (`dlstore rm --zoo`) leaves with the spec rows recorded before
    "zoos": """
        SELECT * EXCLUDE (_rank) FROM (
            SELECT *, row_number() OVER (PARTITION BY zoo, spec_hash ORDER BY created_at)
                AS _rank
            FROM _zoos z
            WHERE NOT EXISTS (SELECT 1 FROM _removed x WHERE x.run_id IS NULL
                              AND x.zoo = z.zoo AND x.removed_at >= z.created_at))
        WHERE _rank = 1""",
    # a fit re-run under the same label replaces the earlier one (fits without a label, written
    # before labels existed, are all shown); every row stays in _fits
    "fits": """
        SELECT * EXCLUDE (_rank) FROM (
            SELECT *, row_number() OVER (PARTITION BY coalesce(label, fit_id)
                                         ORDER BY created_at DESC, fit_id) AS _rank
            FROM _fits)
        WHERE _rank = 1""",
    # the latest value of each tag; an empty value removed the tag
    "tags": """
        SELECT run_id, key, value, created_at FROM (
            SELECT *, row_number() OVER (PARTITION BY run_id, key ORDER BY created_at DESC)
                AS _rank
            FROM _tags t
            WHERE NOT EXISTS (SELECT 1 FROM _removed x WHERE x.run_id = t.run_id
                              AND x.removed_at >= t.created_at))
        WHERE _rank = 1 AND value <> ''""",
    # the first runs row of each run that `dlstore rm` has not hidden (a rebuild after a removal
    # writes a later row, which shows), with its tags as a map (tags['note']); a tracked run's
    # status and final step are its latest update's. A commit writes a run's row once, so
    # (run_id, commit_id) names the row: found by a join, not a window over every column (twice
    # as long). Materialized by `Catalog` (one row per run: every view over runs joins a table,
    # not this query; a process loads it as the last to compute it saved it); the `runs` view
    # on top turns a `running` run whose heartbeat is older than STALE_SECONDS into `died`, at
    # query time.
    "_runs_latest": """
        SELECT u.* REPLACE (
                   coalesce(s.status, u.status) AS status,
                   coalesce(s.final_step, u.final_step) AS final_step),
               s.error, s.updated_at, coalesce(s.updated_at, u.created_at) AS _heartbeat,
               coalesce(t.tags, MAP {}::MAP(VARCHAR, VARCHAR)) AS tags
        FROM _runs u
        JOIN (SELECT run_id, arg_min(commit_id, (created_at, commit_id)) AS commit_id
              FROM _runs r
              WHERE NOT EXISTS (SELECT 1 FROM _removed x WHERE x.run_id = r.run_id
                                AND x.removed_at >= r.created_at)
              GROUP BY run_id) f ON f.run_id = u.run_id AND f.commit_id = u.commit_id
        LEFT JOIN (SELECT run_id, map_from_entries(list((key, value) ORDER BY key)) AS tags
                   FROM tags GROUP BY run_id) t ON t.run_id = u.run_id
        LEFT JOIN (SELECT run_id, arg_max(status, created_at) AS status,
                          arg_max(final_step, created_at) FILTER (WHERE final_step IS NOT NULL)
                              AS final_step,
                          arg_max(error, created_at) AS error, max(created_at) AS updated_at
                   FROM _run_updates GROUP BY run_id) s ON s.run_id = u.run_id""",
    "runs": f"""
        SELECT * EXCLUDE (_heartbeat) REPLACE (
            CASE WHEN status = 'running'
                      AND _heartbeat < now() - INTERVAL {int(STALE_SECONDS)} SECOND
                 THEN 'died' ELSE status END AS status)
        FROM _runs_latest""",
    "checkpoints": """
        SELECT c.* EXCLUDE (commit_id) FROM _checkpoints c
        JOIN runs r ON c.run_id = r.run_id AND c.commit_id = r.commit_id""",
    "metrics": """
        SELECT m.* EXCLUDE (commit_id) FROM _metrics m
        JOIN runs r ON m.run_id = r.run_id AND m.commit_id = r.commit_id""",
    "masks": """
        SELECT m.* EXCLUDE (commit_id) FROM _masks m
        JOIN runs r ON m.run_id = r.run_id AND m.commit_id = r.commit_id""",
    # each run's metrics at its last checkpoint with weights, with its hyperparameters (the
    # join on the runs row's commit is what `metrics` does: one join, not two)
    "final": f"""
        SELECT {_HYPER}, m.step, m.metric, m.tensor, m.value
        FROM _metrics m JOIN runs r ON m.run_id = r.run_id AND m.commit_id = r.commit_id
                                   AND m.step = r.final_step""",
    # group metrics with the hyperparameters the group's runs share; concurrent writers of one
    # group may each record it: show the first
    "group_metrics": f"""
        SELECT g.group_id, g.zoo, g.run_ids, g.group_key, {_GROUP_HYPER}, g.step, g.metric,
               g.value, g.created_at
        FROM (SELECT *, row_number() OVER (PARTITION BY group_id, step, metric
                                           ORDER BY created_at) AS _rank
              FROM _group_metrics) g
        JOIN runs r ON r.run_id = g.run_ids[1]
        WHERE g._rank = 1 AND NOT EXISTS (
            SELECT 1 FROM _removed x WHERE list_contains(g.run_ids, x.run_id)
                                       AND x.removed_at >= g.created_at)""",
    # whole-model metrics along training, with epochs and hyperparameters (the rows of the
    # runs row's commit, as `metrics` and `checkpoints` show them, joined once)
    "curves": f"""
        SELECT {_HYPER}, m.step, c.epoch, m.metric, m.value
        FROM _metrics m JOIN runs r ON m.run_id = r.run_id AND m.commit_id = r.commit_id
        LEFT JOIN _checkpoints c ON c.run_id = m.run_id AND c.commit_id = r.commit_id
                                AND c.step = m.step
        WHERE m.tensor IS NULL""",
    # every run of a tickets zoo with its lineage and its final accuracy and loss
    "tickets": """
        SELECT r.run_id, r.zoo, r.status, coalesce(r.condition, 'base') AS condition, r.seed,
               r.level, r.density, r.rewind_step, r.control,
               CASE WHEN r.control IS NOT NULL THEN r.control
                    WHEN r.level = 0 THEN 'dense' ELSE 'ticket' END AS kind,
               r.parent_run_id, r.source_run_id,
               CASE WHEN r.source_run_id IS NOT NULL THEN coalesce(s.condition, 'base') END
                   AS source_condition,
               r.mask_id, r.optimizer, r.dataset, r.n_train, r.label_noise, r.final_step,
               max(m.value) FILTER (WHERE m.metric = 'test_acc') AS test_acc,
               max(m.value) FILTER (WHERE m.metric = 'test_loss') AS test_loss,
               max(m.value) FILTER (WHERE m.metric = 'train_acc') AS train_acc
        FROM runs r
        LEFT JOIN runs s ON s.run_id = r.source_run_id
        LEFT JOIN _metrics m ON m.run_id = r.run_id AND m.commit_id = r.commit_id
                             AND m.step = r.final_step AND m.tensor IS NULL
        WHERE r.level IS NOT NULL
        GROUP BY ALL""",
    # transferred tickets by source condition x target condition x level (density), mean test
    # accuracy over seeds, beside their controls and the tickets found on the target itself
    "ticket_transfer": """
        WITH moved AS (
            SELECT zoo, source_condition, condition AS target_condition, level, rewind_step,
                   avg(density) AS density,
                   avg(test_acc) FILTER (WHERE kind = 'ticket') AS transferred,
                   avg(test_acc) FILTER (WHERE kind = 'reinit') AS transferred_reinit,
                   avg(test_acc) FILTER (WHERE kind = 'random_mask') AS transferred_random_mask,
                   count(*) FILTER (WHERE kind = 'ticket') AS n
            FROM tickets WHERE source_run_id IS NOT NULL GROUP BY ALL),
        native AS (
            SELECT zoo, condition, level, rewind_step,
                   avg(test_acc) FILTER (WHERE kind = 'ticket') AS target_ticket,
                   avg(test_acc) FILTER (WHERE kind = 'reinit') AS target_reinit,
                   avg(test_acc) FILTER (WHERE kind = 'random_mask') AS target_random_mask
            FROM tickets WHERE source_run_id IS NULL AND level > 0 GROUP BY ALL),
        dense AS (
            SELECT zoo, condition, avg(test_acc) AS target_dense
            FROM tickets WHERE kind = 'dense' GROUP BY ALL)
        SELECT m.*, n.target_ticket, n.target_reinit, n.target_random_mask, d.target_dense
        FROM moved m
        LEFT JOIN native n ON n.zoo = m.zoo AND n.condition = m.target_condition
                          AND n.level = m.level AND n.rewind_step = m.rewind_step
        LEFT JOIN dense d ON d.zoo = m.zoo AND d.condition = m.target_condition""",
}

# computed once over the current snapshots, again whenever a table they read changes, and
# registered as Arrow tables: small, and read by most queries (a join against a table binds and
# runs several times faster than one against the query behind it). Each is saved under
# `cache/` in a local store, named by what it was computed from, so that the next process's
# first query loads it instead of computing it
MATERIALIZED = {"_runs_latest"}

# one row per (run, step), one column per whole-model metric; DuckDB views need the pivot
# columns spelled out, so the list is read from the data whenever the metrics table changes
_WIDE = """
    PIVOT (SELECT run_id, step, metric, value FROM metrics WHERE tensor IS NULL)
    ON metric IN ({names}) USING first(value) GROUP BY run_id, step"""


# the views each view reads, found in its SQL: creating a view binds it (DuckDB reads the
# footers of every Parquet file under it), so a query creates only the views it names
_DEPENDS = {name: {other for other in VIEWS if other != name
                   and re.search(rf"\b{other}\b", body)} for name, body in VIEWS.items()}
_DEPENDS["metrics_wide"] = {"metrics"}


# the tables each view reads itself (`_<table>`)
_TABLES_DIRECT = {view: {name for name in TABLES
                         if re.search(rf"\b_{name}\b", VIEWS.get(view, ""))}
                  for view in _DEPENDS}
_TABLES_DIRECT["metrics_wide"] = {"metrics"}  # its pivot columns come from _metrics


def _tables_read(view: str) -> set[str]:
    """The tables a view reads, through the views it reads."""
    return _TABLES_DIRECT[view].union(*(_tables_read(other) for other in _DEPENDS[view]))


_TABLES_READ = {view: _tables_read(view) for view in _DEPENDS}

# where the materialized views are kept between processes, under the store's root
CACHE = "cache"


class Catalog:
    def __init__(self, tables: Tables):
        self.tables = tables
        # DuckDB reads the table files and nothing else (see sandbox.py)
        self.con = sandboxed_connection([tables.location.readable_directory(tables.prefix)])
        self._snapshots: dict[str, tuple[int, list[str]]] = {}  # as the last refresh found
        self._tables: dict[str, int] = {}  # the version each `_<table>` view reads
        self._views: set[str] = set()  # views created over the current snapshots

    def refresh(self, query: str | None = None) -> duckdb.DuckDBPyConnection:
        try:
            return self._refresh(query)
        except duckdb.Error as e:  # a table file missing or damaged under the snapshot
            detail = " ".join(str(e).split())[:300]
            raise StoreError(f"the store's tables cannot be read ({detail}); run `dlstore "
                             "verify`") from None

    def _refresh(self, query: str | None) -> duckdb.DuckDBPyConnection:
        """Point the views `query` names at their tables' current snapshots and make sure
        they exist (every table and view when it names none, as a listing of the catalog
        does, or when no query is given). Only the tables it reads are checked for commits:
        each check reads the table's Delta log."""
        views = {name for name in _DEPENDS if query is not None
                 and re.search(rf"\b{name}\b", query, re.IGNORECASE)}
        tables = {name for name in TABLES if query is not None
                  and re.search(rf"\b_{name}\b", query, re.IGNORECASE)}
        if not views and not tables:
            views, tables = set(_DEPENDS), set(TABLES)
        changed = False
        for name in sorted(tables.union(*(_TABLES_READ[v] for v in views))):
            snapshot = self.tables.snapshot(name)
            if self._snapshots.get(name, (None,))[0] != snapshot[0]:
                self._snapshots[name] = snapshot
                changed = True
        if changed:  # views made over older snapshots are made again when next named
            self._views.clear()
        for name in tables:
            self._table(name)
        for name in views - self._views:
            self._create(name)
        return self.con

    def _table(self, name: str) -> None:
        """The view `_<name>` over the table's snapshot as the last refresh found it: made
        when a view that reads it is made (binding it reads its Parquet footers)."""
        version, files = self._snapshots[name]
        if self._tables.get(name) == version:
            return
        # the empty table of the current schema first: every column exists, in schema order,
        # null in files written before a column was added
        source = _empty_select(TABLES[name])
        if files:
            files = self.tables.location.readable_files(files)
            listing = ", ".join(_sql_string(f) for f in files)
            source += (" UNION ALL BY NAME SELECT * FROM "
                       f"read_parquet([{listing}], union_by_name = true)")
        self.con.execute(f"CREATE OR REPLACE VIEW _{name} AS {source}")
        self._tables[name] = version

    def _create(self, name: str) -> None:
        if name in MATERIALIZED:
            self._materialize(name)
            return
        self._inputs(name)
        if name == "metrics_wide":
            # DuckDB views need the pivot columns spelled out: read from the data
            names = [r[0] for r in self.con.execute(
                "SELECT DISTINCT metric FROM _metrics WHERE tensor IS NULL ORDER BY 1").fetchall()]
            body = (_WIDE.format(names=", ".join(_sql_string(n) for n in names)) if names
                    else "SELECT run_id, step FROM metrics WHERE false")
        else:
            body = VIEWS[name]
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
        self._views.add(name)

    def _inputs(self, name: str) -> None:
        """What a view reads, made first: DuckDB binds a view when it is created."""
        for other in _DEPENDS[name] - self._views:
            self._create(other)
        for table in _TABLES_DIRECT[name]:
            self._table(table)

    # -- the materialized views, kept between processes ------------------------------------

    def _materialize(self, name: str) -> None:
        """`name` as an Arrow table registered under its name: the copy an earlier process
        saved over the same snapshots where there is one (a few milliseconds instead of the
        query behind it, which was most of a process's first query), else computed and saved
        for the next process."""
        key = self._cache_key(name)
        frame = self._load(key)
        if frame is None:
            self._inputs(name)
            frame = self.con.sql(VIEWS[name]).to_arrow_table()
            self._save(name, key, frame)
        self.con.register(name, frame)
        self._views.add(name)

    def _cache_key(self, name: str) -> str | None:
        """The file that holds `name` materialized over the current snapshots (local stores
        only: a reader does not write to an object store): named by a hash of everything its
        rows depend on, so that a commit to a table it reads, another dlstore or DuckDB, or a
        table file changed on disk names another file. That is the SQL behind it and the views
        it reads, the schemas of the tables it reads, and their Parquet files: names in the
        table (a store moved whole keeps its copies), sizes and modification times (a file
        truncated or replaced is read again, and found damaged as the query would find it).
        None where a file is missing: the query finds that."""
        if not self.tables.location.local:
            return None
        digest = hashlib.sha256()
        parts = [duckdb.__version__, *(VIEWS[v] for v in sorted(_DEPENDS[name] | {name}))]
        for table in sorted(_TABLES_READ[name]):
            base, folder = self.tables.path(table), f"{self.tables.prefix}/{table}"
            parts += [table, str(TABLES[table])]
            for path in sorted(self._snapshots[table][1]):
                in_table = path.removeprefix(base)
                info = self.tables.location.info(folder + in_table)
                if info is None:
                    return None
                parts.append(f"{in_table} {info.size} {info.mtime!r}")
        for part in parts:
            digest.update(part.encode() + b"\0")
        return f"{CACHE}/{name}-{digest.hexdigest()[:32]}.arrow"

    def _load(self, key: str | None) -> pa.Table | None:
        """The saved copy of a materialized view (`key`: `_cache_key`); None when there is
        none or it cannot be read (then it is computed)."""
        if key is None:
            return None
        try:
            data = self.tables.location.read_bytes(key)
            return pa.ipc.open_file(pa.BufferReader(data)).read_all()
        except (OSError, pa.ArrowException):
            return None

    def _save(self, name: str, key: str | None, frame: pa.Table) -> None:
        """Keep `frame` for later processes, written atomically, replacing the copies of older
        snapshots. A failure to write costs only the time it would have saved."""
        if key is None:
            return
        location = self.tables.location
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, frame.schema) as writer:
            writer.write_table(frame)
        try:
            # not synced: a copy lost to a crash is computed again (and one torn by it does
            # not read as Arrow, so it is computed again too)
            location.write_atomic(key, sink.getvalue().to_pybytes(), durable=False)
            for old in location.list(CACHE):
                if old.key != key and old.key.rsplit("/", 1)[-1].startswith(f"{name}-"):
                    location.remove(old.key)
        except OSError:
            pass


def _sql_type(kind: pa.DataType) -> str:
    if pa.types.is_list(kind):
        return _sql_type(kind.value_type) + "[]"
    if pa.types.is_timestamp(kind):
        return "TIMESTAMPTZ" if kind.tz else "TIMESTAMP"
    return {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.int32(): "INTEGER",
            pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"}[kind]


def _empty_select(schema: pa.Schema) -> str:
    """A query of no rows with the schema's columns, typed, in order: what a table reads as
    before its first append (written in SQL: registering an Arrow table makes DuckDB import
    pandas, half a second of a cold query)."""
    columns = ", ".join(f"NULL::{_sql_type(f.type)} AS {f.name}" for f in schema)
    return f"SELECT {columns} WHERE false"


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
