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

from dlstore.errors import DlstoreError, UsageError

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
) -> None:
    """Train every run of SPEC that STORE does not hold yet (resumable, idempotent)."""
    from dlstore.zoo.builder import build_zoo
    from dlstore.zoo.spec import ZooSpec

    zoo = ZooSpec.from_toml(spec)
    part = _parse_shard(shard) if shard is not None else None
    if address is not None and backend is not Backend.ray:
        raise UsageError("--address names a Ray cluster: give it with --backend ray")
    target = _open(store, storage_option, create=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(f"{zoo.name}: training", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=max(total, 1))

        report = build_zoo(zoo, target, device=device.value, progress=advance,
                           backend=backend.value, address=address, shard=part)
    out.print(
        f"zoo [bold]{report.zoo}[/]: {report.runs_built} runs built "
        f"({report.runs_diverged} diverged), {report.runs_skipped} already in the store, "
        f"{report.cohorts} cohorts, {report.checkpoints} cohort checkpoints, "
        f"{report.seconds:.1f} s ({report.train_seconds:.1f} s in training steps) -> {store}"
        + (f" (shard {shard})" if shard else "")
    )


@app.command()
def sql(
    query: str = typer.Argument(..., help="SQL over the views runs, checkpoints, metrics, "
                                          "final, curves, metrics_wide, zoos."),
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
              f"{report.table_files} old table files")


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
    figure.savefig(plot, dpi=120)
    out.print(f"figure -> {plot}")


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


def _print_frame(frame: pl.DataFrame, format: Format) -> None:
    if format is Format.csv:
        sys.stdout.write(frame.write_csv())
    elif format is Format.json:
        sys.stdout.write(json.dumps(frame.to_dicts(), default=str) + "\n")
    else:
        table = Table(*frame.columns, header_style="bold")
        for row in frame.iter_rows():
            table.add_row(*(_cell(v) for v in row))
        out.print(table)
        out.print(f"[dim]{frame.height} rows[/]")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def main() -> None:
    try:
        app()
    except DlstoreError as e:
        # escaped: messages carry user text and install hints like 'dlstore[ray]'
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
