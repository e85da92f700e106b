"""Matplotlib figures for the analyses. Functions return a Figure; callers decide where it goes.

Figures are sized for a paper: one column is 3.5 in wide (two panels: the 7.2 in of a full
page width), text 8 pt, lines in the Okabe-Ito palette (distinguishable with colour-blindness),
maps in viridis / cividis with the text on each cell black or white by the cell's luminance.
Wherever runs have seeds, curves are the mean over seeds with a band of one standard deviation.
Write them as .pdf or .svg for vector output.
"""

from __future__ import annotations

import functools

import matplotlib

matplotlib.use("Agg")  # figures are written to files; no display is assumed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

EXTRAPOLATE = 10.0  # draw fitted curves this factor beyond the largest observed value

COLUMN = 3.5  # inches: one column of a two-column paper
PAGE = 7.2    # inches: the full text width
# Okabe & Ito 2008: eight colours told apart with any common colour-vision deficiency
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
             "#000000")
PAPER = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "legend.fontsize": 7, "legend.frameon": False,
    "lines.linewidth": 1.2, "lines.markersize": 3, "axes.linewidth": 0.6,
    "axes.spines.top": False, "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO), "figure.dpi": 150,
    "savefig.dpi": 300, "pdf.fonttype": 42, "svg.fonttype": "none",
}


def _paper(figure_function):
    """Draw the figure under the paper style (the caller's own rcParams are left alone)."""
    @functools.wraps(figure_function)
    def draw(*args, **kwargs):
        with plt.rc_context(PAPER):
            return figure_function(*args, **kwargs)
    return draw


def _colour(k: int) -> str:
    return OKABE_ITO[k % len(OKABE_ITO)]


def _band(ax, x, mean, std, colour, alpha: float = 0.2) -> None:
    """Mean +- one standard deviation over seeds, where there is a spread."""
    if std is None:
        return
    std = np.asarray([np.nan if v is None else v for v in std], dtype=float)
    if np.isnan(std).all():
        return
    mean = np.asarray(mean, dtype=float)
    low = mean - std
    # on a log axis a band reaching zero says nothing: drawn only where its lower end is positive
    where = low > 0 if ax.get_yscale() == "log" else None
    ax.fill_between(np.asarray(x, dtype=float), low, mean + std, where=where, color=colour,
                    alpha=alpha, linewidth=0)


def _text_colour(rgba) -> str:
    """Black on light cells, white on dark ones (relative luminance, sRGB weights)."""
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.18 else "white"


def _annotate(ax, image, grid: np.ndarray, fmt: str, fontsize: float = 7) -> None:
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=fontsize,
                    color=_text_colour(image.cmap(image.norm(value))))


@_paper
def scaling_figure(fit, x: np.ndarray, loss: np.ndarray, d: np.ndarray | None = None,
                   x_label: str = "N (parameters)") -> Figure:
    """Points and fitted curves (dashed beyond the data); for L(N, D) one curve per D plus the
    compute-optimal frontier N_opt(C), D_opt(C) in a second panel."""
    two_variable = d is not None
    fig, axes = plt.subplots(1, 2 if two_variable else 1,
                             figsize=(PAGE, 2.8) if two_variable else (COLUMN, 2.6),
                             squeeze=False)
    ax = axes[0, 0]
    grid_in = np.geomspace(x.min(), x.max(), 100)
    grid_out = np.geomspace(x.max(), x.max() * EXTRAPOLATE, 50)
    if two_variable:
        values = np.unique(d)
        colours = plt.cm.cividis(np.linspace(0, 0.9, len(values)))
        for value, colour in zip(values, colours):
            mask = d == value
            ax.scatter(x[mask], loss[mask], color=colour, s=10, label=f"D = {value:,.0f}")
            ax.plot(grid_in, fit.predict(grid_in, np.full_like(grid_in, value)), color=colour)
            ax.plot(grid_out, fit.predict(grid_out, np.full_like(grid_out, value)), color=colour,
                    linestyle="--")
    else:
        ax.scatter(x, loss, s=10, color="C0", label="runs")
        ax.plot(grid_in, fit.predict(grid_in), color="C0", label="fit")
        ax.plot(grid_out, fit.predict(grid_out), color="C0", linestyle="--",
                label="extrapolation")
    if fit.params["E"] > 0.05 * float(np.min(loss)):  # an E far below the data squashes the axis
        ax.axhline(fit.params["E"], color="grey", linewidth=0.8, linestyle=":", label="E")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss")
    _plain_log_labels(ax.yaxis)
    ax.set_title(_title(fit), fontsize=7)
    ax.legend(fontsize=6, ncols=2 if two_variable else 1)
    if two_variable:
        ax = axes[0, 1]
        compute = 6 * x * d
        c_grid = np.geomspace(compute.min(), compute.max() * EXTRAPOLATE ** 2, 100)
        if fit.params["alpha"] > 0 and fit.params["beta"] > 0:
            n_opt, d_opt = fit.compute_optimal(c_grid)
            a, b = fit.compute_optimal_exponents
            ax.plot(c_grid, n_opt, label=f"N_opt ~ C^{a:.2f}")
            ax.plot(c_grid, d_opt, label=f"D_opt ~ C^{b:.2f}")
        else:  # no frontier: loss does not fall with both resources
            ax.text(0.5, 0.5, "no compute-optimal frontier:\nan exponent is not positive",
                    transform=ax.transAxes, ha="center", va="center")
        ax.scatter(compute, x, s=8, color="C0", alpha=0.4, label="runs (N)")
        ax.scatter(compute, d, s=8, color="C1", alpha=0.4, label="runs (D)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("C = 6 N D")
        ax.set_title("compute-optimal frontier")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def _plain_log_labels(axis) -> None:
    """Log-axis ticks as plain numbers (3.5, not 3.5 x 10^0), minor ones labelled too when the
    axis spans less than a decade."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    low, high = axis.get_view_interval()
    if low > 0 and high / low < 10:
        axis.set_minor_formatter(plain)


def _power(symbol: str, exponent: float) -> str:
    """x^-0.5 written as mathtext, a negative exponent without a double sign."""
    return f"${symbol}^{{{-exponent:.3f}}}$"


def _title(fit) -> str:
    p = fit.params
    if "beta" in p:
        return (f"L = {p['E']:.3g} + {p['A']:.3g} {_power('N', p['alpha'])} "
                f"+ {p['B']:.3g} {_power('D', p['beta'])}")
    return f"L = {p['E']:.3g} + {p['A']:.3g} {_power('x', p['alpha'])}"


@_paper
def wsl_figure(result) -> Figure:
    """Predicted against true target of the held-out runs of a weight-space predictor (a
    scatter with the diagonal for a regression, a confusion matrix for classes)."""
    true, predicted = result.predictions["true"], result.predictions["predicted"]
    fig, ax = plt.subplots(figsize=(COLUMN, COLUMN))
    if result.task == "regression":
        t, p = true.to_numpy(), predicted.to_numpy()
        ax.scatter(t, p, s=6, alpha=0.5)
        low, high = min(t.min(), p.min()), max(t.max(), p.max())
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"true {result.target}")
        ax.set_ylabel(f"predicted {result.target}")
        ax.set_title(f"{result.model} on {result.features} features: Kendall tau "
                     f"{result.kendall_tau:.3f}, R^2 {result.r2:.3f}\n"
                     f"{result.n_test} checkpoints of {result.n_test_runs} held-out runs",
                     fontsize=7)
    else:
        classes = result.classes
        code = {c: i for i, c in enumerate(classes)}
        counts = np.zeros((len(classes), len(classes)), dtype=int)
        for a, b in zip(true.to_list(), predicted.to_list()):
            counts[code[a], code[b]] += 1
        image = ax.imshow(counts, cmap="cividis")
        _annotate(ax, image, counts.astype(float), ".0f")
        ax.set_xticks(range(len(classes)), [str(c) for c in classes], rotation=45, fontsize=7)
        ax.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize=7)
        ax.set_xlabel(f"predicted {result.target}")
        ax.set_ylabel(f"true {result.target}")
        ax.set_title(f"{result.model} on {result.features} features: accuracy "
                     f"{result.accuracy:.3f}\n{result.n_test} checkpoints of "
                     f"{result.n_test_runs} held-out runs", fontsize=7)
    fig.tight_layout()
    return fig


@_paper
def ticket_density_figure(frame) -> Figure:
    """Test accuracy against density (log axis, densest left), one panel per condition: tickets,
    their reinit and random-mask controls per rewind step, the dense runs as a band. `frame` is
    `dlstore.analysis.tickets.accuracy_by_density`: columns condition, rewind_step, density,
    dense(_std), and ticket / reinit / random_mask with their `_std`."""
    conditions = list(dict.fromkeys(frame["condition"].to_list()))
    fig, axes = plt.subplots(1, len(conditions),
                             figsize=(min(PAGE, COLUMN * len(conditions)), 2.6),
                             squeeze=False, sharey=True)
    styles = {"ticket": "-", "reinit": "--", "random_mask": ":"}
    for ax, condition in zip(axes[0], conditions):
        part = frame.filter(frame["condition"] == condition)
        dense, dense_std = part["dense"][0], part["dense_std"][0] or 0.0
        if dense is not None:
            ax.axhspan(dense - dense_std, dense + dense_std, color="grey", alpha=0.2)
            ax.axhline(dense, color="grey", linewidth=1, label="dense")
        for colour, rewind in enumerate(sorted(set(part["rewind_step"].to_list()))):
            rows = part.filter(part["rewind_step"] == rewind).sort("density")
            for kind, style in styles.items():
                values = rows[kind].to_numpy()
                if np.isnan(values.astype(float)).all():
                    continue
                ax.errorbar(rows["density"].to_numpy() * 100, values,
                            yerr=rows[f"{kind}_std"].fill_null(0.0).to_numpy(),
                            color=_colour(colour), linestyle=style, marker="o", markersize=2.5,
                            capsize=1.5, elinewidth=0.6,
                            label=f"{kind.replace('_', ' ')}, rewind {rewind}")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter(""))
        ax.set_xticks([t for t in (100, 50, 20, 10, 5, 2, 1, 0.5)
                       if part["density"].min() * 100 <= t <= 100])
        ax.set_xlabel("weights remaining (%)")
        ax.set_title(condition)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig


# one colour per phase of Yang et al. 2021, from poorly trained (warm) to generalising (green),
# from the Okabe-Ito palette
PHASE_COLOURS = {"I": "#D55E00", "II": "#E69F00", "III": "#CC79A7", "IV-A": "#56B4E9",
                 "IV-B": "#009E73"}


def _grid(table, x: str, y: str, column: str) -> tuple[list, list, np.ndarray]:
    """The cells of `table` as a [len(ys), len(xs)] array (NaN where a cell has no row)."""
    xs = sorted(set(table[x].to_list()))
    ys = sorted(set(table[y].to_list()))
    values = np.full((len(ys), len(xs)), np.nan, dtype=object)
    for row in table.iter_rows(named=True):
        values[ys.index(row[y]), xs.index(row[x])] = row[column]
    return xs, ys, values


def _axes(ax, xs: list, ys: list, x: str, y: str) -> None:
    ax.set_xticks(range(len(xs)), [f"{v:g}" if isinstance(v, float) else str(v) for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" if isinstance(v, float) else str(v) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)


@_paper
def phase_figure(table, x: str, y: str, title: str = "") -> Figure:
    """A phase diagram: one cell per (x, y) grid point, coloured and labelled by its phase
    (`dlstore.analysis.phases.phase_table`); grid points without a group stay blank."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    phases = list(PHASE_COLOURS)
    xs, ys, labels = _grid(table, x, y, "phase")
    codes = np.array([[phases.index(v) if v in phases else np.nan for v in row]
                      for row in labels], dtype=float)
    size = (min(PAGE, max(COLUMN, 1.6 + 0.45 * len(xs))), max(2.2, 0.9 + 0.3 * len(ys)))
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(codes, origin="lower", cmap=ListedColormap(list(PHASE_COLOURS.values())),
                      vmin=-0.5, vmax=len(phases) - 0.5, aspect="auto")
    for (i, j), label in np.ndenumerate(labels):
        if isinstance(label, str):
            ax.text(j, i, label, ha="center", va="center", fontsize=6,
                    color=_text_colour(image.cmap(image.norm(codes[i, j]))))
    _axes(ax, xs, ys, x, y)
    ax.set_title(title or "phases (Yang et al. 2021)")
    ax.legend(handles=[Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()],
              fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


@_paper
def metric_figure(table, metric: str, x: str, y: str, title: str = "") -> Figure:
    """A heatmap of `metric` over two grid axes (`dlstore.analysis.phases.metric_table`), each
    cell annotated with its value."""
    xs, ys, values = _grid(table, x, y, metric)
    grid = values.astype(float)
    size = (min(PAGE, max(COLUMN, 1.4 + 0.45 * len(xs))), max(2.2, 0.9 + 0.3 * len(ys)))
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    _annotate(ax, image, grid, ".3g", fontsize=6)
    _axes(ax, xs, ys, x, y)
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(title or metric)
    fig.tight_layout()
    return fig


def _log_steps(ax, title: str) -> None:
    """Steps on a log axis (step 0 is left out by the callers), accuracy or error up."""
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()


def _column(table, name: str):
    return table[name] if name in table.columns else None


@_paper
def double_descent_figure(modelwise, epochwise) -> Figure:
    """Left: final test and train error against width (`double_descent_table`); right: test
    error along training of the widest networks (`epochwise_table`); bands: +- one standard
    deviation over seeds."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(PAGE, 2.6))
    width = modelwise["width"].to_numpy()
    left.plot(width, modelwise["test_error"], "o-", color=_colour(3), label="test error")
    _band(left, width, modelwise["test_error"], _column(modelwise, "test_error_std"), _colour(3))
    left.plot(width, modelwise["train_error"], "s--", color=_colour(0),
              label="train error (noisy labels)")
    _band(left, width, modelwise["train_error"], _column(modelwise, "train_error_std"),
          _colour(0))
    left.set_xscale("log")
    _plain_log_labels(left.xaxis)
    left.set_xlabel("width (hidden units)")
    left.set_ylabel("error at the last step")
    left.set_title("model-wise double descent")
    left.legend()
    for k, (width, part) in enumerate(epochwise.filter(epochwise["step"] > 0)
                                      .group_by("width", maintain_order=True)):
        right.plot(part["step"], part["test_error"], "o-", color=_colour(k),
                   label=f"test, width {width[0]}")
        _band(right, part["step"], part["test_error"], _column(part, "test_error_std"),
              _colour(k))
        right.plot(part["step"], part["train_error"], "--", color=_colour(k), alpha=0.7,
                   label=f"train, width {width[0]}")
    right.set_ylabel("error")
    _log_steps(right, "epoch-wise: the widest networks along training")
    fig.tight_layout()
    return fig


@_paper
def grokking_figure(table, title: str = "grokking: modular arithmetic") -> Figure:
    """Train (dashed) and test (solid) accuracy along training, one colour per weight decay;
    bands: +- one standard deviation over seeds."""
    fig, ax = plt.subplots(figsize=(COLUMN, 2.6))
    table = table.filter(table["step"] > 0)
    for k, (wd, part) in enumerate(table.group_by("weight_decay", maintain_order=True)):
        ax.plot(part["step"], part["train_acc"], "--", color=_colour(k), alpha=0.8)
        ax.plot(part["step"], part["test_acc"], "-", color=_colour(k), label=f"wd {wd[0]:g}")
        _band(ax, part["step"], part["test_acc"], _column(part, "test_acc_std"), _colour(k))
    ax.set_ylabel("accuracy (dashed: train, solid: test)")
    _log_steps(ax, title)
    fig.tight_layout()
    return fig


@_paper
def collapse_figure(table) -> Figure:
    """NC1-NC4 (log scale) along training, with train error; the terminal phase (train error
    zero) shaded."""
    from dlstore.analysis.phenomena import COLLAPSE_COLUMNS, FIT

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(COLUMN, 4.0), sharex=True)
    table = table.filter(table["step"] > 0)
    steps = table["step"].to_numpy()
    top.set_yscale("log")
    for k, name in enumerate(COLLAPSE_COLUMNS):
        top.plot(steps, table[name], "o-", color=_colour(k), label=name)
        _band(top, steps, table[name], _column(table, f"{name}_std"), _colour(k), alpha=0.15)
    top.set_ylabel("collapse metric")
    for k, (split, marker) in enumerate((("train", "o-"), ("test", "s-"))):
        bottom.plot(steps, 1 - table[f"{split}_acc"], marker, color=_colour(k),
                    label=f"{split} error")
        _band(bottom, steps, 1 - table[f"{split}_acc"], _column(table, f"{split}_acc_std"),
              _colour(k))
    bottom.set_ylabel("error")
    terminal = steps[table["train_acc"].to_numpy() >= FIT]
    for ax in (top, bottom):
        if terminal.size:
            ax.axvspan(terminal[0], steps[-1], color="grey", alpha=0.12)
    top.set_title("neural collapse (shaded: terminal phase, train error 0)")
    top.legend(ncols=2)
    _log_steps(bottom, "")
    fig.tight_layout()
    return fig


@_paper
def simplicity_figure(table) -> Figure:
    """Accuracy on the real test split and on its Gaussian clone along training; bands: +- one
    standard deviation over seeds."""
    fig, ax = plt.subplots(figsize=(COLUMN, 2.6))
    table = table.filter(table["step"] > 0)
    for k, (name, marker, label) in enumerate((
            ("test_acc", "o-", "real test split"),
            ("clone_acc", "s-", "Gaussian clone (class means + covariances)"))):
        ax.plot(table["step"], table[name], marker, color=_colour(k), label=label)
        _band(ax, table["step"], table[name], _column(table, f"{name}_std"), _colour(k))
    ax.set_ylabel("accuracy")
    _log_steps(ax, "distributional simplicity bias")
    fig.tight_layout()
    return fig


@_paper
def transfer_heatmap(matrices: list[tuple[str, list[str], list[str], list[list]]]) -> Figure:
    """One heatmap per (title, sources, targets, values) of
    `dlstore.analysis.tickets.transfer_matrix`: rows the source condition, columns the target;
    the diagonal holds the tickets a condition found itself."""
    width = 1.3 + 0.9 * max(len(m[2]) for m in matrices) * len(matrices)
    fig, axes = plt.subplots(1, len(matrices), figsize=(min(PAGE, max(COLUMN, width)), 2.6),
                             squeeze=False)
    for ax, (title, sources, targets, values) in zip(axes[0], matrices):
        grid = np.array([[np.nan if v is None else v for v in row] for row in values], float)
        image = ax.imshow(grid, cmap="viridis", vmin=np.nanmin(grid), vmax=np.nanmax(grid))
        _annotate(ax, image, grid, ".2f", fontsize=6)
        ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
        ax.set_yticks(range(len(sources)), sources)
        ax.set_xlabel("trained under (target)")
        ax.set_ylabel("ticket found under (source)")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
