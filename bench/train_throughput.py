"""Cohort trainer vs the sequential reference loop, on the same work, in one run.

    python bench/train_throughput.py --width 32 --members 1024          # ~2.7k-parameter MLP
    python bench/train_throughput.py --width 128 --members 512          # ~23k
    python bench/train_throughput.py --arch cnn1d --width 16 --members 256
    python bench/train_throughput.py --arch cnn1d --kernel fast --threads 1
    python bench/train_throughput.py --arch cnn2d --members 256            # 4,970 params, mnist
    python bench/train_throughput.py --arch cnn2d --resize 14 --batch 32   # small-cnn-zoo.toml
    python bench/train_throughput.py --arch resnet --stages 2 --members 32
    python bench/train_throughput.py --device cuda --members 10000
    python bench/train_throughput.py --arch transformer --width 64 --depth 1 --members 32 \
        --batch 32 --steps 30 --seq-members 4 --threads 1 --repeats 3   # ~54k, Markov sequences

Both sides train with SGD + momentum, data already on the device (`--dataset`: MNIST-1D for mlp and
cnn1d, the 28x28x1 `mnist` digits for cnn2d and resnet, sequences of 32 tokens of the `markov`
language (V = 16, heads of 16 units) for the transformer; `--width`, `--depth`, `--stages`: the
architecture's own defaults where not given, but width 32 and depth 2 for mlp and cnn1d): the
sequential side is one `nn.Module` and one `torch.optim` optimizer per member, stepped one after
another (`dlstore.training.reference`); the cohort side is `CohortTrainer`, once with each kernel
`--kernel` names (`fast`: the one the architecture declares, `Architecture.cohort_kernel`;
`vmap`: the generic `VmapKernel`; by default both, in one run). The sequential rate is measured on
`--seq-members` members (its cost is linear in members). `--repeats N` measures N rounds of every
side in turn and reports medians, and the range of the ratios per round. Prints model-steps per
second of each, the ratios, achieved GFLOP/s (3 x the forward FLOPs torch counts, per example)
against the device's own measured matmul peak, and peak memory; the last line is JSON
(`pop_steps_per_s`, `speedup`, `gflops`: the first kernel named; `<kernel>_steps_per_s` etc.:
each).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
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


def cohort_rate(plan, device: torch.device, kernel: str) -> tuple[float, str]:
    """Model-steps per second of the cohort trainer with `kernel`, its first step left out
    (first calls are slow; the sequential side is warmed up too), and the kernel's class."""
    first_step = {}
    trainer = CohortTrainer(plan, device, on_step=lambda t: first_step.setdefault(
        "seconds", trainer.train_seconds))
    if kernel == "vmap":
        trainer.kernel = VmapKernel(plan.arch, plan.input_shape, plan.n_classes)
    for _ in trainer.run():
        pass
    steps = plan.total_steps - plan.start_step - 1
    return (len(plan.members) * steps / (trainer.train_seconds - first_step["seconds"]),
            type(trainer.kernel).__name__)


# what the bench trains where a flag is not given: MNIST-1D and the MLP / 1-D CNN rows README
# has always measured; the image networks on real 28x28 digits at their own default sizes
DEFAULTS = {"mlp": {"dataset": "mnist1d", "width": 32, "depth": 2},
            "cnn1d": {"dataset": "mnist1d", "width": 32, "depth": 2},
            "cnn2d": {"dataset": "mnist"},
            "resnet": {"dataset": "mnist"},
            "transformer": {"dataset": "markov", "width": 32, "depth": 2,
                            "dataset_options": "seq_len = 32", "model": ["head_dim = 16"]}}


def spec_for(args, members: int) -> ZooSpec:
    defaults = DEFAULTS[args.arch]
    model = "\n".join([f"{field} = {value}" for field in ("width", "depth", "stages")
                        if (value := getattr(args, field, None) or defaults.get(field))]
                       + defaults.get("model", []))
    return ZooSpec.from_text(textwrap.dedent(f"""
        name = "bench"
        seeds = {members}
        checkpoints = [0]
        [dataset]
        name = "{args.dataset or defaults['dataset']}"
        {f"resize = {args.resize}" if args.resize else ""}
        {defaults.get("dataset_options", "")}
        [model]
        arch = "{args.arch}"
    """) + model + textwrap.dedent(f"""
        [train]
        lr = 0.01
        momentum = 0.9
        batch_size = {args.batch}
        steps = {args.steps}
    """))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mlp", choices=list(DEFAULTS))
    parser.add_argument("--dataset", default=None,
                        help="mnist1d, mnist or markov (default: by arch)")
    parser.add_argument("--resize", type=int, default=None,
                        help="side of mnist's images (zoo/small-cnn-zoo.toml: 14)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None, help="mlp, cnn1d, cnn2d, transformer")
    parser.add_argument("--stages", type=int, default=None, help="resnet")
    parser.add_argument("--members", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="at least 2")
    parser.add_argument("--seq-members", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every side in turn (medians, ratios per round)")
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
    seq_runs = runs[:args.seq_members]
    train_reference(seq_runs[0], datas[0], device=device)  # warm-up: first calls are slow
    # rounds of every side in turn, each reported as its median and the ratios per round:
    # on a shared machine the load drifts within a run, and a ratio of the same round holds
    rounds = []
    for _ in range(args.repeats):
        measured = {kernel: cohort_rate(plan, device, kernel) for kernel in kernels}
        started = time.perf_counter()
        for run, data in zip(seq_runs, datas):
            train_reference(run, data, device=device)
        _sync(device)
        seq = len(seq_runs) * args.steps / (time.perf_counter() - started)
        rounds.append((measured, seq, matmul_peak(device)))
    seq_rate = statistics.median(seq for _, seq, _ in rounds)
    peak = statistics.median(peak for _, _, peak in rounds)
    pop_rates = {kernel: statistics.median(m[kernel][0] for m, _, _ in rounds)
                 for kernel in kernels}
    ratios = {kernel: sorted(m[kernel][0] / seq for m, seq, _ in rounds) for kernel in kernels}
    classes = {kernel: rounds[0][0][kernel][1] for kernel in kernels}

    flops_per_model_step = 3 * args.batch * forward_flops(plan)  # backward ~ 2x forward
    memory_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "arch": args.arch, "members": args.members, "params": n_params, "batch": args.batch,
        "threads": torch.get_num_threads(), "seq_steps_per_s": round(seq_rate, 1),
    }
    for i, (kernel, rate) in enumerate(pop_rates.items()):
        row = {"class": classes[kernel], "steps_per_s": round(rate, 1),
               "speedup": round(statistics.median(ratios[kernel]), 2),
               "speedup_range": [round(ratios[kernel][0], 2), round(ratios[kernel][-1], 2)],
               "gflops": round(rate * flops_per_model_step / 1e9, 1)}
        if i == 0:
            result.update({"kernel": kernel, "pop_steps_per_s": row["steps_per_s"],
                           "speedup": row["speedup"], "gflops": row["gflops"]})
        result.update({f"{kernel}_{k}": v for k, v in row.items()})
    result.update({"peak_gflops": round(peak, 1), "peak_memory_mb": round(memory_mb, 1)})
    print(f"{args.arch} {n_params} params, batch {args.batch}, {args.members} members, "
          f"{args.steps} steps on {result['device']}, {result['threads']} threads, "
          f"medians of {args.repeats} rounds")
    print(f"  sequential loop : {seq_rate:12,.0f} model-steps/s")
    for kernel, rate in pop_rates.items():
        gflops = result[f"{kernel}_gflops"]
        print(f"  cohort ({kernel:4s})   : {rate:12,.0f} model-steps/s   "
              f"({result[f'{kernel}_speedup']}x, rounds {ratios[kernel][0]:.2f}-"
              f"{ratios[kernel][-1]:.2f}x), {gflops:,.1f} GFLOP/s of a measured matmul "
              f"peak of {peak:,.1f} ({gflops / peak:.0%}), {classes[kernel]}")
    print(f"  peak memory     : {memory_mb:12,.0f} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
