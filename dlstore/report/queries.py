"""The data of each panel of a report, read from a store by SQL that the page shows under it.

Every query runs as the exact text the page shows (parameters inlined as SQL literals), through
`Store.sql`, so a reader can paste it into `dlstore sql` and get the same rows. Each function
returns a JSON-ready dict with the panel's rows and its `sql`, or None where the zoo has no data
for that panel.
"""

from __future__ import annotations

import json
import math
import re

import polars as pl

from dlstore.analysis import phenomena
from dlstore.analysis.phases import (
    AXES,
    mc_metric,
    phase_of,
    phase_params,
    phase_query,
    spec_thresholds,
)
from dlstore.errors import NotFoundError
from dlstore.store.store import Store

# run columns the runs table may show, after run_id; those null for every run of a zoo are left
# out (a zoo of MLPs has no ticket columns)
RUN_COLUMNS = ("status", *[c for c in AXES if c != "status"], "seed", "final_step",
               "diverged_step", "device", "train_seconds")
# columns of the zoos view a summary shows where the store has them (a store written by an
# older or newer dlstore may lack some: the summary says what it has)
ZOO_COLUMNS = ("spec", "spec_hash", "created_at", "dlstore_version", "source_format",
               "source_path")


def literal(value) -> str:
    """A value as a SQL literal (text quoted, numbers as they are)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return "'" + str(value).replace("'", "''") + "'"


def inline(query: str, params: list) -> str:
    """`query` with each `?` placeholder replaced by its parameter as a literal (the report's
    queries hold no `?` inside strings), so the text shown is the text that ran."""
    parts = query.split("?")
    if len(parts) != len(params) + 1:
        raise ValueError(f"{len(parts) - 1} placeholders for {len(params)} parameters")
    return "".join(p + (literal(v) if i < len(params) else "")
                   for i, (p, v) in enumerate(zip(parts, [*params, None])))


def tidy(query: str) -> str:
    """A query's text as shown: common indentation and blank edges removed."""
    lines = query.strip("\n").splitlines()
    indent = min((len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()), default=0)
    return "\n".join(ln[indent:].rstrip() for ln in lines).strip()


def run(store: Store, query: str, params: list | None = None) -> tuple[pl.DataFrame, str]:
    """(rows, the SQL text that produced them)."""
    text = tidy(inline(query, params or []))
    return store.sql(text), text


def plain(value):
    """A cell as JSON: NaN and infinities (diverged runs) as null, times as ISO text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "isoformat"):
        return value.isoformat(sep=" ", timespec="seconds")
    return value


def rounded(value):
    """Floats to 6 significant digits: a 10,000-run page stays small, and no plot shows more."""
    value = plain(value)
    return float(f"{value:.6g}") if isinstance(value, float) else value


def columns(frame: pl.DataFrame) -> dict:
    """A frame as {"columns": names, "data": one list per column} (compact for many rows)."""
    return {"columns": frame.columns,
            "data": [[rounded(v) for v in frame[c].to_list()] for c in frame.columns]}


def zoo_names(store: Store, wanted: list[str] | None) -> list[str]:
    """The zoos a report covers: those named (each must be in the store), else every zoo."""
    held = store.sql("SELECT zoo FROM zoos UNION SELECT zoo FROM runs ORDER BY zoo")["zoo"]
    held = [z for z in held.to_list() if z is not None]
    if not wanted:
        if not held:
            raise NotFoundError(f"the store {store.root} holds no zoos yet; build one with "
                                "`dlstore build-zoo SPEC` or track runs with `store.track`")
        return held
    missing = [z for z in wanted if z not in held]
    if missing:
        raise NotFoundError(f"no zoo {', '.join(map(repr, missing))} in the store; its zoos: "
                            + (", ".join(held) or "none"))
    return list(dict.fromkeys(wanted))


def summary(store: Store, zoo: str) -> dict:
    have = set(store.sql("SELECT * FROM zoos LIMIT 0").columns)
    picked = [c for c in ZOO_COLUMNS if c in have]
    latest = "ORDER BY created_at DESC " if "created_at" in have else ""
    spec, spec_sql = run(store, f"""
        SELECT {', '.join(picked) or 'zoo'} FROM zoos WHERE zoo = ?
        {latest}LIMIT 1""", [zoo])
    counts, counts_sql = run(store, """
        WITH r AS (SELECT run_id, status, device, train_seconds FROM runs WHERE zoo = ?),
        c AS (SELECT count(*) AS checkpoints, coalesce(sum(n_bytes), 0)::BIGINT AS weight_bytes
              FROM checkpoints JOIN r USING (run_id)),
        m AS (SELECT count(*) AS metric_rows FROM metrics JOIN r USING (run_id))
        SELECT (SELECT count(*) FROM r) AS runs,
               (SELECT count(*) FROM r WHERE status = 'complete') AS complete,
               (SELECT count(*) FROM r WHERE status = 'diverged') AS diverged,
               (SELECT count(*) FROM r WHERE status = 'failed') AS failed,
               (SELECT count(*) FROM r WHERE status NOT IN ('complete', 'diverged', 'failed'))
                   AS other,
               c.checkpoints, c.weight_bytes, m.metric_rows,
               (SELECT sum(train_seconds) FROM r) AS train_seconds,
               (SELECT string_agg(DISTINCT device, ', ') FROM r) AS devices
        FROM c, m""", [zoo])
    row = {k: plain(v) for k, v in spec.row(0, named=True).items()} if spec.height else {}
    facts = {k: plain(v) for k, v in counts.row(0, named=True).items()}
    facts["origin"] = _origin(row)
    return {"zoo": zoo, "spec": row.pop("spec", None), "zoo_row": row, "facts": facts,
            "missing_columns": [c for c in ZOO_COLUMNS if c not in have],
            "sql": [spec_sql, counts_sql]}


def _origin(zoo_row: dict) -> str:
    """Where a zoo came from: `dlstore import` records its source's format and path, a build
    its spec; tracked runs (`Store.track`, the integrations, `import-runs`) record neither."""
    if zoo_row.get("source_format"):
        return f"imported ({zoo_row['source_format']} from {zoo_row.get('source_path')})"
    return "built" if zoo_row.get("spec") else "tracked"


def runs_table(store: Store, zoo: str) -> dict:
    metrics = store.sql("SELECT DISTINCT metric FROM final WHERE zoo = ? AND tensor IS NULL "
                        "ORDER BY metric", [zoo])["metric"].to_list()
    pivot = "".join(f",\n               max(f.value) FILTER (WHERE f.metric = {literal(m)}) AS "
                    f"{_ident(m)}" for m in metrics)
    frame, sql = run(store, f"""
        SELECT r.run_id, {', '.join(f'r.{c}' for c in RUN_COLUMNS)}{pivot}
        FROM runs r LEFT JOIN final f ON f.run_id = r.run_id AND f.tensor IS NULL
        WHERE r.zoo = ?
        GROUP BY ALL ORDER BY r.run_id""", [zoo])
    kept = [c for c in frame.columns if c == "run_id" or frame[c].null_count() < frame.height]
    frame = frame.select(kept)
    return {"sql": sql, "metrics": metrics, "hyper": [c for c in kept if c in AXES],
            "note": "columns null for every run of the zoo are left out", **columns(frame)}


def _ident(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else '"' + name.replace('"', '""') + '"'


def curves(store: Store, zoo: str) -> dict | None:
    """Whole-model metrics along training: per metric, one [run index, steps, epochs, values]
    entry per run (run index: its row in the runs table, ordered by run_id; steps and epochs:
    indices into `steps` and `epochs`, the distinct lists, which most runs of a zoo share)."""
    frame, sql = run(store, """
        SELECT run_id, metric, step, epoch, value FROM curves
        WHERE zoo = ? ORDER BY metric, run_id, step""", [zoo])
    if not frame.height:
        return None
    ids = store.sql("SELECT run_id FROM runs WHERE zoo = ? ORDER BY run_id", [zoo])["run_id"]
    index = {r: i for i, r in enumerate(ids.to_list())}
    grouped = frame.group_by(["metric", "run_id"], maintain_order=True).agg(
        "step", "epoch", "value")
    lists: dict[str, dict[tuple, int]] = {"steps": {}, "epochs": {}}

    def shared(kind: str, values: list) -> int:
        return lists[kind].setdefault(tuple(values), len(lists[kind]))

    series: dict[str, list] = {}
    for metric, run_id, steps, epochs, values in grouped.iter_rows():
        has_epochs = any(e is not None for e in epochs)
        series.setdefault(metric, []).append(
            [index.get(run_id), shared("steps", steps),
             shared("epochs", [rounded(e) for e in epochs]) if has_epochs else None,
             [rounded(v) for v in values]])
    return {"sql": sql, "series": series,
            **{kind: [list(k) for k in found] for kind, found in lists.items()}}


def phase_diagram(store: Store, zoo: str) -> dict | None:
    """Phases over the two hyperparameters the zoo's groups vary most in (Yang et al.)."""
    seeded = store.sql("SELECT count(*) AS n FROM group_metrics WHERE zoo = ? "
                       "AND metric = 'mode_connectivity'", [zoo])["n"][0]
    if not seeded:
        return None
    axes = _varying(store, "group_metrics", zoo)
    if len(axes) < 2:
        return None
    x, y = axes[:2]
    metric = mc_metric(store, zoo)
    frame, sql = run(store, phase_query(x, y), phase_params(zoo, metric))
    thresholds = spec_thresholds(store, zoo)
    labels = [phase_of(r["train_loss"], r["mode_connectivity"], r["cka"], r["hessian_top_eig"],
                       thresholds) if r["train_loss"] is not None
              and r["mode_connectivity"] is not None else None
              for r in frame.iter_rows(named=True)]
    frame = frame.with_columns(pl.Series("phase", labels, dtype=pl.String))
    return {"sql": sql, "x": x, "y": y, "thresholds": thresholds.model_dump(),
            "note": "phase: dlstore.analysis.phases.phase_of of each cell, with the zoo's "
                    f"[phases] thresholds; mode connectivity: {metric}", "mc_metric": metric,
            **columns(frame)}


def _varying(store: Store, view: str, zoo: str) -> list[str]:
    """The grid axes with more than one value in the zoo's rows of `view`, most values first;
    n_params last, since it follows from the architecture's own axes."""
    have = set(store.sql(f"SELECT * FROM {view} LIMIT 0").columns)
    axes = [a for a in AXES if a in have and a not in ("arch", "dataset")]
    counts = store.sql(f"SELECT {', '.join(f'count(DISTINCT {a}) AS {a}' for a in axes)} "
                       f"FROM {view} WHERE zoo = ?", [zoo]).row(0, named=True)
    return sorted((a for a in axes if counts[a] > 1), key=lambda a: (a == "n_params", -counts[a]))


def tickets(store: Store, zoo: str) -> dict | None:
    frame, sql = run(store, """
        SELECT condition, rewind_step, level, kind, avg(density) AS density,
               avg(test_acc) AS test_acc, stddev_samp(test_acc) AS test_acc_std,
               count(*) AS n
        FROM tickets
        WHERE zoo = ? AND source_run_id IS NULL AND kind <> 'order_copy'
        GROUP BY ALL ORDER BY condition, rewind_step, level, kind""", [zoo])
    if not frame.height:
        return None
    transfer, transfer_sql = run(store, """
        SELECT source_condition, target_condition, level, density, transferred,
               transferred_reinit, transferred_random_mask, target_ticket, target_dense
        FROM ticket_transfer WHERE zoo = ?
        ORDER BY level, source_condition, target_condition""", [zoo])
    return {"density": {"sql": sql, **columns(frame)},
            "transfer": {"sql": transfer_sql, **columns(transfer)} if transfer.height else None}


def fits(store: Store) -> dict | None:
    """Every fit of the fits view: scaling fits with their parameters and intervals (and the
    points their query selects, re-read through the same read-only SQL), weight-space fits
    with their scores."""
    frame, sql = run(store, """
        SELECT fit_id, label, kind, query, params, ci, ci_level, objective, n, warnings,
               created_at
        FROM fits ORDER BY created_at""")
    if not frame.height:
        return None
    scaling, wsl = [], []
    for row in frame.iter_rows(named=True):
        fit = {k: plain(v) for k, v in row.items()}
        fit["params"] = _json(row["params"])
        fit["ci"] = _json(row["ci"])
        if row["kind"] == "wsl":
            wsl.append(fit)
        else:
            fit["points"] = _fit_points(store, row["kind"], row["query"])
            scaling.append(fit)
    return {"sql": sql, "scaling": scaling, "wsl": wsl}


def _json(text):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _fit_points(store: Store, kind: str, query: str) -> dict | None:
    """The data a scaling fit was fitted to: its stored query run again (N, D, loss for a
    two-variable fit; the first two numeric columns for one variable). None where the query no
    longer answers (the runs were removed, say): the parameters still show."""
    from dlstore.errors import DlstoreError

    try:
        frame = store.sql(query)
    except DlstoreError:
        return None
    numeric = [c for c in frame.columns if frame[c].dtype.is_numeric()]
    wanted = ["N", "D", "loss"] if kind == "chinchilla" else numeric[:2]
    if len(wanted) < 2 or any(c not in frame.columns for c in wanted):
        return None
    return {"names": wanted, **columns(frame.select(wanted))}


# recipe -> (its table, the x column, the y columns, the column that colours lines, x scale)
RECIPES = {
    "double-descent": (phenomena.double_descent_table, "width", ("train_error", "test_error"),
                       None, "log"),
    "grokking": (phenomena.grokking_table, "step", ("train_acc", "test_acc"), "weight_decay",
                 "symlog"),
    "neural-collapse": (phenomena.collapse_table, "step", phenomena.COLLAPSE_COLUMNS, None,
                        "linear"),
    "simplicity-bias": (phenomena.simplicity_table, "step", ("test_acc", "clone_acc"), None,
                        "linear"),
}


class _Recording:
    """A store whose `sql` runs each query as its text with the parameters inlined and keeps
    that text: the SQL an analysis function ran, to show under its figure."""

    def __init__(self, store: Store):
        self._store = store
        self.queries: list[str] = []

    def sql(self, query: str, params: list | None = None):
        frame, text = run(self._store, query, params)
        self.queries.append(text)
        return frame

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def recipes(store: Store, zoo: str) -> list[dict]:
    """The recipes' figures the zoo has data for (`dlstore plot double-descent` ...): what each
    recipe's table holds (means over seeds, dlstore.analysis.phenomena), and its SQL."""
    out = []
    for name, (table, x, ys, colour, scale) in RECIPES.items():
        try:
            phenomena.check_recipe(store, zoo, name)
            recording = _Recording(store)
            frame = table(recording, zoo)
        except NotFoundError:
            continue
        if not frame.height:
            continue
        out.append({"recipe": name, "x": x, "y": list(ys), "colour": colour, "x_scale": scale,
                    "sql": recording.queries[-1],
                    "note": f"dlstore.analysis.phenomena.{table.__name__}: means over seeds "
                            "(errors are 1 - accuracy); the same table as "
                            f"`dlstore plot {name}`", **columns(frame)})
    return out
