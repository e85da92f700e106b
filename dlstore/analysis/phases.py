"""Phases of learning after Yang et al. 2021 ("Taxonomizing local versus global structure in
neural network loss landscapes"), from a store's train losses, Hessians and group metrics.

Each config (a group: the seeds of one grid point) is labelled from the means over its seeds at
its last group-metric step. Mode connectivity is Yang et al.'s signed mc of the train error along
the trained Bezier curve (`curve_mode_connectivity`, `[metrics] curve`) when the zoo has it, as
they measure it, else along the straight line (`mode_connectivity`); a phase table says which
(`mc_metric`):

| phase | train loss | Hessian | mode connectivity | CKA |
|-------|------------|---------|-------------------|-----|
| I     | large      | large   | mc < 0 (barrier)  |     |
| II    | large      | large   | mc >= 0           |     |
| III   | small      | small   | mc < 0 (barrier)  |     |
| IV-A  | small      | small   | mc ~ 0            | small |
| IV-B  | small      | small   | mc ~ 0            | large |

with the thresholds of the spec's `[phases]` table (`PhaseOptions`): a config is poorly trained
when its train loss exceeds `train_loss` (or, if `hessian_top_eig` is given, its top Hessian
eigenvalue exceeds that); mc counts as a barrier below `-mode_connectivity`; a connected,
well-trained config is IV-B from a CKA of `cka`. Yang et al. place the boundaries on their
diagrams rather than at fixed numbers, so the defaults are this project's choices (README).
"""

from __future__ import annotations

import polars as pl

from dlstore.errors import NotFoundError, QueryError
from dlstore.metrics.curves import CURVE_METRICS
from dlstore.metrics.groups import GROUP_METRICS
from dlstore.schemas import HYPERPARAMETER_COLUMNS
from dlstore.spec import PhaseOptions, ZooSpec
from dlstore.store.store import Store

PHASES = ("I", "II", "III", "IV-A", "IV-B")
# grid axes a diagram may use: the typed run columns that describe what was trained
AXES = tuple(c for c in HYPERPARAMETER_COLUMNS if c not in ("run_id", "zoo", "status", "seed"))


def phase_of(train_loss: float, mode_connectivity: float, cka: float,
             hessian_top_eig: float | None = None,
             thresholds: PhaseOptions | None = None) -> str:
    """The phase label of one config from its mean metrics."""
    t = thresholds or PhaseOptions()
    sharp = (t.hessian_top_eig is not None and hessian_top_eig is not None
             and hessian_top_eig > t.hessian_top_eig)
    barrier = mode_connectivity < -t.mode_connectivity
    if train_loss > t.train_loss or sharp:
        return "I" if barrier else "II"
    if barrier:
        return "III"
    return "IV-B" if cka >= t.cka else "IV-A"


def zoo_of(store: Store, zoo: str | None) -> str:
    """`zoo`, or the store's only zoo with group metrics."""
    zoos = store.sql("SELECT DISTINCT zoo FROM group_metrics ORDER BY zoo")["zoo"].to_list()
    if zoo is None:
        if len(zoos) != 1:
            raise NotFoundError("give --zoo: the store holds group metrics of "
                                f"{len(zoos)} zoos {zoos}" if zoos else
                                "the store holds no group metrics; build a spec with "
                                "[metrics] groups = true or run `dlstore metrics groups`")
        return zoos[0]
    if zoo not in zoos:
        raise NotFoundError(f"no group metrics for zoo {zoo!r} (zoos with group metrics: "
                            f"{zoos}); run `dlstore metrics groups --zoo {zoo}`")
    return zoo


def spec_thresholds(store: Store, zoo: str) -> PhaseOptions:
    """The `[phases]` thresholds of the zoo's most recently recorded spec (defaults if none)."""
    specs = store.sql("SELECT spec FROM zoos WHERE zoo = ? ORDER BY created_at DESC LIMIT 1",
                      [zoo])["spec"].to_list()
    return ZooSpec.from_text(specs[0]).phases if specs else PhaseOptions()


def _check_axes(*axes: str) -> None:
    for axis in axes:
        if axis not in AXES:
            raise QueryError(f"{axis!r} is not a grid axis; use one of {', '.join(AXES)}")


MC_METRICS = {"line": "mode_connectivity", "curve": "curve_mode_connectivity"}


def mc_metric(store: Store, zoo: str, mc: str = "auto") -> str:
    """The mode connectivity a phase diagram of `zoo` uses: along the trained curve
    (`curve_mode_connectivity`, as Yang et al. measure it) when the zoo has it and `mc` is
    "auto", else the straight line's (`mode_connectivity`); "line" / "curve" choose."""
    if mc not in ("auto", *MC_METRICS):
        raise QueryError(f"mc must be auto, line or curve, got {mc!r}")
    if mc == "auto":
        has_curve = store.sql("SELECT 1 FROM group_metrics WHERE zoo = ? AND metric = ? LIMIT 1",
                              [zoo, MC_METRICS["curve"]]).height
        return MC_METRICS["curve" if has_curve else "line"]
    return MC_METRICS[mc]


def phase_query(x: str, y: str) -> str:
    """The SQL behind `phase_table`, for checked axes x and y; its parameters are the zoo and
    the mode-connectivity metric twice (`phase_params`). Shown by the report under its phase
    diagram, to copy into `dlstore sql`."""
    _check_axes(x, y)
    return f"""
        WITH both_at AS (SELECT group_id, step FROM group_metrics
                         WHERE zoo = ? AND metric IN (?, 'cka')  -- seed groups only
                         GROUP BY group_id, step HAVING count(DISTINCT metric) = 2),
        last AS (SELECT group_id, max(step) AS step FROM both_at GROUP BY group_id),
        per_group AS (
            SELECT g.group_id, g.step, any_value(g.{x}) AS x, any_value(g.{y}) AS y,
                   any_value(g.run_ids) AS run_ids,
                   avg(g.value) FILTER (WHERE g.metric = ?) AS mc,
                   avg(g.value) FILTER (WHERE g.metric = 'cka') AS cka
            FROM group_metrics g JOIN last USING (group_id, step) GROUP BY ALL),
        members AS (SELECT group_id, step, unnest(run_ids) AS run_id FROM per_group),
        per_run AS (
            SELECT m.group_id,
                   avg(v.value) FILTER (WHERE v.metric = 'train_loss') AS train_loss,
                   avg(v.value) FILTER (WHERE v.metric = 'hessian_top_eig') AS hessian
            FROM members m JOIN metrics v ON v.run_id = m.run_id AND v.step = m.step
            WHERE v.tensor IS NULL GROUP BY m.group_id)
        SELECT x AS "{x}", y AS "{y}", avg(train_loss) AS train_loss,
               avg(hessian) AS hessian_top_eig, avg(mc) AS mode_connectivity,
               avg(cka) AS cka, count(*) AS groups
        FROM per_group JOIN per_run USING (group_id)
        GROUP BY x, y ORDER BY x, y"""


def phase_params(zoo: str, metric: str) -> list:
    return [zoo, metric, metric]


def phase_table(store: Store, x: str, y: str, zoo: str | None = None,
                thresholds: PhaseOptions | None = None, mc: str = "auto") -> pl.DataFrame:
    """One row per (x, y) cell: the means over its groups (and seeds) of train_loss,
    hessian_top_eig (null if not recorded), mode_connectivity and cka at each group's last
    step with both, the number of groups, the phase label, and `mc_metric`: which mode
    connectivity went into `mode_connectivity` (`mc_metric()`: the curve's when the zoo has it)."""
    _check_axes(x, y)
    zoo = zoo_of(store, zoo)
    thresholds = thresholds or spec_thresholds(store, zoo)
    metric = mc_metric(store, zoo, mc)
    frame = store.sql(phase_query(x, y), phase_params(zoo, metric))
    if frame.height == 0:
        raise NotFoundError(f"zoo {zoo!r} has no step with both {metric} and cka recorded "
                            "(the phases need both: [metrics] groups, and curve at the same "
                            "steps)")
    labels = [phase_of(r["train_loss"], r["mode_connectivity"], r["cka"],
                       r["hessian_top_eig"], thresholds) for r in frame.iter_rows(named=True)]
    return frame.with_columns(pl.Series("phase", labels, dtype=pl.String),
                              pl.lit(metric).alias("mc_metric"))


def metric_table(store: Store, metric: str, x: str, y: str, zoo: str | None = None,
                 tensor: str | None = None) -> pl.DataFrame:
    """One row per (x, y) cell: the mean of `metric` over the runs (or, for a group metric, the
    groups) of the cell at their last checkpoint (group metrics: last group-metric step), and
    how many went into it."""
    _check_axes(x, y)
    where, params = "metric = ?", [metric]
    if zoo is not None:
        where += " AND zoo = ?"
        params.append(zoo)
    if metric in GROUP_METRICS or metric in CURVE_METRICS:
        query = f"""
            WITH last AS (SELECT group_id, max(step) AS step FROM group_metrics GROUP BY ALL)
            SELECT {x} AS "{x}", {y} AS "{y}", avg(value) AS _value, count(*) AS n
            FROM group_metrics JOIN last USING (group_id, step) WHERE {where}
            GROUP BY ALL ORDER BY 1, 2"""
    else:
        where += " AND tensor IS NULL" if tensor is None else " AND tensor = ?"
        params += [] if tensor is None else [tensor]
        query = f"""SELECT {x} AS "{x}", {y} AS "{y}", avg(value) AS _value, count(*) AS n
                    FROM final WHERE {where} GROUP BY ALL ORDER BY 1, 2"""
    # the metric name only ever reaches the query as a parameter; the column is named after
    # it here (x and y are checked grid axes)
    frame = store.sql(query, params).rename({"_value": metric})
    if frame.height == 0:
        known = store.sql("SELECT DISTINCT metric FROM final WHERE tensor IS NULL "
                          "ORDER BY 1")["metric"].to_list()
        what = f"{metric!r}" + (f" of tensor {tensor!r}" if tensor else "")
        raise NotFoundError(f"no values of {what}" + (f" in zoo {zoo!r}" if zoo else "")
                            + f"; whole-model metrics: {known}; group metrics: "
                            f"{list(GROUP_METRICS + CURVE_METRICS)}; per-tensor metrics need "
                            "--tensor")
    return frame


def phase_counts(table: pl.DataFrame) -> dict[str, int]:
    """Cells per phase label, in taxonomy order (phases with no cell left out)."""
    counts = table["phase"].value_counts()
    found = dict(zip(counts["phase"].to_list(), counts["count"].to_list()))
    return {p: found[p] for p in PHASES if p in found}
