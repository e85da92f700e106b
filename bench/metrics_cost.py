"""What the checkpoint metrics cost, measured side by side in one run.

    python bench/metrics_cost.py families --width 32 --members 1024     # per checkpoint
    python bench/metrics_cost.py build zoo/quickstart.toml               # end to end
    python bench/metrics_cost.py build zoo/mnist1d-10k.toml --seeds 10   # a 1,000-run slice

`families`: one trained checkpoint of a cohort of MNIST-1D MLPs (SGD, 200 steps), evaluated
family by family with the spec's defaults (`basic`: losses and accuracies on the full splits,
weight norm, distance from init; `statistics`, `spectra`: per tensor; `hessian`: subsample 512,
power iteration and 10 Hutchinson probes; `neural_collapse`: subsample 2048). Each family is
timed `--repeats` times in turn (round robin) and the median kept; prints seconds per checkpoint
for the cohort and the ratio to `basic`.

`build`: builds the spec into fresh temporary stores with `[metrics]` set to (a) the defaults
before this change (no per-tensor metrics), (b) today's defaults (statistics and spectra at every
checkpoint), and, with `--costly`, (c) the defaults plus Hessian and neural collapse at the last
checkpoint and group metrics; prints wall seconds, metric rows and the ratios to (a). The last
line of either mode is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from dlstore.store.store import Store
from dlstore.zoo.builder import build_zoo, cohort_plan, plan_cohorts
from dlstore.zoo.population import CohortTrainer
from dlstore.zoo.spec import CollapseOptions, GroupOptions, HessianOptions, MetricsOptions, ZooSpec

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
    variants = {
        "before": MetricsOptions(statistics=None, spectra=None),
        "defaults": MetricsOptions(),
    }
    if args.costly:
        variants["costly"] = MetricsOptions(hessian=HessianOptions(),
                                            neural_collapse=CollapseOptions(),
                                            groups=GroupOptions())
    results = {}
    for name, metrics in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "s", create=True)
            started = time.perf_counter()
            report = build_zoo(dataclasses.replace(spec, metrics=metrics), store,
                               device=args.device)
            seconds = time.perf_counter() - started
            rows = store.sql("SELECT count(*) AS n FROM _metrics")["n"][0]
        results[name] = {"seconds": seconds, "train_seconds": report.train_seconds,
                         "metric_rows": int(rows)}
        print(f"{name:9s} {seconds:8.1f} s wall ({report.train_seconds:.1f} s training), "
              f"{rows:,} metric rows, {seconds / results['before']['seconds']:.2f} x before")
    return {"mode": "build", "spec": args.spec, "runs": len(spec.runs), "results": results}


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
    bld.add_argument("--costly", action="store_true")
    bld.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps(families(args) if args.mode == "families" else build(args)))


if __name__ == "__main__":
    main()
