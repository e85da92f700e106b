"""What the checkpoint metrics cost, measured side by side in one run.

    python bench/metrics_cost.py families --width 32 --members 1024     # per checkpoint
    python bench/metrics_cost.py build zoo/quickstart.toml --variants before,defaults,costly
    python bench/metrics_cost.py build zoo/mnist1d-10k.toml --seeds 10   # a 1,000-run slice
    python bench/metrics_cost.py groups --width 128 --configs 10 --seeds 3  # per group

`families`: one trained checkpoint of a cohort of MNIST-1D MLPs (SGD, 200 steps), evaluated
family by family with the spec's defaults (`basic`: losses and accuracies on the full splits,
weight norm, distance from init; `statistics`, `spectra`: per tensor; `hessian`: subsample 512,
the top eigenvalue by block LOBPCG (tolerance 1e-3) and 10 Hutchinson probes;
`neural_collapse`: subsample 2048). Each family is timed `--repeats` times in turn (round robin)
and the median kept; prints seconds per checkpoint for the cohort and the ratio to `basic`.

`build`: builds the spec into fresh temporary stores with `[metrics]` set to each of `--variants`
(first `before`: the defaults before per-tensor metrics existed; see --help), each `--repeats`
times in turn, the median kept; prints wall seconds, metric rows and the ratios to `before`.

`groups`: builds `--configs` MNIST-1D MLP configs (learning rates) x `--seeds` seeds (SGD, 3,000
steps) into a temporary store once, then computes the group families on it, each `--repeats`
times in turn into fresh copies of the store, the median kept: `groups` (straight-line barriers,
mode connectivity, CKA, disagreement: the spec's defaults) and `curve` (a trained Bezier curve per
pair: the spec's defaults, `--curve-steps` steps); prints seconds per group and the ratio to
`groups`.

The last line of every mode is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from dlstore.building.build import build_zoo
from dlstore.building.plan import cohort_plan, plan_cohorts
from dlstore.metrics.curve_groups import compute_curve_metrics
from dlstore.metrics.families import (
    CollapseOptions,
    CurveOptions,
    GroupOptions,
    HessianOptions,
    MetricsOptions,
)
from dlstore.metrics.groups import compute_group_metrics
from dlstore.spec import ZooSpec
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter
from dlstore.training.cohort import CohortTrainer

FAMILIES = ("basic", "statistics", "spectra", "hessian", "neural_collapse")


def families(args) -> dict:
    text = textwrap.dedent(f"""
        name = "bench"
        seeds = {args.members}
        checkpoints = [0, 200]
        [dataset]
        name = "mnist1d"
        [model]
        arch = "mlp"
        width = {args.width}
        depth = {args.depth}
        [train]
        lr = 0.05
        steps = 200
        [metrics]
        hessian = true
        neural_collapse = true
    """)
    spec = ZooSpec.from_text(text)
    (runs, datas), = plan_cohorts(list(spec.runs), args.members, metrics=spec.metrics)
    plan = cohort_plan(runs, datas, spec.metrics)
    trainer = CohortTrainer(plan, args.device)
    checkpoint = list(trainer.run())[-1]
    evaluator = checkpoint.evaluator
    every = {f: {200} for f in FAMILIES}
    times: dict[str, list[float]] = {f: [] for f in FAMILIES}
    for _ in range(args.repeats):
        for family in FAMILIES:
            evaluator.steps = {family: every[family]}
            started = time.perf_counter()
            evaluator(checkpoint.params, 200)
            times[family].append(time.perf_counter() - started)
    median = {f: statistics.median(t) for f, t in times.items()}
    print(f"cohort of {args.members} MLPs (width {args.width}, depth {args.depth}) on "
          f"{trainer.device}, one checkpoint:")
    for family, seconds in median.items():
        print(f"  {family:16s} {seconds:8.3f} s   {seconds / median['basic']:7.2f} x basic")
    return {"mode": "families", "members": args.members, "width": args.width,
            "depth": args.depth, "seconds": median,
            "ratio_to_basic": {f: s / median["basic"] for f, s in median.items()}}


def build(args) -> dict:
    text = Path(args.spec).read_text()
    if args.seeds is not None:
        text = re.sub(r"(?m)^seeds\s*=.*$", f"seeds = {args.seeds}", text)
    spec = ZooSpec.from_text(text)
    known = {
        "before": MetricsOptions(statistics=None, spectra=None),
        "defaults": MetricsOptions(),
        "all": MetricsOptions(statistics="all", spectra="all"),
        "statistics": MetricsOptions(statistics="all", spectra=None),
        "last": MetricsOptions(statistics="last", spectra="last"),
        "costly": MetricsOptions(hessian=HessianOptions(), neural_collapse=CollapseOptions(),
                                 groups=GroupOptions()),
    }
    names = args.variants.split(",")
    unknown = [n for n in names if n not in known]
    if unknown or names[0] != "before":
        raise SystemExit(f"--variants: start with before, then any of {list(known)}")
    variants = {name: known[name] for name in names}
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # round robin, so that load from other jobs hits all alike
        for name, metrics in variants.items():
            with tempfile.TemporaryDirectory() as tmp:
                store = Store(Path(tmp) / "s", create=True)
                started = time.perf_counter()
                report = build_zoo(dataclasses.replace(spec, metrics=metrics), store,
                                   device=args.device)
                seconds = time.perf_counter() - started
                rows = int(store.sql("SELECT count(*) AS n FROM _metrics")["n"][0])
            runs[name].append((seconds, report.train_seconds, rows))
    results = {}
    for name, measured in runs.items():
        seconds = statistics.median(m[0] for m in measured)
        train = statistics.median(m[1] for m in measured)
        results[name] = {"seconds": seconds, "train_seconds": train,
                         "metric_rows": measured[0][2]}
        print(f"{name:9s} {seconds:8.1f} s wall ({train:.1f} s training), "
              f"{measured[0][2]:,} metric rows, {seconds / results['before']['seconds']:.2f} x "
              "before")
    return {"mode": "build", "spec": args.spec, "runs": len(spec.runs), "results": results}


def groups(args) -> dict:
    lrs = [round(0.01 * 1.5 ** i, 5) for i in range(args.configs)]
    spec = ZooSpec.from_text(textwrap.dedent(f"""
        name = "bench"
        seeds = {args.seeds}
        checkpoints = [0, 3000]
        [dataset]
        name = "mnist1d"
        [model]
        arch = "mlp"
        width = {args.width}
        depth = 2
        [train]
        momentum = 0.9
        steps = 3000
        [grid]
        train.lr = {lrs}
        [metrics]
        statistics = false
        spectra = false
    """))
    families = {"groups": lambda writer: compute_group_metrics(
                    writer, "bench", GroupOptions(), device=args.device),
                "curve": lambda writer: compute_curve_metrics(
                    writer, "bench", CurveOptions(steps=args.curve_steps), device=args.device)}
    times: dict[str, list[float]] = {f: [] for f in families}
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / "built"
        build_zoo(spec, Store(built, create=True), device=args.device)
        for _ in range(args.repeats):
            for family, compute in families.items():
                copy = Path(tmp) / family
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(built, copy)
                writer = StoreWriter(Store(copy))
                started = time.perf_counter()
                n_groups = compute(writer)
                times[family].append((time.perf_counter() - started) / n_groups)
    median = {f: statistics.median(t) for f, t in times.items()}
    print(f"{args.configs} groups of {args.seeds} MLPs (width {args.width}, depth 2, "
          f"{args.seeds * (args.seeds - 1) // 2} pairs each) on {args.device}, per group:")
    for family, seconds in median.items():
        print(f"  {family:8s} {seconds:8.3f} s   {seconds / median['groups']:7.2f} x groups")
    return {"mode": "groups", "configs": args.configs, "seeds": args.seeds,
            "width": args.width, "curve_steps": args.curve_steps,
            "seconds_per_group": median,
            "ratio_to_groups": {f: s / median["groups"] for f, s in median.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    fam = sub.add_parser("families")
    fam.add_argument("--width", type=int, default=32)
    fam.add_argument("--depth", type=int, default=2)
    fam.add_argument("--members", type=int, default=256)
    fam.add_argument("--repeats", type=int, default=3)
    fam.add_argument("--device", default="cpu")
    bld = sub.add_parser("build")
    bld.add_argument("spec")
    bld.add_argument("--seeds", type=int, default=None, help="override the spec's seeds")
    bld.add_argument("--variants", default="before,defaults",
                     help="comma-separated, first 'before': before (no per-tensor metrics), "
                     "defaults, all (statistics and spectra at every checkpoint), statistics "
                     "(statistics only, every checkpoint), last (both at the last checkpoint), "
                     "costly (defaults + Hessian, collapse, groups)")
    bld.add_argument("--repeats", type=int, default=1, help="builds of each variant (median)")
    bld.add_argument("--device", default="cpu")
    grp = sub.add_parser("groups")
    grp.add_argument("--width", type=int, default=128)
    grp.add_argument("--configs", type=int, default=10)
    grp.add_argument("--seeds", type=int, default=3)
    grp.add_argument("--curve-steps", type=int, default=CurveOptions().steps)
    grp.add_argument("--repeats", type=int, default=3)
    grp.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    modes = {"families": families, "build": build, "groups": groups}
    print(json.dumps(modes[args.mode](args)))


if __name__ == "__main__":
    main()
