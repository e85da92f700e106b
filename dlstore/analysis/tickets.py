"""Lottery-ticket analyses over a store: accuracy against density for tickets, their controls and
the dense runs; the signature of winning tickets; instability; the transfer matrix.

Everything reads the `tickets` and `ticket_transfer` views and `group_metrics` through
`Store.sql`; the builder (`dlstore.zoo.tickets`) is what put them there.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from dlstore.errors import NotFoundError
from dlstore.store.store import Store

KINDS = ("ticket", "reinit", "random_mask")


def _zoo_filter(zoo: str | None) -> tuple[str, list]:
    return ("AND zoo = ?", [zoo]) if zoo is not None else ("", [])


def accuracy_by_density(store: Store, zoo: str | None = None) -> pl.DataFrame:
    """One row per (zoo, condition, rewind step, level): mean density, and the mean and standard
    deviation over seeds of the final test accuracy of the tickets found under that condition,
    of their reinit and random-mask controls, and of the condition's dense runs."""
    where, params = _zoo_filter(zoo)
    frame = store.sql(f"""
        WITH dense AS (
            SELECT zoo, condition, avg(test_acc) AS dense, stddev_samp(test_acc) AS dense_std
            FROM tickets WHERE kind = 'dense' {where} GROUP BY ALL)
        SELECT t.zoo, t.condition, t.rewind_step, t.level, avg(t.density) AS density,
               {", ".join(f"avg(t.test_acc) FILTER (WHERE kind = '{k}') AS {k}, "
                          f"stddev_samp(t.test_acc) FILTER (WHERE kind = '{k}') AS {k}_std"
                          for k in KINDS)},
               count(*) FILTER (WHERE kind = 'ticket') AS n,
               any_value(d.dense) AS dense, any_value(d.dense_std) AS dense_std
        FROM tickets t LEFT JOIN dense d ON d.zoo = t.zoo AND d.condition = t.condition
        WHERE t.level > 0 AND t.source_run_id IS NULL {where.replace('zoo', 't.zoo')}
        GROUP BY t.zoo, t.condition, t.rewind_step, t.level
        ORDER BY t.zoo, t.condition = 'base' DESC, t.condition, t.rewind_step, t.level""",
        params * 2)
    if frame.is_empty():
        raise NotFoundError("the store holds no lottery tickets" +
                            (f" for zoo {zoo!r}" if zoo else "") +
                            "; build a spec with a [tickets] section first")
    return frame


@dataclass
class Signature:
    """Winning-ticket signature of one (condition, rewind step) at densities <= `max_density`:
    means over the levels there and their seeds."""

    condition: str
    rewind_step: int
    max_density: float
    levels: list[int]
    dense: float
    ticket: float
    reinit: float | None
    random_mask: float | None
    ticket_beats_reinit: float | None  # share of (seed, level) pairs where the ticket is better


def signatures(store: Store, zoo: str | None = None, max_density: float = 0.2
               ) -> list[Signature]:
    where, params = _zoo_filter(zoo)
    pairs = store.sql(f"""
        SELECT t.condition, t.rewind_step, t.level, t.seed, t.test_acc AS ticket,
               c.test_acc AS reinit
        FROM tickets t LEFT JOIN tickets c
          ON c.parent_run_id = t.parent_run_id AND c.rewind_step = t.rewind_step
         AND c.kind = 'reinit' AND c.source_run_id IS NULL
        WHERE t.kind = 'ticket' AND t.source_run_id IS NULL AND t.density <= ?
              {where.replace('zoo', 't.zoo')}""",
        [max_density, *params])
    table = accuracy_by_density(store, zoo).filter(pl.col("density") <= max_density)
    out = []
    for (condition, rewind_step), group in table.group_by(["condition", "rewind_step"],
                                                          maintain_order=True):
        mine = pairs.filter((pl.col("condition") == condition)
                            & (pl.col("rewind_step") == rewind_step)
                            & pl.col("reinit").is_not_null())
        out.append(Signature(
            condition, rewind_step, max_density, sorted(group["level"].to_list()),
            group["dense"].mean(), group["ticket"].mean(), group["reinit"].mean(),
            group["random_mask"].mean(),
            float((mine["ticket"] > mine["reinit"]).mean()) if mine.height else None))
    return out


def instability(store: Store, zoo: str | None = None) -> pl.DataFrame:
    """Mean error and loss barrier between each ticket (or dense run) and its copy trained from
    the same weights with another data order, by condition, rewind step and level."""
    where, params = _zoo_filter(zoo)
    return store.sql(f"""
        WITH g AS (
            SELECT group_id, metric, any_value(value) AS value, any_value(run_ids) AS run_ids
            FROM group_metrics WHERE group_id LIKE 'stability-%' GROUP BY group_id, metric)
        SELECT r.zoo, coalesce(r.condition, 'base') AS condition, r.rewind_step, r.level,
               avg(r.density) AS density,
               avg(g.value) FILTER (WHERE g.metric = 'test_error_barrier') AS error_barrier,
               avg(g.value) FILTER (WHERE g.metric = 'test_loss_barrier') AS loss_barrier,
               count(*) FILTER (WHERE g.metric = 'test_error_barrier') AS n
        FROM g JOIN runs r ON r.run_id = g.run_ids[2]
        WHERE true {where.replace('zoo', 'r.zoo')}
        GROUP BY ALL ORDER BY ALL""", params)


def transfer_table(store: Store, zoo: str | None = None) -> pl.DataFrame:
    """The `ticket_transfer` view (one row per source x target condition x level)."""
    where, params = _zoo_filter(zoo)
    return store.sql(f"SELECT * FROM ticket_transfer WHERE true {where} "
                     "ORDER BY zoo, level, source_condition, target_condition", params)


def transfer_matrix(transfer: pl.DataFrame, native: pl.DataFrame, level: int,
                    column: str = "transferred") -> tuple[list[str], list[str], list[list]]:
    """(sources, targets, values[source][target]) at one level: the transferred tickets' mean
    accuracy (or another column of `transfer`), with the tickets each condition found itself on
    the diagonal (from `native`, an `accuracy_by_density` frame). Missing cells are None."""
    at = transfer.filter(pl.col("level") == level)
    mine = native.filter(pl.col("level") == level)
    sources = sorted(set(at["source_condition"]), key=_base_first)
    targets = sorted(set(at["target_condition"]) | set(sources), key=_base_first)
    values = []
    for source in sources:
        row = []
        for target in targets:
            if source == target:
                cell = mine.filter((pl.col("condition") == source)
                                   & pl.col("rewind_step").is_in(at["rewind_step"].unique()
                                                                 .to_list()))
                row.append(cell["ticket"].mean() if cell.height else None)
            else:
                cell = at.filter((pl.col("source_condition") == source)
                                 & (pl.col("target_condition") == target))
                row.append(cell[column].mean() if cell.height else None)
        values.append(row)
    return sources, targets, values


def _base_first(name: str) -> tuple[bool, str]:
    return name != "base", name
