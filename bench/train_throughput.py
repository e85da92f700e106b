"""Cohort trainer vs the sequential reference loop, on the same work, in one run.

    python bench/train_throughput.py --width 32 --members 1024          # ~2.7k-parameter MLP
    python bench/train_throughput.py --width 128 --members 512          # ~23k
    python bench/train_throughput.py --arch cnn1d --width 16 --members 256
    python bench/train_throughput.py --device cuda --members 10000

Both sides train MNIST-1D-shaped networks with SGD + momentum, data already on the device: the
sequential side is one `nn.Module` and one `torch.optim` optimizer per member, stepped one after
another (`dlstore.zoo.reference`); the cohort side is `CohortTrainer`. The sequential rate is
measured on `--seq-members` members (its cost is linear in members). Prints model-steps per second
of both, the ratio, achieved GFLOP/s (3 x the forward FLOPs torch counts, per example) against the
device's own measured matmul peak, and peak memory; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import textwrap
import time

import torch

from dlstore.building.plan import cohort_plan, plan_cohorts
from dlstore.spec import ZooSpec
from dlstore.training.cohort import CohortTrainer
from dlstore.training.device import resolve_device
from dlstore.training.reference import train_reference


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def forward_flops(plan) -> int:
    """FLOPs of one example's forward pass, counted by torch (convolutions included)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = plan.arch.build(plan.input_shape, plan.n_classes)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros((1, *plan.input_shape)))
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spec_for(args, members: int) -> ZooSpec:
    return ZooSpec.from_text(textwrap.dedent(f"""
        name = "bench"
        seeds = {members}
        checkpoints = [0]
        [dataset]
        name = "mnist1d"
        [model]
        arch = "{args.arch}"
        width = {args.width}
        depth = {args.depth}
        [train]
        lr = 0.01
        momentum = 0.9
        batch_size = {args.batch}
        steps = {args.steps}
    """))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mlp", choices=["mlp", "cnn1d"])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--members", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-members", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)

    runs, datas = plan_cohorts(list(spec_for(args, args.members).runs),
                               cohort_size=args.members)[0]
    plan = cohort_plan(runs, datas)
    n_params = sum(v.numel() for v in plan.members[0].init.values())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = CohortTrainer(plan, device)
    for _ in trainer.run():
        pass
    pop_rate = args.members * args.steps / trainer.train_seconds

    seq_runs = runs[:args.seq_members]
    train_reference(seq_runs[0], datas[0], device=device)  # warm-up: first calls are slow
    started = time.perf_counter()
    for run, data in zip(seq_runs, datas):
        train_reference(run, data, device=device)
    _sync(device)
    seq_rate = len(seq_runs) * args.steps / (time.perf_counter() - started)

    flops_per_model_step = 3 * args.batch * forward_flops(plan)  # backward ~ 2x forward
    peak = matmul_peak(device)
    memory_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "arch": args.arch, "members": args.members, "params": n_params, "batch": args.batch,
        "seq_steps_per_s": round(seq_rate, 1), "pop_steps_per_s": round(pop_rate, 1),
        "speedup": round(pop_rate / seq_rate, 2),
        "gflops": round(pop_rate * flops_per_model_step / 1e9, 1),
        "peak_gflops": round(peak, 1),
        "peak_memory_mb": round(memory_mb, 1),
    }
    print(f"{args.arch} {n_params} params, batch {args.batch}, {args.members} members, "
          f"{args.steps} steps on {result['device']}")
    print(f"  sequential loop : {seq_rate:12,.0f} model-steps/s")
    print(f"  cohort trainer  : {pop_rate:12,.0f} model-steps/s   ({result['speedup']}x)")
    print(f"  achieved        : {result['gflops']:12,.1f} GFLOP/s of a measured matmul peak of "
          f"{peak:,.1f} ({result['gflops'] / peak:.0%})")
    print(f"  peak memory     : {memory_mb:12,.0f} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
