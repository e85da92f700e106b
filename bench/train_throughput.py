"""Cohort trainer vs the sequential reference loop, on the same work, in one run.

    python bench/train_throughput.py --width 32 --members 1024          # ~2.7k-parameter MLP
    python bench/train_throughput.py --width 128 --members 512          # ~23k
    python bench/train_throughput.py --arch cnn1d --width 16 --members 256
    python bench/train_throughput.py --arch cnn1d --kernel fast --threads 1
    python bench/train_throughput.py --device cuda --members 10000
    python bench/train_throughput.py --arch transformer --width 64 --depth 1 --members 32 \
        --batch 32 --steps 30 --seq-members 4 --kernel vmap          # ~54k, Markov sequences

Both sides train MNIST-1D-shaped networks (the transformer: sequences of 32 tokens of the
`markov` language, V = 16, heads of 16 units) with SGD + momentum, data already on the device: the
sequential side is one `nn.Module` and one `torch.optim` optimizer per member, stepped one after
another (`dlstore.training.reference`); the cohort side is `CohortTrainer`, once with each kernel
`--kernel` names (`fast`: the one the architecture declares, `Architecture.cohort_kernel`;
`vmap`: the generic `VmapKernel`; by default both, in one run). The sequential rate is measured on
`--seq-members` members (its cost is linear in members). Prints model-steps per second of each,
the ratios, achieved GFLOP/s (3 x the forward FLOPs torch counts, per example) against the
device's own measured matmul peak, and peak memory; the last line is JSON (`pop_steps_per_s`,
`speedup`, `gflops`: the first kernel named; `<kernel>_steps_per_s` etc.: each).
"""

from __future__ import annotations

import argparse
import json
import resource
import textwrap
import time

import torch

from dlstore.architectures.kernels import VmapKernel
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


def cohort_rate(plan, device: torch.device, kernel: str) -> float:
    """Model-steps per second of the cohort trainer with `kernel`, its first step left out:
    first calls are slow (the sequential side is warmed up too)."""
    first_step = {}
    trainer = CohortTrainer(plan, device, on_step=lambda t: first_step.setdefault(
        "seconds", trainer.train_seconds))
    if kernel == "vmap":
        trainer.kernel = VmapKernel(plan.arch, plan.input_shape, plan.n_classes)
    for _ in trainer.run():
        pass
    steps = plan.total_steps - plan.start_step - 1
    return len(plan.members) * steps / (trainer.train_seconds - first_step["seconds"])


def spec_for(args, members: int) -> ZooSpec:
    dataset, model = 'name = "mnist1d"', ""
    if args.arch == "transformer":
        dataset, model = 'name = "markov"\nseq_len = 32', "head_dim = 16"
    return ZooSpec.from_text(textwrap.dedent(f"""
        name = "bench"
        seeds = {members}
        checkpoints = [0]
        [dataset]
        {dataset}
        [model]
        arch = "{args.arch}"
        width = {args.width}
        depth = {args.depth}
        {model}
        [train]
        lr = 0.01
        momentum = 0.9
        batch_size = {args.batch}
        steps = {args.steps}
    """))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mlp", choices=["mlp", "cnn1d", "transformer"])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--members", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="at least 2")
    parser.add_argument("--seq-members", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--kernel", default="fast,vmap",
                        help="cohort kernels to measure, comma-separated: fast (the "
                        "architecture's declared one), vmap (the generic one)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads for both sides (0: torch's default)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = args.kernel.split(",")
    if not kernels or set(kernels) - {"fast", "vmap"}:
        parser.error(f"--kernel: fast, vmap or both, not {args.kernel!r}")

    runs, datas = plan_cohorts(list(spec_for(args, args.members).runs),
                               cohort_size=args.members)[0]
    plan = cohort_plan(runs, datas)
    n_params = sum(v.numel() for v in plan.members[0].init.values())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pop_rates = {kernel: cohort_rate(plan, device, kernel) for kernel in kernels}

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
        "threads": torch.get_num_threads(), "seq_steps_per_s": round(seq_rate, 1),
    }
    for i, (kernel, rate) in enumerate(pop_rates.items()):
        row = {"steps_per_s": round(rate, 1), "speedup": round(rate / seq_rate, 2),
               "gflops": round(rate * flops_per_model_step / 1e9, 1)}
        if i == 0:
            result.update({"kernel": kernel, "pop_steps_per_s": row["steps_per_s"],
                           "speedup": row["speedup"], "gflops": row["gflops"]})
        result.update({f"{kernel}_{k}": v for k, v in row.items()})
    result.update({"peak_gflops": round(peak, 1), "peak_memory_mb": round(memory_mb, 1)})
    print(f"{args.arch} {n_params} params, batch {args.batch}, {args.members} members, "
          f"{args.steps} steps on {result['device']}, {result['threads']} threads")
    print(f"  sequential loop : {seq_rate:12,.0f} model-steps/s")
    for kernel, rate in pop_rates.items():
        gflops = result[f"{kernel}_gflops"]
        print(f"  cohort ({kernel:4s})   : {rate:12,.0f} model-steps/s   "
              f"({result[f'{kernel}_speedup']}x), {gflops:,.1f} GFLOP/s of a measured matmul "
              f"peak of {peak:,.1f} ({gflops / peak:.0%})")
    print(f"  peak memory     : {memory_mb:12,.0f} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
