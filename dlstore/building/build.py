"""Plan -> cohorts -> train -> commit: builds a zoo spec into a store, resumably.

Runs already in the store are skipped, so rerunning a spec after a crash (or after it finished)
trains only what is missing and adds nothing when nothing is. Each cohort's shards are written as
its checkpoints arrive; its rows are committed when it finishes, runs rows last. When the spec
asks for group metrics, they are computed last, from the committed runs (`groups.py`).

A build is a sequence of phases, each a set of cohorts trained and committed as above. A plain
zoo is one phase. A zoo with `[tickets]` has one per pruning level (`tickets.py`): level k's
masks and start weights are read back from what level k-1 committed, so a rebuild after a crash
continues from the last committed level.

`plan_build` makes every check a spec can fail (its sizes against memory, before any data is
generated) and plans the cohorts; the CLI calls it before it creates a store. Ctrl-C (or SIGTERM,
which the CLI turns into the same exception) commits the cohorts already finished and raises
BuildInterrupted: at most the cohort in flight is lost, and a rerun resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import dlstore
from dlstore.building.commit import Committer
from dlstore.building.plan import BuildPlan, plan_build
from dlstore.building.runners import local_runner
from dlstore.errors import BuildInterrupted, DlstoreError, SpecError
from dlstore.experiments.base import experiment_for
from dlstore.interrupts import exit_code
from dlstore.metrics.curve_groups import compute_curve_metrics
from dlstore.metrics.groups import compute_group_metrics
from dlstore.spec import ZooSpec
from dlstore.store.leases import BuildLease
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter
from dlstore.training.device import resolve_device


@dataclass
class BuildReport:
    zoo: str
    runs_total: int
    runs_skipped: int
    runs_built: int
    runs_diverged: int
    cohorts: int
    checkpoints: int
    seconds: float
    train_seconds: float
    group_steps: int = 0  # (group, step) pairs whose group metrics were computed
    curve_steps: int = 0  # (group, step) pairs whose curve metrics were computed
    runs_dropped: int = 0  # trained, but their shards were gone at commit: rebuilt next time


















def build_zoo(spec: ZooSpec, store: Store, device: str = "auto",
              progress: Callable[[int, int], None] | None = None, backend: str = "local",
              address: str | None = None, shard: tuple[int, int] | None = None,
              grow: bool = False, plan: BuildPlan | None = None,
              runs_progress: Callable[[int, int], None] | None = None) -> BuildReport:
    """Train every run of `spec` that `store` does not hold yet and commit it, phase by phase.

    `progress(done, total)` is called with optimizer steps done (summed over cohorts),
    `runs_progress(done, total)` with runs trained of runs to train (first with 0, total).
    `backend` "ray" trains the cohorts as tasks on the Ray cluster at `address` (`ray_backend`);
    `shard` (I, N) builds only the I-th of N contiguous blocks of the runs, so that N processes
    can share a zoo. A zoo name the store already holds from another spec (other runs) is
    refused unless `grow`. The build holds a lease for its whole duration, so that `gc` spares
    the shards it has written and not committed yet. `plan` (from `plan_build` with the same
    arguments) is used unless the store changed since.

    Ctrl-C (KeyboardInterrupt) commits the cohorts already finished, then raises
    BuildInterrupted: at most the cohort in flight is lost."""
    writer = StoreWriter(store)
    writer.check_writable()
    if not grow:
        check_same_zoo(spec, store)
    with BuildLease(store.location, spec.name):
        return _build_zoo(spec, writer, device, progress, backend, address, shard, plan,
                          runs_progress)


def _build_zoo(spec: ZooSpec, writer: StoreWriter, device: str,
               progress: Callable[[int, int], None] | None, backend: str,
               address: str | None, shard: tuple[int, int] | None,
               plan: BuildPlan | None,
               runs_progress: Callable[[int, int], None] | None) -> BuildReport:
    started = time.perf_counter()
    store = writer.store
    dev = resolve_device(device)
    experiment = experiment_for(spec)
    done_ids = frozenset(store.run_ids())
    if backend == "ray":
        from dlstore.building import ray as ray_backend

        execute, plan_device = ray_backend.cohort_runner(store, experiment, device, address,
                                                         spec.metrics)
    else:
        execute, plan_device = local_runner(writer, experiment, dev, spec.metrics), str(dev)
    if plan is None or plan.done_ids != done_ids or plan.device != plan_device:
        plan = plan_build(spec, device, shard, done_ids, plan_device)
    total = plan.total_steps
    report = BuildReport(spec.name, plan.n_runs, plan.n_runs - plan.n_new, 0, 0, plan.n_cohorts,
                         0, 0.0, 0.0)
    committer = Committer(writer, spec.build.commit_every)
    done = 0
    if runs_progress:
        runs_progress(0, plan.n_new)
    try:
        for index, (cohorts, cohort_steps) in enumerate(zip(plan.cohorts, plan.steps)):
            def phase_progress(steps_done: int, before: int = done) -> None:
                if progress:
                    progress(before + steps_done, total)

            for result in execute(cohorts, cohort_steps, index, phase_progress):
                for row in result.runs:
                    row["spec_hash"] = spec.spec_hash
                committer.add(result)
                report.runs_built += len(result.runs)
                if runs_progress:
                    runs_progress(report.runs_built, plan.n_new)
                report.runs_diverged += sum(r["status"] == "diverged" for r in result.runs)
                report.checkpoints += result.n_checkpoints
                report.train_seconds += result.train_seconds
            done += sum(cohort_steps)
            # the next phase reads what this one trained
            committer.flush()
            experiment.after_phase(writer, plan.phases)
        if spec.metrics.groups is not None:
            report.group_steps = compute_group_metrics(
                writer, spec.name, spec.metrics.groups, {r.run_id for r in spec.runs}, device=dev)
        if spec.metrics.curve is not None:
            report.curve_steps = compute_curve_metrics(
                writer, spec.name, spec.metrics.curve, {r.run_id for r in spec.runs}, device=dev)
        writer.record_zoo({"zoo": spec.name, "spec": spec.text, "spec_hash": spec.spec_hash,
                          "n_runs": plan.zoo_runs, "dlstore_version": dlstore.__version__})
    except KeyboardInterrupt as stop:
        committer.flush()  # the finished cohorts: only the one in flight is lost
        raise BuildInterrupted(
            f"interrupted: {committer.committed} runs built by this build are kept "
            f"({report.runs_skipped} were in the store before), "
            f"{plan.n_new - committer.committed} not built; rerun the same command to resume",
            exit_code(stop)) from None
    report.runs_dropped = committer.dropped
    report.runs_built -= committer.dropped
    report.seconds = time.perf_counter() - started
    return report


def check_same_zoo(spec: ZooSpec, store: Store) -> None:
    """SpecError if the store holds zoo `spec.name` built from a spec with other runs: two
    specs' runs in one zoo would be merged silently (and averaged by every recipe plot)."""
    for text, spec_hash in store.sql("SELECT spec, spec_hash FROM zoos WHERE zoo = ?",
                                     [spec.name]).iter_rows():
        if spec_hash == spec.spec_hash:
            continue
        try:
            same = ZooSpec.from_text(text).identity == spec.identity
        except DlstoreError:  # a spec this version no longer reads: only its text can match
            same = False
        if not same:
            raise SpecError(f"zoo {spec.name!r} in this store was built from another spec "
                            f"(other runs; spec hash {spec_hash[:12]}); give --grow to add this "
                            "spec's runs to that zoo, or give this spec another name")




















