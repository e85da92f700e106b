"""Curve mode connectivity of a built zoo's groups under other curve settings, computed side by
side from the stored weights and written nowhere (the store keeps what its spec recorded).

    python bench/curve_budget.py --store /tmp/s --zoo phases-curve --cells 0.03:4000,0.1:1000 \
        --settings steps=2000,lr=0.01 --settings steps=8000,lr=0.05

`--cells` picks groups by lr:n_train (all groups if omitted); each `--settings` is a set of
`[metrics] curve` options. Prints, per cell and setting, the curve mc of the train error, the
train-loss barrier along the curve and the seconds each setting took (all its pairs in one
stack); the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dlstore.metrics.curve_groups import curve_metrics_of
from dlstore.metrics.families import CurveOptions
from dlstore.metrics.groups import find_groups, group_steps
from dlstore.store.store import Store


def _cell(group) -> tuple[float, int | None]:
    config = json.loads(group.key)
    return config["train"]["lr"], config["dataset"].get("n_train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--zoo", required=True)
    parser.add_argument("--cells", default=None, help="lr:n_train,... (default: every group)")
    parser.add_argument("--settings", action="append", required=True,
                        help="key=value,... of [metrics] curve options; repeatable")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    groups = find_groups(Store(args.store), args.zoo)
    if args.cells:
        wanted = {(float(lr), int(n)) for lr, n in (c.split(":") for c in args.cells.split(","))}
        groups = [g for g in groups if _cell(g) in wanted]
    store = Store(args.store)
    results = []
    for text in args.settings:
        options = CurveOptions.model_validate(
            {k: json.loads(v) for k, v in (item.split("=") for item in text.split(","))})
        batch = [(g, group_steps(store, g, options)[-1]) for g in groups]
        started = time.perf_counter()
        values = curve_metrics_of(store, batch, options, torch.device(args.device))
        seconds = time.perf_counter() - started
        for (group, step), v in zip(batch, values):
            row = {"settings": text, "cell": _cell(group), "step": step,
                   "curve_mode_connectivity": v["curve_mode_connectivity"],
                   "curve_train_loss_barrier": v["curve_train_loss_barrier"]}
            results.append(row)
            print(f"{text:24s} lr {row['cell'][0]:<6g} n_train {row['cell'][1]:<5} curve mc "
                  f"{row['curve_mode_connectivity']:+.4f}  train-loss barrier "
                  f"{row['curve_train_loss_barrier']:.3f}")
        print(f"{text}: {seconds:.1f} s for {len(batch)} groups")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
