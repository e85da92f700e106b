"""The `dlstore` command line: build zoos, ask SQL questions, inspect runs.

Errors a user can cause print as one line on stderr with exit status 1, never a traceback.
"""

from __future__ import annotations

import dataclasses
import enum
import io
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
from dlstore.output import cell as _cell
from dlstore.output import json_text, print_frame

DEFAULT_STORE = "dlstore-store"

# plain help (rich_markup_mode None): help texts keep their brackets ("SPEC's [metrics]"),
# flags carry no <bool> metavar
app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
    help="dlstore: build populations of neural networks and query them with SQL.",
)
out = Console()
err = Console(stderr=True)


def _usage_name(self) -> str:
    """SPEC / [RUN_ID]... in usage lines, as click writes them (typer writes {spec})."""
    name = self.name.upper() if self.required else f"[{self.name.upper()}]"
    return name + ("..." if self.nargs != 1 else "")


if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = _usage_name


def _show_version(value: bool) -> None:
    if value:
        out.print(f"dlstore {_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_show_version,
                                       is_eager=True, help="Print the version and exit.")
          ) -> None:
    """dlstore: build populations of neural networks and query them with SQL."""

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
FormatOption = typer.Option(Format.table, "--format", "-f",
                            help="table (fitted to the terminal), or csv / json: every column.")


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
    from dlstore.spec import ZooSpec

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
    from dlstore.building.build import build_zoo, check_same_zoo
    from dlstore.building.plan import plan_build

    try:
        target = _open(store, storage_option)
    except StoreError:
        target = None  # created below, once every check of the spec has passed
    done = frozenset(target.run_ids()) if target is not None else frozenset()
    if target is not None and not grow:
        check_same_zoo(zoo, target)  # build_zoo checks it again, for callers of the library
    plan = plan_build(zoo, device.value, part, done)
    if dry_run:
        _print_plan(zoo.name, plan, store if target is not None else None)
        return
    if (plan.n_new > CONFIRM_RUNS and not yes and _interactive()
            and not typer.confirm(f"build {plan.n_new:,} runs?", default=False)):
        raise BuildInterrupted("nothing built", exit_code=1)
    if target is None:
        target = _open(store, storage_option, create=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.fields[runs]}"), TextColumn("{task.percentage:>5.1f}%"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(f"{zoo.name}: training", total=None, runs="")

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=max(total, 1))

        def runs_done(done: int, total: int) -> None:
            # the bar moves with optimizer steps; the count says runs done of runs to build
            bar.update(task, runs=f"{done}/{total} runs", visible=total > 0)

        report = build_zoo(zoo, target, device=device.value, progress=advance,
                           backend=backend.value, address=address, shard=part, grow=grow,
                           plan=plan, runs_progress=runs_done)
    if report.runs_built == 0 and report.runs_skipped == report.runs_total:
        out.print(f"zoo [bold]{report.zoo}[/]: nothing to build, all {report.runs_total} runs "
                  f"are in the store -> {store}")
        return
    out.print(
        f"zoo [bold]{report.zoo}[/]: {report.runs_built} runs built "
        f"({report.runs_diverged} diverged), {report.runs_skipped} already in the store, "
        f"{report.cohorts} cohorts, {report.checkpoints} cohort checkpoints, "
        f"{report.seconds:.1f} s ({report.train_seconds:.1f} s in training steps)"
        + (f", group metrics of {report.group_steps} groups x steps" if report.group_steps
           else "")
        + (f", curve metrics of {report.curve_steps} groups x steps" if report.curve_steps
           else "") + f" -> {store}" + (f" (shard {part[0]}/{part[1]})" if part else "")
    )


def _interactive() -> bool:
    """A person at a terminal, who can answer a question (never a script or a batch job)."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def _print_plan(zoo: str, plan, store: str | None) -> None:
    from dlstore.building.limits import human_bytes

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


# a query may start with "-- a comment": unknown options are taken as the query
@app.command(context_settings={"ignore_unknown_options": True})
def sql(
    query: str = typer.Argument(None, help="SQL over the views runs, checkpoints, metrics, "
                                           "final, curves, metrics_wide, group_metrics, zoos, "
                                           "fits, tags; - reads it from stdin."),
    file: Path = typer.Option(None, "--file", "-F", help="Read the query from this file."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    format: Format = FormatOption,
) -> None:
    """Answer a SQL query over the store (SQL from an argument, a file or stdin)."""
    if (query is None) == (file is None):
        raise UsageError("give one query: as an argument, - for stdin, or --file PATH")
    if file is not None:
        try:
            query = file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--file {file}: {getattr(e, 'strerror', None) or e}") from None
    elif query == "-":
        query = sys.stdin.read()
    if not query.strip():
        raise UsageError("the query is empty")
    _print_frame(_open(store, storage_option).sql(query), format)


@app.command()
def runs(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = typer.Option(None, help="Only runs of this zoo."),
    format: Format = FormatOption,
) -> None:
    """List the runs in the store (every column of the runs view; a table shows what fits)."""
    s = _open(store, storage_option)
    frame = s.runs(zoo)
    if zoo is not None and not frame.height:
        _unknown_zoo(s, zoo, store)
    _print_frame(frame, format)


def _unknown_zoo(s, zoo: str, store: str):
    zoos = s.sql("SELECT DISTINCT zoo FROM runs ORDER BY zoo")["zoo"].to_list()
    raise NotFoundError(f"no runs of zoo {zoo!r} in store {store}; its zoos: "
                        + (", ".join(zoos) if zoos else "none"))


# what `show` leads with: what was trained and how it ended
_SHOW_FIRST = ("run_id", "zoo", "status", "arch", "dataset", "width", "depth", "n_params",
               "n_train", "label_noise", "optimizer", "lr", "momentum", "weight_decay",
               "batch_size", "schedule", "epochs", "total_steps", "seed", "final_step",
               "diverged_step")


@app.command()
def show(run_id: str = typer.Argument(..., help="A run id, as listed by `dlstore runs`."),
         store: str = StoreOption,
         storage_option: list[str] = StorageOptions,
         tensors: bool = typer.Option(False, "--tensors",
                                      help="Also list the per-tensor metrics."),
         config: bool = typer.Option(False, "--config", help="Also print the full run config."),
         format: Format = FormatOption) -> None:
    """Show one run: hyperparameters, final whole-model metrics, checkpoints (json: all of it;
    csv: every final metric row)."""
    s = _open(store, storage_option)
    run = s.run(run_id)
    steps = s.sql("SELECT step FROM checkpoints WHERE run_id = ? ORDER BY step",
                  [run_id])["step"].to_list()
    final = s.sql("SELECT run_id, step, metric, tensor, value FROM final WHERE run_id = ? "
                  "ORDER BY tensor NULLS FIRST, metric", [run_id])
    whole = final.filter(pl.col("tensor").is_null())
    per_tensor = final.filter(pl.col("tensor").is_not_null())
    if format is Format.json:
        sys.stdout.write(json_text({
            "run": run, "checkpoints": steps,
            "metrics": dict(zip(whole["metric"], whole["value"])),
            "tensor_metrics": per_tensor.select("metric", "tensor", "value").to_dicts()}) + "\n")
        return
    if format is Format.csv:
        _print_frame(final, format)
        return
    table = Table(show_header=False, box=None, highlight=False)
    for key in _SHOW_FIRST:
        if run.get(key) is not None:
            table.add_row(key, _cell(run[key]))
    for key, value in run["tags"].items():
        table.add_row(f"tag {key}", value)
    out.print(table, markup=False)
    out.print(f"checkpoints at steps {steps}", highlight=False, markup=False)
    out.print(f"metrics at step {run['final_step']}:", highlight=False, markup=False)
    metrics = Table(show_header=False, box=None, highlight=False)
    for metric, value in zip(whole["metric"], whole["value"]):
        metrics.add_row(metric, _cell(value))
    out.print(metrics, markup=False)
    if tensors:
        _print_frame(per_tensor.select("metric", "tensor", "value"), Format.table)
    elif per_tensor.height:
        out.print(f"{per_tensor.height} per-tensor metrics (--tensors lists them); other "
                  f"columns of the run: --config, --format json", style="dim", markup=False)
    if config:
        out.print(json.dumps(run["config"], indent=1), markup=False, highlight=False)


@app.command()
def verify(store: str = StoreOption,
           storage_option: list[str] = StorageOptions,
           repair: bool = typer.Option(False, "--repair", help="Hide the runs whose shards are "
                                       "lost or damaged (and remove the damaged files), so "
                                       "that the next build-zoo of their spec trains them "
                                       "again.")) -> None:
    """Check every table's log and files, every shard's hash and header, every checkpoint
    reference; list each problem; exit 1 if there is any."""
    from dlstore.store.maintenance import repair as repair_store
    from dlstore.store.maintenance import verify as verify_store

    s = _open(store, storage_option)
    report = verify_store(s)
    _print_verify(report)
    if repair and (report.damaged_runs or report.bad_shards):
        done = repair_store(s, report)
        out.print(f"repaired: {len(done.runs)} runs hidden (rebuild their zoos with `dlstore "
                  f"build-zoo SPEC` to train them again), {len(done.shards)} damaged shards "
                  "removed; checking again", highlight=False, soft_wrap=True)
        report = verify_store(_open(store, storage_option))
        _print_verify(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_verify(report) -> None:
    for problem in report.problems:
        out.print(f"[red]problem:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    for note in report.notes:
        out.print(f"note: {escape(note)}", highlight=False)
    rows = ", ".join(f"{name} {n}" for name, n in report.table_rows.items())
    verdict = "[green]ok[/]" if report.ok else f"[red]{len(report.problems)} problems[/]"
    out.print(f"{verdict}: {report.shards} shards, {report.checkpoints} checkpoints; rows: {rows}",
              highlight=False, soft_wrap=True)


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


# -- managing zoos and runs ---------------------------------------------------------------------

_ZOOS_QUERY = """
    WITH z AS (SELECT zoo, arg_max(spec_hash, created_at) AS spec_hash,
                      arg_max(source_format, created_at) AS source,
                      arg_max(source_path, created_at) AS source_path,
                      min(created_at) AS created_at FROM zoos GROUP BY zoo),
    r AS (SELECT zoo, count(*) AS runs, count(*) FILTER (WHERE status = 'complete') AS complete,
                 count(*) FILTER (WHERE status = 'diverged') AS diverged,
                 count(*) FILTER (WHERE status NOT IN ('complete', 'diverged')) AS other,
                 min(created_at) AS first_run FROM runs GROUP BY zoo),
    c AS (SELECT r.zoo, count(*) AS checkpoints, sum(c.n_bytes)::BIGINT AS size_bytes
          FROM checkpoints c JOIN runs r USING (run_id) GROUP BY r.zoo),
    m AS (SELECT r.zoo, count(*) AS metric_rows FROM metrics m JOIN runs r USING (run_id)
          GROUP BY r.zoo)
    SELECT zoo, z.spec_hash, z.source, z.source_path, coalesce(r.runs, 0) AS runs,
           coalesce(r.complete, 0) AS complete,
           coalesce(r.diverged, 0) AS diverged, coalesce(r.other, 0) AS other,
           coalesce(c.checkpoints, 0) AS checkpoints, coalesce(c.size_bytes, 0) AS size_bytes,
           coalesce(m.metric_rows, 0) AS metric_rows,
           coalesce(z.created_at, r.first_run) AS created_at
    FROM z FULL JOIN r USING (zoo) LEFT JOIN c USING (zoo) LEFT JOIN m USING (zoo)
    ORDER BY zoo"""


@app.command()
def zoos(store: str = StoreOption,
         storage_option: list[str] = StorageOptions,
         format: Format = FormatOption) -> None:
    """Every zoo in the store: spec hash, source (imported zoos: format and path), runs by
    status, checkpoints, size, metric rows, created (imported)."""
    frame = _open(store, storage_option).sql(_ZOOS_QUERY)
    if format is Format.table:
        frame = frame.with_columns(
            pl.Series("size", [_size(b) for b in frame["size_bytes"]], dtype=pl.String),
            pl.col("spec_hash").str.slice(0, 12),
            pl.col("created_at").dt.strftime("%Y-%m-%d %H:%M")).drop("size_bytes")
    _print_frame(frame, format)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


@app.command()
def rm(
    run_ids: list[str] = typer.Argument(None, help="Run ids to remove."),
    zoo: str = typer.Option(None, "--zoo", help="Remove every run of this zoo (and its spec)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove; without it rm only says what "
                             "it would remove (a dry run)."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
) -> None:
    """Remove runs from every view by one commit (their rows stay in the tables, their shards
    until `dlstore gc`); a rebuild of the zoo trains them again. Dry run unless --yes."""
    if (zoo is None) == (not run_ids):
        raise UsageError("give run ids or --zoo NAME (not both)")
    s = _open(store, storage_option)
    if zoo is not None:
        ids = s.sql("SELECT run_id FROM runs WHERE zoo = ? ORDER BY run_id", [zoo])["run_id"]
        if not ids.len():
            _unknown_zoo(s, zoo, store)
        ids = ids.to_list()
    else:
        ids = sorted(set(run_ids))
        known = set(s.sql("SELECT run_id FROM runs WHERE list_contains(?, run_id)",
                          [ids])["run_id"])
        missing = [r for r in ids if r not in known]
        if missing:
            raise NotFoundError(f"no run {missing[0]!r} in store {store}"
                                + (f" ({len(missing)} of {len(ids)} unknown)"
                                   if len(missing) > 1 else ""))
    checkpoints = s.sql("SELECT count(*) AS n, coalesce(sum(n_bytes), 0) AS b FROM checkpoints "
                        "WHERE list_contains(?, run_id)", [ids]).row(0)
    what = (f"{len(ids)} runs" + (f" of zoo {zoo}" if zoo else "")
            + f" ({checkpoints[0]} checkpoints, {_size(checkpoints[1])} of weights)")
    if not yes:
        out.print(f"would remove {what}: {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}"
                  "; rerun with --yes to remove them", markup=False, highlight=False,
                  soft_wrap=True)
        return
    s.remove_runs(ids, zoo=zoo)  # refused while a build of their zoo runs
    out.print(f"removed {what}; `dlstore gc` frees the shards only they used", markup=False,
              highlight=False, soft_wrap=True)


@app.command()
def export(
    run_id: str = typer.Argument(..., help="A run id, as listed by `dlstore runs`."),
    out_path: Path = typer.Option(..., "--out", help="model.safetensors (with metadata: run, "
                                  "step, architecture) or model.pt (torch.save of the state "
                                  "dict)."),
    step: int = typer.Option(None, help="Checkpoint step (default: the run's last)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
) -> None:
    """Write one checkpoint as a file others can load without dlstore."""
    row, n_tensors = _open(store, storage_option).export(run_id, out_path, step, force)
    out.print(f"run {run_id} step {row['step']}: {n_tensors} tensors -> {out_path}",
              markup=False, highlight=False)


@app.command("import-runs")
def import_runs_command(
    path: Path = typer.Argument(..., help="A run's directory, or one holding a run per "
                                "subdirectory: checkpoints (*.safetensors, *.pt with the step "
                                "in the name), metrics.csv or metrics.jsonl, config.json."),
    zoo: str = typer.Option(..., "--zoo", help="The zoo the runs join."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
) -> None:
    """Import runs trained elsewhere; rerunning adds nothing, an import cut short resumes."""
    from dlstore.importers.runs import find_runs, import_runs

    s = _open_existing(store, storage_option)
    find_runs(path)  # a missing or empty source is refused before a store is created
    s = s or _open(store, storage_option, create=True)
    report = import_runs(s, path, zoo)
    out.print(f"zoo [bold]{zoo}[/]: {report.runs} runs imported ({report.skipped} already "
              f"complete): {report.checkpoints} checkpoints, {report.metric_rows} metric values")


@app.command("import")
def import_command(
    format: str = typer.Argument(..., metavar="FORMAT",
                                 help="raytune, unterthiner, hf or csv (see README, "
                                 "'Importing published zoos')."),
    path: Path = typer.Argument(..., help="The source: a directory (raytune, unterthiner, hf) "
                                "or a CSV file or directory of them (csv)."),
    zoo: str = typer.Option(..., "--zoo", help="The zoo the imported runs form."),
    map_: list[str] = typer.Option(None, "--map", metavar="COLUMN=CSV_COLUMN",
                                   help="csv: the CSV column that fills a runs column "
                                   "(repeatable), e.g. --map width=model_width."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
) -> None:
    """Import a published zoo in its own layout; rerunning adds nothing, an import cut short
    resumes. A run whose files are bad is left out with one line; the exit code is then 1."""
    from dlstore.importers.registry import check_source, import_zoo

    mapping = _key_values(map_, "--map ", " (COLUMN=CSV_COLUMN)")
    s = _open_existing(store, storage_option)
    # a bad source is refused before a store is made, and before the progress bar starts
    check_source(format, path, mapping)
    if s is None:
        s = _open(store, storage_option, create=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} runs"), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(f"{zoo}: importing {format}", total=None)

        def advance(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        report = import_zoo(s, format, path, zoo, mapping=mapping, progress=advance)
    for line in report.errors:
        err.print(line, markup=False, highlight=False, soft_wrap=True)
    out.print(f"zoo [bold]{zoo}[/]: {report.runs} runs imported ({report.skipped} already "
              f"complete, {len(report.errors)} left out): {report.checkpoints} checkpoints, "
              f"{report.metric_rows} metric values; the zoo holds {report.total_runs} runs, "
              f"{report.total_checkpoints} checkpoints, {report.total_metric_rows} metric "
              "values", soft_wrap=True)
    if report.errors:
        raise typer.Exit(1)


@app.command()
def tag(
    run_id: str = typer.Argument(..., help="A run id, as listed by `dlstore runs`."),
    pairs: list[str] = typer.Argument(None, metavar="KEY=VALUE...",
                                      help="Tags to set; KEY= removes a tag."),
    note: str = typer.Option(None, "--note", help="A free-text note (the tag 'note')."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    format: Format = FormatOption,
) -> None:
    """Tag a run (or list its tags): shown in `runs` and queryable as runs.tags['KEY']."""
    tags = _key_values(pairs, "", " (KEY= removes the tag)")
    if note is not None:
        tags["note"] = note
    s = _open(store, storage_option)
    if tags:
        s.set_tags(run_id, tags)
    current = s.run(run_id)["tags"]
    _print_frame(pl.DataFrame({"key": list(current), "value": list(current.values())},
                              schema={"key": pl.String, "value": pl.String}), format)


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
    plot: Path = typer.Option(Path("scaling.png"), help="Where to write the figure (.png, .pdf, "
                                                        ".svg; a directory: scaling.png in it)."),
    bootstrap: int = typer.Option(200, min=0, help="Bootstrap resamples for the intervals."),
    level: float = typer.Option(0.95, min=0.5, max=0.999, help="Confidence level."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    label: str = typer.Option(None, help="Name of the fit in the fits view; a fit stored under "
                              "the same label is replaced (default: kind + a hash of the query "
                              "and options, so a re-run of the same fit replaces it)."),
    format: Format = FormatOption,
) -> None:
    """Fit a scaling law to the runs a query selects; save it in the fits table; plot it.
    Refuses a resource with fewer than 3 distinct values; warns (one line each, also stored
    with the fit) of a negative exponent, one at its bound 0, or an unbounded interval."""
    import numpy as np

    from dlstore.analysis.scaling import (
        check_distinct,
        fit_chinchilla,
        fit_power_law,
        fit_warnings,
    )
    from dlstore.errors import QueryError
    from dlstore.plots import scaling_figure
    plot = _figure_path(plot, "scaling.png")  # checked before anything is fitted or stored
    s = _open(store, storage_option)
    frame = s.sql(query)
    if (x is None) != (y is None):
        raise QueryError("give both --x and --y for a one-variable fit, or neither")
    wanted = [x, y] if x is not None else ["N", "D", "loss"]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise QueryError(f"the query returned columns {frame.columns}; missing {missing}")
    cols = []
    for c in wanted:
        if not frame[c].dtype.is_numeric():
            raise QueryError(f"column {c} of the query is {frame[c].dtype}, not a number")
        cols.append(frame[c].cast(float).to_numpy())
    options = {"ci_level": level, "n_bootstrap": bootstrap, "seed": seed}
    if x is not None:
        check_distinct({x: cols[0]}, "power_law")
        result = fit_power_law(*cols, **options)
    else:
        check_distinct({"N": cols[0], "D": cols[1]}, "chinchilla")
        result = fit_chinchilla(*cols, **options)
    warnings = fit_warnings(result)
    label = label or _fit_label(result.kind, [query, x, y, options])
    info = result.to_dict()
    if x is not None:
        figure = scaling_figure(result, cols[0], cols[1], x_label=x)
    else:
        figure = scaling_figure(result, cols[0], cols[2], d=cols[1])
    _save(figure, plot)
    from dlstore.store.writer import StoreWriter

    fit_id = StoreWriter(s).record_fit({
        "kind": result.kind, "query": query, "params": json.dumps(info["params"]),
        "ci": json.dumps(info["ci"]), "ci_level": level, "objective": result.objective,
        "n": result.n, "dlstore_version": _version(), "label": label, "warnings": warnings})
    for warning in warnings:
        err.print(f"warning: {warning}", highlight=False, markup=False, soft_wrap=True)
    rows = [{"parameter": name, "estimate": value,
             "low": result.ci.get(name, (None, None))[0],
             "high": result.ci.get(name, (None, None))[1]}
            for name, value in result.params.items()]
    exponents = (result.compute_optimal_exponents
                 if result.kind == "chinchilla" and not warnings else None)
    if format is Format.json:
        sys.stdout.write(json_text({
            "fit_id": fit_id, "label": label, "kind": result.kind, "n": result.n,
            "objective": result.objective, "ci_level": level, "params": result.params,
            "ci": {k: list(v) for k, v in result.ci.items()}, "warnings": warnings,
            "compute_optimal_exponents": list(exponents) if exponents else None,
            "figure": str(plot)}) + "\n")
        return
    if format is Format.csv:
        _print_frame(pl.DataFrame(rows, schema={"parameter": pl.String, "estimate": pl.Float64,
                                                "low": pl.Float64, "high": pl.Float64}), format)
        return
    table = Table("parameter", "estimate", f"{level:.0%} interval", header_style="bold")
    for row in rows:
        low, high = (np.nan if v is None else v for v in (row["low"], row["high"]))
        table.add_row(row["parameter"], f"{row['estimate']:.6g}", f"[{low:.4g}, {high:.4g}]")
    out.print(table, markup=False)
    out.print(f"{result.kind} fit of {result.n} points, objective {result.objective:.4g}; "
              f"saved as fit {fit_id}, label {label} (SELECT * FROM fits)", markup=False,
              highlight=False, soft_wrap=True)
    if exponents:
        a, b = exponents
        out.print(f"compute-optimal: N_opt ~ C^{a:.3f}, D_opt ~ C^{b:.3f}", highlight=False)
    out.print(f"figure -> {plot}", markup=False, highlight=False)


def _fit_label(kind: str, what: list) -> str:
    """The default label of a fit: its kind and a hash of what defines it (query, options), so
    that a re-run of the same fit replaces the earlier one in the fits view."""
    import hashlib

    return f"{kind}-{hashlib.sha256(json.dumps(what).encode()).hexdigest()[:10]}"


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
    plot: Path = typer.Option(Path("wsl.png"), help="Where to write predicted vs true (.png, "
                                                    ".pdf, .svg; a directory: wsl.png in it)."),
    label: str = typer.Option(None, help="Name of the fit in the fits view (default: a hash "
                              "of the query and options; a re-run replaces it)."),
    format: Format = FormatOption,
) -> None:
    """Predict a target from checkpoints' weights; score it on held-out runs; save the fit."""
    from dlstore.analysis.wsl import WeightDataset, fit_predictor
    from dlstore.layout import Layout
    from dlstore.plots import wsl_figure

    plot = _figure_path(plot, "wsl.png")
    s = _open(store, storage_option)
    layout = Layout.union(s.weight_layouts(query)[0]) if pad and features.value != "stats" else None
    dataset = WeightDataset(s, query, target=target, features=features.value, task=task.value,
                            splits=_split_fractions(split), seed=seed, layout=layout)
    result = fit_predictor(dataset, model=model.value, seed=seed)
    info = result.to_dict()
    label = label or _fit_label("wsl", [query, target, features.value, model.value, task.value,
                                        split, seed, pad])
    _save(wsl_figure(result), plot)
    from dlstore.store.writer import StoreWriter

    fit_id = StoreWriter(s).record_fit({"kind": "wsl", "query": query, "params": json.dumps(info),
                           "n": len(dataset), "dlstore_version": _version(), "label": label})
    if format is not Format.table:
        sys.stdout.write(json_text({"fit_id": fit_id, "label": label, **info,
                                    "figure": str(plot)}) + "\n")
        return
    if result.task == "regression":
        out.print(f"Kendall tau {result.kendall_tau:.4f}, R^2 {result.r2:.4f}", highlight=False)
    else:
        out.print(f"accuracy {result.accuracy:.4f} over {len(result.classes)} classes",
                  highlight=False)
    out.print(f"{result.model} on {result.features} features predicting {result.target}: "
              f"fitted on {result.n_train} checkpoints of {result.n_train_runs} runs, scored on "
              f"{result.n_test} checkpoints of {result.n_test_runs} held-out runs; saved as fit "
              f"{fit_id}, label {label} (SELECT * FROM fits)", highlight=False, soft_wrap=True)
    out.print(f"figure -> {plot}", markup=False, highlight=False)


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
    from dlstore.metrics.backfill import backfill_checkpoint_metrics
    from dlstore.metrics.curve_groups import compute_curve_metrics
    from dlstore.metrics.groups import compute_group_metrics
    from dlstore.spec import ZooSpec
    from dlstore.store.writer import StoreWriter
    from dlstore.training.device import resolve_device

    zoo = ZooSpec.from_toml(spec)
    s = _open(store, storage_option)
    dev = resolve_device(device.value)
    writer = StoreWriter(s)
    checkpoints = backfill_checkpoint_metrics(writer, zoo.name, zoo.runs, zoo.metrics,
                                              device=dev)
    groups = curves = 0
    if zoo.metrics.groups is not None:
        groups = compute_group_metrics(writer, zoo.name, zoo.metrics.groups,
                                       {r.run_id for r in zoo.runs}, device=dev)
    if zoo.metrics.curve is not None:
        curves = compute_curve_metrics(writer, zoo.name, zoo.metrics.curve,
                                       {r.run_id for r in zoo.runs}, device=dev)
    out.print(f"zoo [bold]{zoo.name}[/]: metrics added at {checkpoints} checkpoints, group "
              f"metrics of {groups} and curve metrics of {curves} groups x steps")


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
    from dlstore.metrics.families import GroupOptions
    from dlstore.metrics.groups import compute_group_metrics
    from dlstore.store.writer import StoreWriter
    from dlstore.training.device import resolve_device

    options = GroupOptions(at=_selection(at), pairs=pairs, points=points, subsample=subsample)
    s = _open(store, storage_option)
    if not s.sql("SELECT 1 FROM runs WHERE zoo = ? LIMIT 1", [zoo]).height:
        raise NotFoundError(f"no runs of zoo {zoo!r} in store {store}")
    computed = compute_group_metrics(StoreWriter(s), zoo, options,
                                     device=resolve_device(device.value))
    out.print(f"zoo [bold]{zoo}[/]: group metrics of {computed} groups x steps computed "
              "(SELECT * FROM group_metrics)")


plot_app = typer.Typer(no_args_is_help=True,
                       help="Figures of a store's runs (PNG, or PDF / SVG for vector output).")
app.add_typer(plot_app, name="plot")

_OUT_HELP = "Where to write the figure: .png, .pdf or .svg, or a directory to write {} in."


@plot_app.command("phases")
def plot_phases(
    x: str = typer.Option(..., "--x", help="Grid axis across, e.g. lr or batch_size."),
    y: str = typer.Option(..., "--y", help="Grid axis up, e.g. width or n_train."),
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = typer.Option(None, help="Zoo (needed when several have group metrics)."),
    out_path: Path = typer.Option(Path("phases.png"), "--out",
                                  help=_OUT_HELP.format("phases.png")),
    mc: str = typer.Option("auto", help="Mode connectivity: auto (along the trained curve when "
                           "the zoo has it, else the line), line or curve."),
    format: Format = FormatOption,
) -> None:
    """Phase diagram after Yang et al. 2021, thresholds from the zoo's [phases] spec table;
    mode connectivity along the trained curve when the zoo has it (the output says which)."""
    from dlstore.analysis.phases import phase_counts, phase_table
    from dlstore.plots import phase_figure

    out_path = _figure_path(out_path, "phases.png")
    table = phase_table(_open(store, storage_option), x, y, zoo, mc=mc)
    _print_frame(table, format)
    counts = ", ".join(f"{p}: {n}" for p, n in phase_counts(table).items())
    mc = table["mc_metric"][0]
    _save(phase_figure(table, x, y, title=f"phases (Yang et al. 2021; mc: {mc})"), out_path)
    _note(f"phases ({counts}; mode connectivity: {mc}) -> {out_path}", format)


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
    out_path: Path = typer.Option(None, "--out", help=_OUT_HELP.format("METRIC.png")
                                  + " Default METRIC.png."),
    format: Format = FormatOption,
) -> None:
    """Heatmap of a metric's mean at each run's last checkpoint over two grid axes."""
    from dlstore.analysis.phases import metric_table
    from dlstore.plots import metric_figure

    default = f"{_file_name(metric)}.png"
    out_path = _figure_path(out_path or Path(default), default)
    table = metric_table(_open(store, storage_option), metric, x, y, zoo, tensor)
    _print_frame(table, format)
    _save(metric_figure(table, metric, x, y), out_path)
    _note(f"figure -> {out_path}", format)


def _file_name(text: str) -> str:
    """A metric name as a file name: path separators and odd characters replaced."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip(".") or "metric"


def _zoo_option(recipe: str):
    return typer.Option(recipe, help=f"The zoo built from zoo/{recipe}.toml.")


def _out_option(recipe: str):
    return typer.Option(Path(f"{recipe}.png"), "--out", help=_OUT_HELP.format(f"{recipe}.png"))


def _recipe(store: str, storage_option: list[str], zoo: str, recipe: str, out_path: Path):
    """The store, and where the figure goes, once the zoo is known to hold what the recipe's
    figure is about."""
    from dlstore.analysis.phenomena import check_recipe

    out_path = _figure_path(out_path, f"{recipe}.png")
    s = _open(store, storage_option)
    check_recipe(s, zoo, recipe)
    return s, out_path


@plot_app.command("double-descent")
def plot_double_descent(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = _zoo_option("double-descent"),
    out_path: Path = _out_option("double-descent"),
    format: Format = FormatOption,
) -> None:
    """Test error against width at the last step, and along training for the widest nets."""
    from dlstore.analysis.phenomena import (
        double_descent_signature,
        double_descent_table,
        epochwise_table,
    )
    from dlstore.plots import double_descent_figure

    s, out_path = _recipe(store, storage_option, zoo, "double-descent", out_path)
    table = double_descent_table(s, zoo)
    _save(double_descent_figure(table, epochwise_table(s, zoo)), out_path)
    _print_result(table, double_descent_signature(table), out_path, format)


@plot_app.command("grokking")
def plot_grokking(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = _zoo_option("grokking"),
    out_path: Path = _out_option("grokking"),
    format: Format = FormatOption,
) -> None:
    """Train and test accuracy along training, one curve pair per weight decay."""
    from dlstore.analysis.phenomena import grokking_signature, grokking_table
    from dlstore.plots import grokking_figure

    s, out_path = _recipe(store, storage_option, zoo, "grokking", out_path)
    table = grokking_table(s, zoo)
    _print_frame(grokking_signature(table), format)
    operations = s.sql("SELECT DISTINCT json_extract_string(config, '$.dataset.operation') AS op "
                       "FROM runs WHERE zoo = ?", [zoo])["op"].drop_nulls().to_list()
    names = {"add": "addition", "sub": "subtraction", "mul": "multiplication", "div": "division"}
    title = (f"grokking: modular {', '.join(names.get(o, o) for o in operations) or 'arithmetic'}"
             f" ({zoo})")
    _save(grokking_figure(table, title), out_path)
    _note(f"figure -> {out_path}", format)


@plot_app.command("neural-collapse")
def plot_neural_collapse(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = _zoo_option("neural-collapse"),
    out_path: Path = _out_option("neural-collapse"),
    format: Format = FormatOption,
) -> None:
    """NC1-NC4 and train/test error along training; the terminal phase shaded."""
    from dlstore.analysis.phenomena import collapse_signature, collapse_table
    from dlstore.plots import collapse_figure

    s, out_path = _recipe(store, storage_option, zoo, "neural-collapse", out_path)
    table = collapse_table(s, zoo)
    _save(collapse_figure(table), out_path)
    _print_result(table, collapse_signature(table), out_path, format)


@plot_app.command("simplicity-bias")
def plot_simplicity_bias(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: str = _zoo_option("simplicity-bias"),
    out_path: Path = _out_option("simplicity-bias"),
    format: Format = FormatOption,
) -> None:
    """Accuracy on the test split and on its Gaussian clone along training."""
    from dlstore.analysis.phenomena import simplicity_signature, simplicity_table
    from dlstore.plots import simplicity_figure

    s, out_path = _recipe(store, storage_option, zoo, "simplicity-bias", out_path)
    table = simplicity_table(s, zoo)
    n_classes = s.sql("SELECT any_value(n_classes) AS c FROM runs WHERE zoo = ?", [zoo])["c"][0]
    _save(simplicity_figure(table), out_path)
    _print_result(table, simplicity_signature(table, chance=1 / n_classes), out_path, format)


def _note(text: str, format: Format) -> None:
    """A line about what was written: on stdout beside a table, on stderr beside CSV / JSON
    (which stay parseable)."""
    (out if format is Format.table else err).print(text, markup=False, highlight=False,
                                                  soft_wrap=True)


FIGURE_FORMATS = (".png", ".pdf", ".svg")


def _figure_path(path: Path, default_name: str) -> Path:
    """Where a figure goes: an existing directory means `default_name` in it; the extension
    must be one matplotlib writes (.png, .pdf, .svg: vector), the directory must exist."""
    if path.is_dir():
        path = path / default_name
    if path.suffix.lower() not in FIGURE_FORMATS:
        raise UsageError(f"cannot write the figure to {path}: give a file ending in "
                         f"{', '.join(FIGURE_FORMATS)} or an existing directory")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write the figure to {path}: directory {path.parent} does not "
                         "exist")
    return path


def _save(figure, path: Path, dpi: int = 300) -> None:
    """Write a figure where the user asked; an unwritable path is a one-line error."""
    try:
        figure.savefig(path, dpi=dpi, bbox_inches="tight")
    except OSError as e:
        raise UsageError(f"cannot write the figure to {path}: {e.strerror or e}") from None


def _print_result(table: pl.DataFrame, signature: dict, out_path: Path, format: Format) -> None:
    """A recipe's table and signature: json one object {"table": rows, "signature": ...};
    csv the table (the signature on stderr)."""
    if format is Format.json:
        sys.stdout.write(json_text({"table": table.to_dicts(), "signature": signature}) + "\n")
    else:
        _print_frame(table, format)
        for key, value in signature.items():
            (out if format is Format.table else err).print(f"{key}: {_cell(value)}",
                                                          markup=False, highlight=False)
    _note(f"figure -> {out_path}", format)


# -- the report page and the server --------------------------------------------------------------


@app.command()
def report(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    zoo: list[str] = typer.Option(None, "--zoo", help="A zoo to report on (repeatable; "
                                  "default: every zoo in the store)."),
    out_path: Path = typer.Option(Path("report.html"), "--out",
                                  help="The HTML file to write (one self-contained page)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write one self-contained HTML page per store: for each zoo its summary, runs table,
    learning curves and the analyses it has data for, each panel with the SQL behind it."""
    import time

    from dlstore.report.page import render, report_data
    from dlstore.report.write import page_path, write_page

    start = time.perf_counter()
    out_path = page_path(out_path, force)  # before any work
    s = _open(store, storage_option)
    data = report_data(s, zoo or None)
    size = write_page(render(data), out_path)
    runs = sum(len(z["runs"]["data"][0]) if z["runs"]["data"] else 0 for z in data["zoos"])
    out.print(f"report of {len(data['zoos'])} zoo(s), {runs:,} runs -> {out_path} "
              f"({size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)",
              markup=False, highlight=False, soft_wrap=True)


@app.command()
def serve(
    store: str = StoreOption,
    storage_option: list[str] = StorageOptions,
    port: int = typer.Option(8765, min=0, max=65535, help="Port to listen on (0: a free one)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind: 127.0.0.1 keeps it on this "
                             "machine; 0.0.0.0 shares it with the network (no login!)."),
) -> None:
    """Serve the report live over STORE (it follows a build's commits) with a read-only SQL
    box that obeys the rules of `dlstore sql`; Ctrl-C stops it."""
    from dlstore.report.server import ReportServer

    server = ReportServer(_open(store, storage_option), host, port)
    where = ("only this machine can reach it" if host in ("127.0.0.1", "localhost", "::1")
             else f"bound to {host}: other machines can reach it, with no login")
    out.print(f"serving {store} on {server.url} ({where}); Ctrl-C stops", markup=False,
              highlight=False, soft_wrap=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        err.print("stopped", highlight=False)
    finally:
        server.server_close()


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
    format: Format = typer.Option(Format.table, "--format", "-f",
                                  help="table, or json: every table of the report in one object "
                                       "(csv: query the tickets and ticket_transfer views)."),
) -> None:
    """Accuracy vs density of tickets, controls and dense runs; instability; transfer matrix."""
    if format is Format.csv:
        raise UsageError("tickets report holds several tables: give --format json, or dlstore "
                         "sql --format csv on the tickets and ticket_transfer views")
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
    # tables of ten columns: a report written to a file or pipe is not cut at 80 characters;
    # with --format json the text goes nowhere and one JSON object goes to stdout
    as_json = format is Format.json
    console = (Console(file=io.StringIO()) if as_json
               else out if out.is_terminal else Console(width=140))
    report: dict = {}
    frame = accuracy_by_density(s, zoo)
    zoos = sorted(set(frame["zoo"]))
    if len(zoos) > 1:
        raise QueryError(f"the store holds tickets of zoos {', '.join(zoos)}; pick one with --zoo")
    zoo = zoos[0]
    report["zoo"] = zoo
    report["accuracy_by_density"] = frame.to_dicts()
    try:
        plots.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--plots {plots}: {e.strerror or e}") from None
    console.print(f"[bold]{zoo}: final test accuracy by density[/] (mean over seeds; n seeds)")
    _print_frame(_round(frame.drop("zoo", *(c for c in frame.columns if c.endswith("_std")))),
                 Format.table, console)
    sigs = signatures(s, zoo, max_density)
    report["signatures"] = [dataclasses.asdict(sig) for sig in sigs]
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
    report["instability"] = barriers.to_dicts()
    if barriers.height:
        console.print("[bold]instability[/]: error barrier between copies trained from the same "
                  "weights with another data order")
        _print_frame(_round(barriers.drop("zoo")), Format.table, console)
    _save(ticket_density_figure(frame), plots / "tickets_density.png", 120)
    written = [plots / "tickets_density.png"]
    transfer = transfer_table(s, zoo)
    report["transfer"] = transfer.to_dicts()
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
    if as_json:
        sys.stdout.write(json_text({**report, "figures": [str(p) for p in written]}) + "\n")
        return
    console.print("figures -> " + ", ".join(map(str, written)))


def _round(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col(pl.Float64).round(3))


def _rounded(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _open(store: str, options: list[str] | None, create: bool = False):
    from dlstore.store.store import Store

    return Store(store, create=create,
                 storage_options=_key_values(options, "--storage-option "))


def _open_existing(store: str, storage_option: list[str]):
    """The store if it exists, None if nothing is there yet (an importer creates it once its
    source has passed its checks); a location that holds something else is refused."""
    try:
        return _open(store, storage_option)
    except StoreError as e:
        if "does not exist" not in str(e):
            raise
        return None


def _key_values(items: list[str] | None, what: str, hint: str = "") -> dict[str, str]:
    """KEY=VALUE arguments as a dict; a malformed one is a one-line UsageError."""
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what}{item!r}: give KEY=VALUE{hint}")
        pairs[key.strip()] = value
    return pairs


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


def _print_frame(frame: pl.DataFrame, format: Format, console: Console | None = None) -> None:
    print_frame(frame, format.value, console or out)


try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException


def main(argv: list[str] | None = None) -> None:
    try:
        # not standalone: a usage error is printed here, as one line like every other error
        code = app(args=argv, prog_name="dlstore", standalone_mode=False)
    except BuildInterrupted as e:  # no error: what was kept, and how to go on
        err.print(escape(str(e)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: its help
            e.show()
            sys.exit(2)
        err.print(f"[bold red]error:[/] {escape(_one_line(e.format_message()))}",
                  highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except DlstoreError as e:
        # escaped: messages carry user text and install hints like 'dlstore[ray]'
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted; rerun the same command to resume")
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    main()
