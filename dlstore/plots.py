"""Matplotlib figures for the analyses. Functions return a Figure; callers decide where it goes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are written to files; no display is assumed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

EXTRAPOLATE = 10.0  # draw fitted curves this factor beyond the largest observed value


def scaling_figure(fit, x: np.ndarray, loss: np.ndarray, d: np.ndarray | None = None,
                   x_label: str = "N (parameters)") -> Figure:
    """Points and fitted curves (dashed beyond the data); for L(N, D) one curve per D plus the
    compute-optimal frontier N_opt(C), D_opt(C) in a second panel."""
    two_variable = d is not None
    fig, axes = plt.subplots(1, 2 if two_variable else 1, figsize=(11 if two_variable else 6, 4.5),
                             squeeze=False)
    ax = axes[0, 0]
    grid_in = np.geomspace(x.min(), x.max(), 100)
    grid_out = np.geomspace(x.max(), x.max() * EXTRAPOLATE, 50)
    if two_variable:
        values = np.unique(d)
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(values)))
        for value, colour in zip(values, colours):
            mask = d == value
            ax.scatter(x[mask], loss[mask], color=colour, s=18, label=f"D = {value:,.0f}")
            ax.plot(grid_in, fit.predict(grid_in, np.full_like(grid_in, value)), color=colour)
            ax.plot(grid_out, fit.predict(grid_out, np.full_like(grid_out, value)), color=colour,
                    linestyle="--")
    else:
        ax.scatter(x, loss, s=18, color="C0", label="runs")
        ax.plot(grid_in, fit.predict(grid_in), color="C0", label="fit")
        ax.plot(grid_out, fit.predict(grid_out), color="C0", linestyle="--",
                label="extrapolation")
    ax.axhline(fit.params["E"], color="grey", linewidth=0.8, linestyle=":", label="E")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss")
    ax.set_title(_title(fit))
    ax.legend(fontsize=7)
    if two_variable:
        ax = axes[0, 1]
        compute = 6 * x * d
        c_grid = np.geomspace(compute.min(), compute.max() * EXTRAPOLATE ** 2, 100)
        n_opt, d_opt = fit.compute_optimal(c_grid)
        a, b = fit.compute_optimal_exponents
        ax.plot(c_grid, n_opt, label=f"N_opt ~ C^{a:.2f}")
        ax.plot(c_grid, d_opt, label=f"D_opt ~ C^{b:.2f}")
        ax.scatter(compute, x, s=8, color="C0", alpha=0.4, label="runs (N)")
        ax.scatter(compute, d, s=8, color="C1", alpha=0.4, label="runs (D)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("C = 6 N D")
        ax.set_title("compute-optimal frontier")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _title(fit) -> str:
    p = fit.params
    if "beta" in p:
        return (f"L = {p['E']:.3g} + {p['A']:.3g}/N^{p['alpha']:.3f} "
                f"+ {p['B']:.3g}/D^{p['beta']:.3f}")
    return f"L = {p['E']:.3g} + {p['A']:.3g} x^-{p['alpha']:.3f}"


def wsl_figure(result) -> Figure:
    """Predicted against true target of the held-out runs of a weight-space predictor (a
    scatter with the diagonal for a regression, a confusion matrix for classes)."""
    true, predicted = result.predictions["true"], result.predictions["predicted"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if result.task == "regression":
        t, p = true.to_numpy(), predicted.to_numpy()
        ax.scatter(t, p, s=8, alpha=0.5)
        low, high = min(t.min(), p.min()), max(t.max(), p.max())
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"true {result.target}")
        ax.set_ylabel(f"predicted {result.target}")
        ax.set_title(f"{result.model} on {result.features} features: Kendall tau "
                     f"{result.kendall_tau:.3f}, R^2 {result.r2:.3f}\n"
                     f"{result.n_test} checkpoints of {result.n_test_runs} held-out runs",
                     fontsize=9)
    else:
        classes = result.classes
        code = {c: i for i, c in enumerate(classes)}
        counts = np.zeros((len(classes), len(classes)), dtype=int)
        for a, b in zip(true.to_list(), predicted.to_list()):
            counts[code[a], code[b]] += 1
        ax.imshow(counts, cmap="Blues")
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(classes)), [str(c) for c in classes], rotation=45, fontsize=7)
        ax.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize=7)
        ax.set_xlabel(f"predicted {result.target}")
        ax.set_ylabel(f"true {result.target}")
        ax.set_title(f"{result.model} on {result.features} features: accuracy "
                     f"{result.accuracy:.3f}\n{result.n_test} checkpoints of "
                     f"{result.n_test_runs} held-out runs", fontsize=9)
    fig.tight_layout()
    return fig


def ticket_density_figure(frame) -> Figure:
    """Test accuracy against density (log axis, densest left), one panel per condition: tickets,
    their reinit and random-mask controls per rewind step, the dense runs as a band. `frame` is
    `dlstore.analysis.tickets.accuracy_by_density`: columns condition, rewind_step, density,
    dense(_std), and ticket / reinit / random_mask with their `_std`."""
    conditions = list(dict.fromkeys(frame["condition"].to_list()))
    fig, axes = plt.subplots(1, len(conditions), figsize=(4.5 * len(conditions), 4),
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
                            color=f"C{colour}", linestyle=style, marker="o", markersize=3,
                            capsize=2, label=f"{kind.replace('_', ' ')}, rewind {rewind}")
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
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# one colour per phase of Yang et al. 2021, from poorly trained (warm) to generalising (green)
PHASE_COLOURS = {"I": "#d7301f", "II": "#fc8d59", "III": "#9e9ac8", "IV-A": "#6baed6",
                 "IV-B": "#31a354"}


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


def phase_figure(table, x: str, y: str, title: str = "") -> Figure:
    """A phase diagram: one cell per (x, y) grid point, coloured and labelled by its phase
    (`dlstore.analysis.phases.phase_table`); grid points without a group stay blank."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    phases = list(PHASE_COLOURS)
    xs, ys, labels = _grid(table, x, y, "phase")
    codes = np.array([[phases.index(v) if v in phases else np.nan for v in row]
                      for row in labels], dtype=float)
    size = (max(5.0, 2.0 + 0.9 * len(xs)), max(3.0, 1.2 + 0.6 * len(ys)))
    fig, ax = plt.subplots(figsize=size)
    ax.imshow(codes, origin="lower", cmap=ListedColormap(list(PHASE_COLOURS.values())),
              vmin=-0.5, vmax=len(phases) - 0.5, aspect="auto")
    for (i, j), label in np.ndenumerate(labels):
        if isinstance(label, str):
            ax.text(j, i, label, ha="center", va="center", fontsize=8)
    _axes(ax, xs, ys, x, y)
    ax.set_title(title or "phases (Yang et al. 2021)")
    ax.legend(handles=[Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def metric_figure(table, metric: str, x: str, y: str, title: str = "") -> Figure:
    """A heatmap of `metric` over two grid axes (`dlstore.analysis.phases.metric_table`), each
    cell annotated with its value."""
    xs, ys, values = _grid(table, x, y, metric)
    grid = values.astype(float)
    size = (max(4.0, 1.6 + 0.9 * len(xs)), max(3.0, 1.2 + 0.6 * len(ys)))
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7, color="white")
    _axes(ax, xs, ys, x, y)
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(title or metric)
    fig.tight_layout()
    return fig


def _log_steps(ax, title: str) -> None:
    """Steps on a log axis (step 0 is left out by the callers), accuracy or error up."""
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def double_descent_figure(modelwise, epochwise) -> Figure:
    """Left: final test and train error against width (`double_descent_table`); right: test
    error along training of the widest networks (`epochwise_table`)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(modelwise["width"], modelwise["test_error"], "o-", color="C3", label="test error")
    left.plot(modelwise["width"], modelwise["train_error"], "s--", color="C0",
              label="train error (noisy labels)")
    left.set_xscale("log")
    left.set_xlabel("width (hidden units)")
    left.set_ylabel("error at the last step")
    left.set_title("model-wise double descent", fontsize=9)
    left.legend(fontsize=7)
    for k, (width, part) in enumerate(epochwise.filter(epochwise["step"] > 0)
                                      .group_by("width", maintain_order=True)):
        right.plot(part["step"], part["test_error"], "o-", color=f"C{k}", markersize=3,
                   label=f"test, width {width[0]}")
        right.plot(part["step"], part["train_error"], "--", color=f"C{k}", alpha=0.6,
                   label=f"train, width {width[0]}")
    right.set_ylabel("error")
    _log_steps(right, "epoch-wise: the widest networks along training")
    fig.tight_layout()
    return fig


def grokking_figure(table) -> Figure:
    """Train (dashed) and test (solid) accuracy along training, one colour per weight decay."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    table = table.filter(table["step"] > 0)
    for k, (wd, part) in enumerate(table.group_by("weight_decay", maintain_order=True)):
        ax.plot(part["step"], part["train_acc"], "--", color=f"C{k}", alpha=0.7)
        ax.plot(part["step"], part["test_acc"], "-", color=f"C{k}", label=f"wd {wd[0]:g}")
    ax.set_ylabel("accuracy (dashed: train, solid: test)")
    _log_steps(ax, "grokking: modular addition")
    fig.tight_layout()
    return fig


def collapse_figure(table) -> Figure:
    """NC1-NC4 (log scale) along training, with train error; the terminal phase (train error
    zero) shaded."""
    from dlstore.analysis.phenomena import COLLAPSE_COLUMNS, FIT

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    table = table.filter(table["step"] > 0)
    steps = table["step"].to_numpy()
    for k, name in enumerate(COLLAPSE_COLUMNS):
        top.plot(steps, table[name], "o-", markersize=3, color=f"C{k}", label=name)
    top.set_yscale("log")
    top.set_ylabel("collapse metric")
    bottom.plot(steps, 1 - table["train_acc"], "o-", markersize=3, label="train error")
    bottom.plot(steps, 1 - table["test_acc"], "s-", markersize=3, label="test error")
    bottom.set_ylabel("error")
    terminal = steps[table["train_acc"].to_numpy() >= FIT]
    for ax in (top, bottom):
        if terminal.size:
            ax.axvspan(terminal[0], steps[-1], color="grey", alpha=0.12)
    top.set_title("neural collapse (shaded: terminal phase, train error 0)", fontsize=9)
    top.legend(fontsize=7)
    _log_steps(bottom, "")
    fig.tight_layout()
    return fig


def simplicity_figure(table) -> Figure:
    """Accuracy on the real test split and on its Gaussian clone along training."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    table = table.filter(table["step"] > 0)
    ax.plot(table["step"], table["test_acc"], "o-", markersize=3, label="real test split")
    ax.plot(table["step"], table["clone_acc"], "s-", markersize=3,
            label="Gaussian clone (class means + covariances)")
    ax.set_ylabel("accuracy")
    _log_steps(ax, "distributional simplicity bias")
    fig.tight_layout()
    return fig


def transfer_heatmap(matrices: list[tuple[str, list[str], list[str], list[list]]]) -> Figure:
    """One heatmap per (title, sources, targets, values) of
    `dlstore.analysis.tickets.transfer_matrix`: rows the source condition, columns the target;
    the diagonal holds the tickets a condition found itself."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(1.3 + 1.2 * max(len(m[2]) for m in
                                                                        matrices)
                                                        * len(matrices), 3.2), squeeze=False)
    for ax, (title, sources, targets, values) in zip(axes[0], matrices):
        grid = np.array([[np.nan if v is None else v for v in row] for row in values], float)
        image = ax.imshow(grid, cmap="viridis", vmin=np.nanmin(grid), vmax=np.nanmax(grid))
        for i in range(len(sources)):
            for j in range(len(targets)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if grid[i, j] < np.nanmean(grid) else "black")
        ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
        ax.set_yticks(range(len(sources)), sources)
        ax.set_xlabel("trained under (target)")
        ax.set_ylabel("ticket found under (source)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
