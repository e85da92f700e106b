"""The `dlstore` command line: build zoos, ask SQL questions, inspect runs.

Errors a user can cause print as one line on stderr with exit status 1, never a traceback.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path

import polars as pl
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dlstore.errors import BuildInterrupted, DlstoreError, NotFoundError, StoreError, UsageError
from dlstore.interrupts import exit_code, sigterm_as_interrupt

DEFAULT_STORE = "dlstore-store"

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="dlstore: build populations of neural networks and query them with SQL.",
)
out = Console()
err = Console(stderr=True)

StoreOption = typer.Option(DEFAULT_STORE, "--store", "-s", envvar="DLSTORE_STORE",
                           help="Store directory or object-store URI, e.g. s3://bucket/prefix "
                                "(env DLSTORE_STORE).")
StorageOptions = typer.Option(
    None, "--storage-option", "-o", metavar="KEY=VALUE",
    help="Object-store setting (deltalake's names, e.g. AWS_ENDPOINT_URL=http://host:9000, "
         "AWS_REGION=eu-west-1); repeatable; adds to the usual AWS_* environment variables.")


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Backend(str, enum.Enum):
    local = "local"
    ray = "ray"


class Format(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"


# More new runs than this from an interactive terminal are confirmed before a build starts: a
# typo in a grid (a seed count, one more axis) should not start a day of training unasked.
CONFIRM_RUNS = 10_000


@app.command("build-zoo")
def build_zoo_command(
    spec: Path = typer.Argument(..., help="Zoo spec (TOML), e.g. zoo/quickstart.toml."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    device: Device = typer.Option(Device.auto, help="Where to train: auto picks cuda if present."),
    backend: Backend = typer.Option(Backend.local, help="local: cohorts one after another here; "
                                    "ray: each cohort a Ray task (pip install 'dlstore[ray]')."),
    address: str = typer.Option(None, help="Ray cluster to use with --backend ray (default: a "
                                           "running one, else a local instance)."),
    shard: str = typer.Option(None, metavar="I/N", help="Build only the I-th of N contiguous "
                              "blocks of the spec's runs (0 <= I < N), e.g. one per Slurm array "
                              "task: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT."),
    grow: bool = typer.Option(False, "--grow", help="Add this spec's runs to a zoo of the same "
                              "name built from another spec (refused otherwise)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (runs, cohorts, "
                                 "estimated time and disk); create and change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help=f"Build more than {CONFIRM_RUNS:,} new "
                             "runs without asking (only an interactive terminal asks)."),
) -> None:
    """Train every run of SPEC that STORE does not hold yet (resumable, idempotent).

    Ctrl-C or SIGTERM keeps every finished cohort (exit status 130 / 143); rerunning resumes."""
    from dlstore.zoo.spec import ZooSpec

    zoo = ZooSpec.from_toml(spec)
    part = _parse_shard(shard) if shard is not None else None
    if address is not None and backend is not Backend.ray:
        raise UsageError("--address names a Ray cluster: give it with --backend ray")
    with sigterm_as_interrupt():
        try:
            _build_zoo(zoo, store, storage_option, device, backend, address, part, grow,
                       dry_run, yes)
        except KeyboardInterrupt as stop:  # before training started, or a second Ctrl-C
            raise BuildInterrupted("interrupted; what was committed is kept; rerun the same "
                                   "command to resume", exit_code(stop)) from None


def _build_zoo(zoo, store: str, storage_option: list[str] | None, device: Device,
               backend: Backend, address: str | None, part: tuple[int, int] | None,
               grow: bool, dry_run: bool, yes: bool) -> None:
    from dlstore.zoo.builder import build_zoo, check_same_zoo, plan_build

    try:
        target = _open(store, storage_option)
    except StoreError:
        target = None  # created below, once every check of the spec has passed
    done = frozenset(target.run_ids()) if target is not None else frozenset()
    if target is not None and not grow:
        check_same_zoo(zoo, target)  # build_zoo checks it again, for callers of the library
    plan = plan_build(zoo, device.value, backend.value, part, done)
    if dry_run:
        _print_plan(zoo.name, plan, store if target is not None else None)
        return
    if (plan.n_new > CONFIRM_RUNS and not yes and _interactive()
            and not typer.confirm(f"build {plan.n_new:,} runs?", default=False)):
        raise BuildInterrupted("nothing built", exit_code=1)
    if target is None:
        target = _open(store, storage_option, create=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(f"{zoo.name}: training", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=max(total, 1))

        report = build_zoo(zoo, target, device=device.value, progress=advance,
                           backend=backend.value, address=address, shard=part, grow=grow,
                           plan=plan)
    out.print(
        f"zoo [bold]{report.zoo}[/]: {report.runs_built} runs built "
        f"({report.runs_diverged} diverged), {report.runs_skipped} already in the store, "
        f"{report.cohorts} cohorts, {report.checkpoints} cohort checkpoints, "
        f"{report.seconds:.1f} s ({report.train_seconds:.1f} s in training steps)"
        + (f", group metrics of {report.group_steps} groups x steps" if report.group_steps
           else "") + f" -> {store}" + (f" (shard {part[0]}/{part[1]})" if part else "")
    )


def _interactive() -> bool:
    """A person at a terminal, who can answer a question (never a script or a batch job)."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def _print_plan(zoo: str, plan, store: str | None) -> None:
    from dlstore.zoo.limits import human_bytes

    estimate = plan.estimate()
    held = f"{plan.n_runs - plan.n_new:,} already in the store" if store is not None else (
        "no store yet")
    out.print(f"zoo [bold]{zoo}[/]: {plan.n_runs:,} runs ({held}), {plan.n_new:,} to build in "
              f"{plan.n_cohorts:,} cohorts, {plan.total_steps:,} cohort steps, "
              f"{estimate.checkpoints:,} checkpoints", highlight=False)
    out.print(f"estimated (rough): {_duration(estimate.seconds)} of training on {plan.device}, "
              f"{human_bytes(estimate.bytes)} of weights and metrics", highlight=False)
    out.print("dry run: nothing was created or changed", highlight=False)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@app.command()
def sql(
    query: str = typer.Argument(..., help="SQL over the views runs, checkpoints, metrics, "
                                          "final, curves, metrics_wide, group_metrics, zoos, "
                                          "fits."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    format: Format = typer.Option(Format.table, "--format", "-f"),
) -> None:
    """Answer a SQL query over the store."""
    _print_frame(_open(store, storage_option).sql(query), format)


@app.command()
def runs(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = typer.Option(None, help="Only runs of this zoo."),
    format: Format = typer.Option(Format.table, "--format", "-f"),
) -> None:
    """List the runs in the store."""
    frame = _open(store, storage_option).runs(zoo).select(
        "run_id", "zoo", "status", "arch", "dataset", "width", "depth", "n_params", "n_train",
        "label_noise", "optimizer", "lr", "weight_decay", "batch_size", "total_steps", "seed")
    _print_frame(frame, format)


@app.command()
def show(run_id: str = typer.Argument(..., help="A run id, as listed by `dlstore runs`."),
         store: str = StoreOption,
         storage_option: list[str] = StorageOptions) -> None:
    """Show one run: its config, its checkpoints and its final metrics."""
    s = _open(store, storage_option)
    run = s.run(run_id)
    table = Table(show_header=False, box=None)
    for key, value in run.items():
        if key == "config":
            value = json.dumps(json.loads(value), indent=1)
        table.add_row(f"[bold]{key}[/]", str(value))
    out.print(table)
    steps = s.sql("SELECT step FROM checkpoints WHERE run_id = ? ORDER BY step", [run_id])
    out.print(f"[bold]checkpoints[/] at steps {steps['step'].to_list()}")
    final = s.sql("SELECT metric, tensor, value FROM final WHERE run_id = ? "
                  "ORDER BY metric, tensor", [run_id])
    out.print(f"[bold]metrics at step {run['final_step']}[/]")
    _print_frame(final, Format.table)


@app.command()
def verify(store: str = StoreOption,
           storage_option: list[str] = StorageOptions) -> None:
    """Check every shard's hash and header, every checkpoint reference, every table."""
    from dlstore.store.maintenance import verify as verify_store
    report = verify_store(_open(store, storage_option))
    for problem in report.problems:
        out.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    for note in report.notes:
        out.print(f"note: {note}", highlight=False)
    rows = ", ".join(f"{name} {n}" for name, n in report.table_rows.items())
    verdict = "[green]ok[/]" if report.ok else f"[red]{len(report.problems)} problems[/]"
    out.print(f"{verdict}: {report.shards} shards, {report.checkpoints} checkpoints; rows: {rows}")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def compact(store: str = StoreOption,
            storage_option: list[str] = StorageOptions) -> None:
    """Merge the tables' small files (safe while a build runs)."""
    from dlstore.store.maintenance import compact as compact_store
    removed = compact_store(_open(store, storage_option))
    out.print("compacted: " + ", ".join(f"{name} {n} files merged" for name, n in removed.items()))


@app.command()
def gc(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go; remove nothing."),
    older_than: float = typer.Option(24.0, min=0, help="Only remove what is older (hours)."),
) -> None:
    """Remove shards no row refers to, leftover temporary files, and old table files."""
    from dlstore.store.maintenance import gc as gc_store
    report = gc_store(_open(store, storage_option), older_than_hours=older_than, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    out.print(f"{verb} {len(report.shards)} unreferenced shards "
              f"({report.shard_bytes / 2**20:.1f} MiB), {report.temporary} temporary files, "
              f"{report.table_files} old table files"
              + (f"; kept the uncommitted shards of {report.live_builds} builds in progress"
                 if report.live_builds else ""))


fit_app = typer.Typer(no_args_is_help=True, help="Fit analyses to runs selected with SQL.")
app.add_typer(fit_app, name="fit")


@fit_app.command("scaling")
def fit_scaling(
    query: str = typer.Option(..., "--query", "-q",
                              help="SQL returning columns N, D, loss (two-variable law) or the "
                                   "columns named by --x and --y (one variable)."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    x: str = typer.Option(None, "--x", help="Column of the query for L(x) = E + A x^-alpha."),
    y: str = typer.Option(None, "--y", help="Loss column for the one-variable law."),
    plot: Path = typer.Option(Path("scaling.png"), help="Where to write the figure (PNG)."),
    bootstrap: int = typer.Option(200, min=0, help="Bootstrap resamples for the intervals."),
    level: float = typer.Option(0.95, min=0.5, max=0.999, help="Confidence level."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
) -> None:
    """Fit a scaling law to the runs a query selects; save it in the fits table; plot it."""
    import numpy as np

    from dlstore.analysis.scaling import fit_chinchilla, fit_power_law
    from dlstore.errors import QueryError
    from dlstore.plots import scaling_figure
    s = _open(store, storage_option)
    frame = s.sql(query)
    if (x is None) != (y is None):
        raise QueryError("give both --x and --y for a one-variable fit, or neither")
    wanted = [x, y] if x is not None else ["N", "D", "loss"]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise QueryError(f"the query returned columns {frame.columns}; missing {missing}")
    cols = [frame[c].cast(float).to_numpy() for c in wanted]
    options = {"ci_level": level, "n_bootstrap": bootstrap, "seed": seed}
    if x is not None:
        result = fit_power_law(*cols, **options)
        figure = scaling_figure(result, cols[0], cols[1], x_label=x)
    else:
        result = fit_chinchilla(*cols, **options)
        figure = scaling_figure(result, cols[0], cols[2], d=cols[1])
    info = result.to_dict()
    fit_id = s.record_fit({
        "kind": result.kind, "query": query, "params": json.dumps(info["params"]),
        "ci": json.dumps(info["ci"]), "ci_level": level, "objective": result.objective,
        "n": result.n, "dlstore_version": _version()})
    table = Table("parameter", "estimate", f"{level:.0%} interval", header_style="bold")
    for name, value in result.params.items():
        low, high = result.ci.get(name, (np.nan, np.nan))
        table.add_row(name, f"{value:.6g}", f"[{low:.4g}, {high:.4g}]")
    out.print(table)
    out.print(f"{result.kind} fit of {result.n} points, objective {result.objective:.4g}; "
              f"saved as fit {fit_id} (SELECT * FROM fits)")
    if result.kind == "chinchilla":
        a, b = result.compute_optimal_exponents
        out.print(f"compute-optimal: N_opt ~ C^{a:.3f}, D_opt ~ C^{b:.3f}")
    _save(figure, plot, 120)
    out.print(f"figure -> {plot}")


wsl_app = typer.Typer(no_args_is_help=True,
                      help="Weight-space learning: checkpoints' weights as data.")
app.add_typer(wsl_app, name="wsl")


def _choices(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    """A str enum typer shows as a choice (the library's own names, spelled once there and
    checked equal by tests; the analysis modules are not imported here so that the CLI starts
    without torch)."""
    return enum.Enum(name, {v: v for v in values}, type=str)


WslFeatures = _choices("WslFeatures", ("flat", "stats", "canonical"))
WslModel = _choices("WslModel", ("linear", "gbm", "mlp"))
WslTask = _choices("WslTask", ("auto", "regression", "classification"))
WslFormat = _choices("WslFormat", ("unterthiner", "nfn", "dwsnets"))


WslQuery = typer.Option(..., "--query", "-q",
                        help="SQL returning run_id and step columns: the checkpoints to use.")
WslSplit = typer.Option("0.7,0.1,0.2", "--split",
                        help="Fractions of runs for train,val,test (split by run).")
WslSeed = typer.Option(0, help="Seed of the split by run and of the predictor.")


@wsl_app.command("fit")
def wsl_fit(
    query: str = WslQuery,
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    target: str = typer.Option("test_acc", help="A column of the query, a runs column, a "
                                                "metric, or generalization_gap."),
    features: WslFeatures = typer.Option(WslFeatures.stats),
    model: WslModel = typer.Option(WslModel.linear),
    task: WslTask = typer.Option(WslTask.auto, help="auto: text targets are classes."),
    split: str = WslSplit,
    seed: int = WslSeed,
    pad: bool = typer.Option(False, help="Zero-pad runs of several widths into one layout "
                                         "(flat and canonical features)."),
    plot: Path = typer.Option(Path("wsl.png"), help="Where to write predicted vs true (PNG)."),
) -> None:
    """Predict a target from checkpoints' weights; score it on held-out runs; save the fit."""
    from dlstore.analysis.wsl import WeightDataset, WeightSpaceError, fit_predictor
    from dlstore.layout import Layout
    from dlstore.plots import wsl_figure

    if not plot.parent.is_dir():
        raise WeightSpaceError(f"--plot {plot}: directory {plot.parent} does not exist")
    s = _open(store, storage_option)
    layout = Layout.union(s.weight_layouts(query)[0]) if pad and features.value != "stats" else None
    dataset = WeightDataset(s, query, target=target, features=features.value, task=task.value,
                            splits=_split_fractions(split), seed=seed, layout=layout)
    result = fit_predictor(dataset, model=model.value, seed=seed)
    info = result.to_dict()
    fit_id = s.record_fit({"kind": "wsl", "query": query, "params": json.dumps(info),
                           "n": len(dataset), "dlstore_version": _version()})
    if result.task == "regression":
        out.print(f"Kendall tau {result.kendall_tau:.4f}, R^2 {result.r2:.4f}", highlight=False)
    else:
        out.print(f"accuracy {result.accuracy:.4f} over {len(result.classes)} classes",
                  highlight=False)
    out.print(f"{result.model} on {result.features} features predicting {result.target}: "
              f"fitted on {result.n_train} checkpoints of {result.n_train_runs} runs, scored on "
              f"{result.n_test} checkpoints of {result.n_test_runs} held-out runs; saved as fit "
              f"{fit_id} (SELECT * FROM fits)", highlight=False, soft_wrap=True)
    _save(wsl_figure(result), plot, 120)
    out.print(f"figure -> {plot}")


@wsl_app.command("export")
def wsl_export(
    query: str = WslQuery,
    out_dir: Path = typer.Option(..., "--out", help="New or empty directory to write."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    format: WslFormat = typer.Option(WslFormat.unterthiner, "--format", "-f"),
    canonical: bool = typer.Option(False, help="Write permutation-canonical weights."),
    pad: bool = typer.Option(False, help="Zero-pad runs of several widths into one layout."),
    split: str = WslSplit,
    seed: int = WslSeed,
) -> None:
    """Write checkpoints' weights, metrics, layout and split files for weight-space models."""
    from dlstore.analysis.wsl_export import export

    report = export(_open(store, storage_option), query, format.value, out_dir, seed=seed,
                    splits=_split_fractions(split), canonical=canonical, pad=pad)
    sizes = ", ".join(f"{name} {n}" for name, n in report.split_sizes.items())
    out.print(f"{report.rows} checkpoints of {report.runs} runs ({report.layout.size} weights "
              f"each) -> {report.out} ({report.format}: {', '.join(report.files)}); "
              f"rows per split: {sizes}", highlight=False, soft_wrap=True)


def _split_fractions(text: str) -> dict[str, float]:
    from dlstore.analysis.wsl import WeightSpaceError

    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3:
        raise WeightSpaceError(f"--split takes three fractions train,val,test such as "
                               f"0.7,0.1,0.2; got {text!r}")
    return dict(zip(("train", "val", "test"), values))


metrics_app = typer.Typer(no_args_is_help=True,
                          help="Compute metrics for runs already in a store.")
app.add_typer(metrics_app, name="metrics")


def _selection(at: str) -> str | list[int]:
    if at in ("last", "all"):
        return at
    try:
        return [int(step) for step in at.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{at!r}: give last, all, or steps such as 0,100,500",
                                 param_hint="--at") from None


@metrics_app.command("compute")
def metrics_compute(
    spec: Path = typer.Argument(..., help="Zoo spec whose [metrics] to compute."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    device: Device = typer.Option(Device.auto, help="Where to compute."),
) -> None:
    """Add the metrics SPEC's [metrics] asks for to its runs already in STORE (a rebuild skips
    complete runs, so metrics added to a spec later are computed here); resumable."""
    from dlstore.zoo.backfill import backfill_checkpoint_metrics
    from dlstore.zoo.groups import compute_group_metrics
    from dlstore.zoo.population import resolve_device
    from dlstore.zoo.spec import ZooSpec

    zoo = ZooSpec.from_toml(spec)
    s = _open(store, storage_option)
    dev = resolve_device(device.value)
    checkpoints = backfill_checkpoint_metrics(zoo, s, device=dev)
    groups = 0
    if zoo.metrics.groups is not None:
        groups = compute_group_metrics(s, zoo.name, zoo.metrics.groups,
                                       {r.run_id for r in zoo.runs}, device=dev)
    out.print(f"zoo [bold]{zoo.name}[/]: metrics added at {checkpoints} checkpoints, group "
              f"metrics of {groups} groups x steps")


@metrics_app.command("groups")
def metrics_groups(
    zoo: str = typer.Option(..., "--zoo", help="Zoo whose groups (seeds of a config) to use."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    at: str = typer.Option("last", help="Steps: last, all, or a comma-separated list."),
    pairs: int = typer.Option(10, min=1, help="Most pairs of seeds compared per group."),
    points: int = typer.Option(11, min=2, help="Points on the line between two networks."),
    subsample: int = typer.Option(4096, min=1, help="Training examples for train barriers."),
    device: Device = typer.Option(Device.auto, help="Where to compute."),
) -> None:
    """Record group metrics (barriers, mode connectivity, CKA, disagreement) of a zoo's groups
    that the store lacks; groups already recorded are skipped."""
    from dlstore.zoo.groups import compute_group_metrics
    from dlstore.zoo.population import resolve_device
    from dlstore.zoo.spec import GroupOptions

    options = GroupOptions(at=_selection(at), pairs=pairs, points=points, subsample=subsample)
    s = _open(store, storage_option)
    if not s.sql("SELECT 1 FROM runs WHERE zoo = ? LIMIT 1", [zoo]).height:
        raise NotFoundError(f"no runs of zoo {zoo!r} in store {store}")
    computed = compute_group_metrics(s, zoo, options, device=resolve_device(device.value))
    out.print(f"zoo [bold]{zoo}[/]: group metrics of {computed} groups x steps computed "
              "(SELECT * FROM group_metrics)")


plot_app = typer.Typer(no_args_is_help=True,
                       help="Figures of a store's runs over two grid axes (PNG).")
app.add_typer(plot_app, name="plot")


@plot_app.command("phases")
def plot_phases(
    x: str = typer.Option(..., "--x", help="Grid axis across, e.g. lr or batch_size."),
    y: str = typer.Option(..., "--y", help="Grid axis up, e.g. width or n_train."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = typer.Option(None, help="Zoo (needed when several have group metrics)."),
    out_path: Path = typer.Option(Path("phases.png"), "--out", help="Where to write the PNG."),
) -> None:
    """Phase diagram after Yang et al. 2021, thresholds from the zoo's [phases] spec table."""
    from dlstore.analysis.phases import phase_counts, phase_table
    from dlstore.plots import phase_figure

    table = phase_table(_open(store, storage_option), x, y, zoo)
    _print_frame(table, Format.table)
    counts = ", ".join(f"{p}: {n}" for p, n in phase_counts(table).items())
    _save(phase_figure(table, x, y), out_path, 120)
    out.print(f"phases ({counts}) -> {out_path}")


@plot_app.command("metric")
def plot_metric(
    metric: str = typer.Option(..., "--metric", help="A whole-model, per-tensor (with "
                               "--tensor) or group metric, e.g. test_acc, alpha, cka."),
    x: str = typer.Option(..., "--x", help="Grid axis across."),
    y: str = typer.Option(..., "--y", help="Grid axis up."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = typer.Option(None, help="Only runs of this zoo."),
    tensor: str = typer.Option(None, help="State-dict name, for per-tensor metrics."),
    out_path: Path = typer.Option(None, "--out", help="Where to write the PNG "
                                  "(default METRIC.png)."),
) -> None:
    """Heatmap of a metric's mean at each run's last checkpoint over two grid axes."""
    from dlstore.analysis.phases import metric_table
    from dlstore.plots import metric_figure

    table = metric_table(_open(store, storage_option), metric, x, y, zoo, tensor)
    _print_frame(table, Format.table)
    out_path = out_path or Path(f"{metric}.png")
    _save(metric_figure(table, metric, x, y), out_path, 120)
    out.print(f"figure -> {out_path}")


def _zoo_option(recipe: str):
    return typer.Option(recipe, help=f"The zoo built from zoo/{recipe}.toml.")


def _out_option(recipe: str):
    return typer.Option(Path(f"{recipe}.png"), "--out", help="Where to write the PNG.")


@plot_app.command("double-descent")
def plot_double_descent(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = _zoo_option("double-descent"),
    out_path: Path = _out_option("double-descent"),
) -> None:
    """Test error against width at the last step, and along training for the widest nets."""
    from dlstore.analysis.phenomena import (
        double_descent_signature,
        double_descent_table,
        epochwise_table,
    )
    from dlstore.plots import double_descent_figure

    s = _open(store, storage_option)
    table = double_descent_table(s, zoo)
    _print_frame(table, Format.table)
    _save(double_descent_figure(table, epochwise_table(s, zoo)), out_path, 100)
    _print_signature(double_descent_signature(table), out_path)


@plot_app.command("grokking")
def plot_grokking(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = _zoo_option("grokking"),
    out_path: Path = _out_option("grokking"),
) -> None:
    """Train and test accuracy along training, one curve pair per weight decay."""
    from dlstore.analysis.phenomena import grokking_signature, grokking_table
    from dlstore.plots import grokking_figure

    table = grokking_table(_open(store, storage_option), zoo)
    _print_frame(grokking_signature(table), Format.table)
    _save(grokking_figure(table), out_path, 100)
    out.print(f"figure -> {out_path}")


@plot_app.command("neural-collapse")
def plot_neural_collapse(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = _zoo_option("neural-collapse"),
    out_path: Path = _out_option("neural-collapse"),
) -> None:
    """NC1-NC4 and train/test error along training; the terminal phase shaded."""
    from dlstore.analysis.phenomena import collapse_signature, collapse_table
    from dlstore.plots import collapse_figure

    table = collapse_table(_open(store, storage_option), zoo)
    _print_frame(table, Format.table)
    _save(collapse_figure(table), out_path, 100)
    _print_signature(collapse_signature(table), out_path)


@plot_app.command("simplicity-bias")
def plot_simplicity_bias(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = _zoo_option("simplicity-bias"),
    out_path: Path = _out_option("simplicity-bias"),
) -> None:
    """Accuracy on the test split and on its Gaussian clone along training."""
    from dlstore.analysis.phenomena import simplicity_signature, simplicity_table
    from dlstore.plots import simplicity_figure

    s = _open(store, storage_option)
    table = simplicity_table(s, zoo)
    _print_frame(table, Format.table)
    n_classes = s.sql("SELECT any_value(n_classes) AS c FROM runs WHERE zoo = ?", [zoo])["c"][0]
    _save(simplicity_figure(table), out_path, 100)
    _print_signature(simplicity_signature(table, chance=1 / n_classes), out_path)


def _save(figure, path: Path, dpi: int) -> None:
    """Write a figure where the user asked; an unwritable path is a one-line error."""
    try:
        figure.savefig(path, dpi=dpi)
    except OSError as e:
        raise UsageError(f"cannot write the figure to {path}: {e.strerror or e}") from None


def _print_signature(signature: dict, out_path: Path) -> None:
    for key, value in signature.items():
        out.print(f"{key}: {_cell(value)}")
    out.print(f"figure -> {out_path}")


tickets_app = typer.Typer(no_args_is_help=True, help="Lottery tickets found while building zoos.")
app.add_typer(tickets_app, name="tickets")


@tickets_app.command("report")
def tickets_report(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = typer.Option(None, help="The tickets zoo (needed when the store holds several)."),
    plots: Path = typer.Option(Path("."), help="Directory for tickets_density.png and "
                                               "tickets_transfer.png."),
    max_density: float = typer.Option(0.2, min=0.0, max=1.0,
                                      help="Densities at or below this count as sparse."),
) -> None:
    """Accuracy vs density of tickets, controls and dense runs; instability; transfer matrix."""
    from dlstore.analysis.tickets import (
        accuracy_by_density,
        instability,
        signatures,
        transfer_matrix,
        transfer_table,
    )
    from dlstore.errors import QueryError
    from dlstore.plots import ticket_density_figure, transfer_heatmap

    s = _open(store, storage_option)
    # tables of ten columns: a report written to a file or pipe is not cut at 80 characters
    console = out if out.is_terminal else Console(width=140)
    frame = accuracy_by_density(s, zoo)
    zoos = sorted(set(frame["zoo"]))
    if len(zoos) > 1:
        raise QueryError(f"the store holds tickets of zoos {', '.join(zoos)}; pick one with --zoo")
    zoo = zoos[0]
    try:
        plots.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--plots {plots}: {e.strerror or e}") from None
    console.print(f"[bold]{zoo}: final test accuracy by density[/] (mean over seeds; n seeds)")
    _print_frame(_round(frame.drop("zoo", *(c for c in frame.columns if c.endswith("_std")))),
                 Format.table, console)
    sigs = signatures(s, zoo, max_density)
    if not sigs:
        console.print(f"no level reaches a density <= {max_density:.0%}")
    for sig in sigs:
        beats = ("" if sig.ticket_beats_reinit is None else
                 f"; the ticket beats its reinit control in {sig.ticket_beats_reinit:.0%} of "
                 "(seed, level) pairs")
        console.print(f"{sig.condition}, rewind {sig.rewind_step}, densities <= {max_density:.0%} "
                  f"(levels {sig.levels}): ticket {sig.ticket:.3f}, dense {sig.dense:.3f}, "
                  f"reinit {_rounded(sig.reinit)}, random mask {_rounded(sig.random_mask)}{beats}",
                  highlight=False, soft_wrap=True)
    barriers = instability(s, zoo)
    if barriers.height:
        console.print("[bold]instability[/]: error barrier between copies trained from the same "
                  "weights with another data order")
        _print_frame(_round(barriers.drop("zoo")), Format.table, console)
    _save(ticket_density_figure(frame), plots / "tickets_density.png", 120)
    written = [plots / "tickets_density.png"]
    transfer = transfer_table(s, zoo)
    if transfer.height:
        console.print("[bold]transfer[/]: mean test accuracy of tickets trained under another "
                  "condition, their controls there, and the tickets found there")
        short = transfer.select(
            pl.col("source_condition").alias("source"), pl.col("target_condition").alias("target"),
            "level", "rewind_step", "density", pl.col("transferred").alias("ticket"),
            pl.col("transferred_reinit").alias("reinit"),
            pl.col("transferred_random_mask").alias("random"),
            pl.col("target_ticket").alias("found_there"), pl.col("target_dense").alias("dense"))
        _print_frame(_round(short), Format.table, console)
        matrices = []
        for level in sorted(set(transfer["level"])):
            sources, targets, values = transfer_matrix(transfer, frame, level)
            density = transfer.filter(transfer["level"] == level)["density"].mean()
            matrices.append((f"level {level} ({density:.0%} of weights)", sources, targets,
                             values))
            table = Table("source \\ target", *targets, header_style="bold",
                          title=f"level {level}, density {density:.1%} (diagonal: found there)")
            for source, row in zip(sources, values):
                table.add_row(source, *(_rounded(v) for v in row))
            console.print(table)
        _save(transfer_heatmap(matrices), plots / "tickets_transfer.png", 120)
        written.append(plots / "tickets_transfer.png")
    console.print("figures -> " + ", ".join(map(str, written)))


def _round(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col(pl.Float64).round(3))


def _rounded(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _open(store: str, options: list[str] | None, create: bool = False):
    from dlstore.store.store import Store

    pairs = {}
    for option in options or []:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--storage-option {option!r}: give KEY=VALUE")
        pairs[key.strip()] = value
    return Store(store, create=create, storage_options=pairs)


def _parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        part = int(index), int(count)
    except ValueError:
        part = None
    if not sep or part is None or not 0 <= part[0] < part[1]:
        raise UsageError(f"--shard {text!r}: give I/N with 0 <= I < N, e.g. 0/4")
    return part


def _version() -> str:
    from dlstore import __version__

    return __version__


def _print_frame(frame: pl.DataFrame, format: Format, console: Console = out) -> None:
    if format is Format.csv:
        sys.stdout.write(frame.write_csv())
    elif format is Format.json:
        sys.stdout.write(json.dumps(frame.to_dicts(), default=str) + "\n")
    else:
        table = Table(*frame.columns, header_style="bold")
        for row in frame.iter_rows():
            table.add_row(*(_cell(v) for v in row))
        console.print(table)
        console.print(f"[dim]{frame.height} rows[/]")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def main() -> None:
    try:
        app()
    except BuildInterrupted as e:  # no error: what was kept, and how to go on
        err.print(escape(str(e)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except DlstoreError as e:
        # escaped: messages carry user text and install hints like 'dlstore[ray]'
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
