"""The recipes' phenomena, read from a built zoo through the query layer: double descent
(Nakkiran et al. 2019), grokking (Power et al. 2022), neural collapse (Papyan, Han & Donoho
2020) and distributional simplicity bias (Refinetti et al. 2023).

Each phenomenon has a table (means over seeds, what its figure draws) and a signature (the few
numbers that say whether the phenomenon is there), computed from the table alone so that the
signature can be checked on rows whose truth is known.
"""

from __future__ import annotations

import polars as pl

from dlstore.errors import NotFoundError
from dlstore.store.store import Store

# a network "fits" its training set, and a run has "generalised", from these accuracies
FIT = 0.99
GENERALISED = 0.9


def _curves(store: Store, zoo: str, metrics: tuple[str, ...], by: tuple[str, ...] = (),
            last_only: bool = False) -> pl.DataFrame:
    """Per (`by`..., step): the mean over runs (seeds) of each whole-model metric in `metrics`
    (a column each) and the number of runs. `last_only`: each run's final checkpoint only."""
    # the mean over runs (seeds) and its spread (sample standard deviation; null for one run)
    columns = ", ".join(f"avg(value) FILTER (WHERE metric = '{m}') AS {m}, "
                        f"stddev_samp(value) FILTER (WHERE metric = '{m}') AS {m}_std"
                        for m in metrics)
    keys = ", ".join((*by, "step"))
    view = "final" if last_only else "curves"
    tensor = " AND tensor IS NULL" if last_only else ""
    frame = store.sql(f"""
        SELECT {keys}, {columns}, count(DISTINCT run_id) AS runs FROM {view}
        WHERE zoo = ? AND list_contains(?, metric){tensor}
        GROUP BY ALL ORDER BY {keys}""", [zoo, list(metrics)])
    if frame.height == 0:
        zoos = store.sql("SELECT DISTINCT zoo FROM runs ORDER BY 1")["zoo"].to_list()
        raise NotFoundError(f"no {', '.join(metrics)} rows for zoo {zoo!r} (zoos in the store: "
                            f"{zoos}); build its recipe, e.g. dlstore build-zoo zoo/{zoo}.toml")
    missing = [m for m in metrics if frame[m].null_count() == frame.height]
    if missing:
        raise NotFoundError(f"zoo {zoo!r} has no {', '.join(missing)} rows; add them with "
                            f"`dlstore metrics compute zoo/{zoo}.toml` (the recipe asks for them)")
    return frame


def _first_step(steps: list[int], values: list[float | None], threshold: float) -> int | None:
    """The first step whose value reaches `threshold` (None if none does)."""
    return next((s for s, v in zip(steps, values) if v is not None and v >= threshold), None)


# -- double descent -------------------------------------------------------------------------------

def double_descent_table(store: Store, zoo: str = "double-descent") -> pl.DataFrame:
    """Model-wise: per width, the final train and test error (means over seeds) and parameters."""
    frame = _curves(store, zoo, ("train_acc", "test_acc"), ("width", "n_params"), last_only=True)
    return frame.select("width", "n_params", (1 - pl.col("train_acc")).alias("train_error"),
                        (1 - pl.col("test_acc")).alias("test_error"), "runs",
                        pl.col("train_acc_std").alias("train_error_std"),
                        pl.col("test_acc_std").alias("test_error_std")).sort("width")


def epochwise_table(store: Store, zoo: str = "double-descent", widths: int = 2) -> pl.DataFrame:
    """Epoch-wise: test and train error along training (means over seeds) of the `widths`
    widest networks."""
    frame = _curves(store, zoo, ("train_acc", "test_acc"), ("width",))
    widest = sorted(frame["width"].unique().to_list())[-widths:]
    return frame.filter(pl.col("width").is_in(widest)).select(
        "width", "step", (1 - pl.col("train_acc")).alias("train_error"),
        (1 - pl.col("test_acc")).alias("test_error"),
        pl.col("train_acc_std").alias("train_error_std"),
        pl.col("test_acc_std").alias("test_error_std"))


def double_descent_signature(table: pl.DataFrame, fitted: float = 0.01,
                             margin: float = 0.02) -> dict:
    """From a model-wise table: the interpolation threshold (the narrowest width whose train
    error is at most `fitted`), the classical optimum (the lowest test error below the
    threshold), the peak (the highest test error at a wider width) and the widest network's
    error. `descends_twice`: the peak lies within a factor 2 of the threshold's width, more
    than `margin` (seed noise) above the classical optimum, and the widest network is more than
    `margin` below the peak again."""
    widths, test = table["width"].to_list(), table["test_error"].to_list()
    fits = [w for w, e in zip(widths, table["train_error"].to_list()) if e <= fitted]
    threshold = fits[0] if fits else None
    below = [i for i, w in enumerate(widths) if threshold is None or w < threshold] or [0]
    classical = min(below, key=test.__getitem__)
    peak = max(range(classical, len(test)), key=test.__getitem__)
    near = threshold is not None and threshold / 2 <= widths[peak] <= threshold * 2
    return {"threshold_width": threshold, "classical_width": widths[classical],
            "classical_error": test[classical], "peak_width": widths[peak],
            "peak_error": test[peak], "largest_error": test[-1],
            "descends_twice": near and peak < len(test) - 1
            and test[peak] > test[classical] + margin and test[-1] < test[peak] - margin}


# -- grokking -------------------------------------------------------------------------------------

def grokking_table(store: Store, zoo: str = "grokking") -> pl.DataFrame:
    """Per weight decay and step: train and test accuracy (means over seeds)."""
    return _curves(store, zoo, ("train_acc", "test_acc"), ("weight_decay",))


def grokking_signature(table: pl.DataFrame) -> pl.DataFrame:
    """Per weight decay: the first checkpoint step where train accuracy reaches FIT, the first
    where test accuracy reaches GENERALISED (null: never), their ratio (the delay), and the
    final accuracies."""
    rows = []
    for (wd,), part in table.sort("step").group_by(["weight_decay"], maintain_order=True):
        steps = part["step"].to_list()
        fit = _first_step(steps, part["train_acc"].to_list(), FIT)
        general = _first_step(steps, part["test_acc"].to_list(), GENERALISED)
        rows.append({"weight_decay": wd, "fit_step": fit, "generalise_step": general,
                     "delay": general / fit if fit and general else None,
                     "final_train_acc": part["train_acc"][-1],
                     "final_test_acc": part["test_acc"][-1]})
    return pl.DataFrame(rows, schema={"weight_decay": pl.Float64, "fit_step": pl.Int64,
                                      "generalise_step": pl.Int64, "delay": pl.Float64,
                                      "final_train_acc": pl.Float64,
                                      "final_test_acc": pl.Float64}).sort("weight_decay")


# -- neural collapse ------------------------------------------------------------------------------

COLLAPSE_COLUMNS = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4")


def collapse_table(store: Store, zoo: str = "neural-collapse") -> pl.DataFrame:
    """Per step: train accuracy, test accuracy and the neural-collapse metrics (means over
    runs), at the checkpoints where collapse was measured."""
    frame = _curves(store, zoo, ("train_acc", "test_acc", *COLLAPSE_COLUMNS))
    return frame.filter(pl.col("nc1").is_not_null())


def collapse_signature(table: pl.DataFrame) -> dict:
    """The step where training error first reaches zero (mean train accuracy 1 up to FIT), each
    NC metric there and at the last step, and whether NC1 kept falling through the terminal
    phase (`nc1_falls`: every later checkpoint at or below the one before, within 5%)."""
    table = table.sort("step")
    steps = table["step"].to_list()
    zero = _first_step(steps, table["train_acc"].to_list(), FIT)
    out: dict = {"zero_error_step": zero, "last_step": steps[-1]}
    if zero is None:
        return {**out, "nc1_falls": False}
    terminal = table.filter(pl.col("step") >= zero)
    for name in COLLAPSE_COLUMNS:
        out[f"{name}_at_zero_error"] = terminal[name][0]
        out[f"{name}_last"] = terminal[name][-1]
    nc1 = terminal["nc1"].to_list()
    out["nc1_falls"] = len(nc1) > 1 and nc1[-1] < nc1[0] and all(
        b <= a * 1.05 for a, b in zip(nc1, nc1[1:]))
    return out


# -- distributional simplicity bias ---------------------------------------------------------------

def simplicity_table(store: Store, zoo: str = "simplicity-bias") -> pl.DataFrame:
    """Per step: accuracy (and loss) on the real test split and on its Gaussian clone, and the
    gap between the accuracies (means over runs)."""
    frame = _curves(store, zoo, ("test_acc", "clone_acc", "test_loss", "clone_loss"))
    frame = frame.filter(pl.col("clone_acc").is_not_null())
    return frame.with_columns((pl.col("test_acc") - pl.col("clone_acc")).alias("gap"))


def simplicity_signature(table: pl.DataFrame, chance: float, tracking: float = 0.05) -> dict:
    """`tracks_early`: up to the first checkpoint where test accuracy has risen halfway from
    `chance` to its best, the clone's accuracy stays within `tracking` of the real one;
    `separates_late`: the gap at the end exceeds twice `tracking`. Also the gap at those steps
    and the largest."""
    table = table.sort("step")
    steps, test = table["step"].to_list(), table["test_acc"].to_list()
    halfway = _first_step(steps, test, chance + (max(test) - chance) / 2)
    early = table.filter(pl.col("step") <= halfway)
    early_gap = float(early["gap"].abs().max())
    return {"halfway_step": halfway, "early_max_gap": early_gap,
            "final_gap": table["gap"][-1], "largest_gap": table["gap"].max(),
            "final_test_acc": test[-1], "final_clone_acc": table["clone_acc"][-1],
            "tracks_early": early_gap <= tracking,
            "separates_late": table["gap"][-1] > 2 * tracking}


# -- what each recipe needs of a zoo --------------------------------------------------------------

# recipe -> (datasets it is about (None: any), fewest distinct values of a grid axis)
RECIPE_NEEDS = {
    "double-descent": (None, ("width", 3)),
    "grokking": (("modular", "arithmetic"), ("weight_decay", 1)),
    "neural-collapse": (None, None),
    "simplicity-bias": (None, None),
}


def check_recipe(store: Store, zoo: str, recipe: str) -> None:
    """NotFoundError, in one line, when `zoo` lacks what the recipe's figure is about (its
    dataset, enough points on its axis); missing metrics are reported by the tables."""
    datasets, axis = RECIPE_NEEDS[recipe]
    column = axis[0] if axis else "width"
    rows = store.sql(f"SELECT DISTINCT dataset, {column} AS axis FROM runs WHERE zoo = ?", [zoo])
    if rows.height == 0:
        zoos = store.sql("SELECT DISTINCT zoo FROM runs ORDER BY 1")["zoo"].to_list()
        raise NotFoundError(f"no runs of zoo {zoo!r} (zoos in the store: {zoos}); build the "
                            f"recipe, e.g. dlstore build-zoo zoo/{recipe}.toml")
    have = sorted(set(rows["dataset"].drop_nulls()))
    if datasets is not None and not set(have) <= set(datasets):
        raise NotFoundError(f"zoo {zoo!r} trained on {', '.join(have) or 'no dataset'}; the "
                            f"{recipe} figure is about {' or '.join(datasets)} (zoo/{recipe}.toml)")
    if axis is not None and rows["axis"].n_unique() < axis[1]:
        raise NotFoundError(f"zoo {zoo!r} has {rows['axis'].n_unique()} distinct {axis[0]}; the "
                            f"{recipe} figure needs at least {axis[1]} (zoo/{recipe}.toml)")
