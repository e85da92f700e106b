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
    parser.add_argument("--threads", default="0",
                        help="torch's CPU threads for both sides (0: torch's default); a "
                        "comma-separated list measures every side at each count in every "
                        "round, and adds each side at its best count against the other's")
    args = parser.parse_args()
    device = resolve_device(args.device)
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        thread_counts = [-1]
    if min(thread_counts) < 0:
        parser.error(f"--threads: whole numbers >= 0, comma-separated, not {args.threads!r}")
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
    default_threads = torch.get_num_threads()

    def use(threads: int) -> int:
        torch.set_num_threads(threads or default_threads)
        return torch.get_num_threads()

    use(thread_counts[0])
    train_reference(seq_runs[0], datas[0], device=device)  # warm-up: first calls are slow
    # rounds of every side (at every thread count) in turn, each reported as its median and
    # the ratios per round: on a shared machine the load drifts within a run, and a ratio of
    # the same round holds
    rounds = []  # per round: {threads: ({kernel: (rate, class)}, seq rate, peak)}
    for _ in range(args.repeats):
        this = {}
        for threads in thread_counts:
            use(threads)
            measured = {kernel: cohort_rate(plan, device, kernel) for kernel in kernels}
            started = time.perf_counter()
            for run, data in zip(seq_runs, datas):
                train_reference(run, data, device=device)
            _sync(device)
            seq = len(seq_runs) * args.steps / (time.perf_counter() - started)
            this[threads] = (measured, seq, matmul_peak(device))
        rounds.append(this)

    flops_per_model_step = 3 * args.batch * forward_flops(plan)  # backward ~ 2x forward
    memory_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    device_name = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{args.arch} {n_params} params, batch {args.batch}, {args.members} members, "
          f"{args.steps} steps on {device_name}, medians of {args.repeats} rounds")
    result = {"device": device_name, "arch": args.arch, "members": args.members,
              "params": n_params, "batch": args.batch, "by_threads": {}}
    for threads in thread_counts:
        row = _summary([r[threads] for r in rounds], kernels, flops_per_model_step)
        row["threads"] = use(threads)
        result["by_threads"][str(threads)] = row
        _report(row, kernels)
    if len(thread_counts) > 1:
        # each side at its best thread count in that round, against the other's best
        best_seq = [max(r[t][1] for t in thread_counts) for r in rounds]
        print("  best against best (each side at its fastest thread count):")
        result["best"] = {}
        for kernel in kernels:
            best = [max(r[t][0][kernel][0] for t in thread_counts) for r in rounds]
            ratios = sorted(b / s for b, s in zip(best, best_seq))
            result["best"][kernel] = {"steps_per_s": round(statistics.median(best), 1),
                                      "seq_steps_per_s": round(statistics.median(best_seq), 1),
                                      "speedup": round(statistics.median(ratios), 2),
                                      "speedup_range": [round(ratios[0], 2),
                                                        round(ratios[-1], 2)]}
            print(f"    cohort ({kernel:4s}) {statistics.median(best):,.0f} against the loop "
                  f"{statistics.median(best_seq):,.0f} model-steps/s: "
                  f"{statistics.median(ratios):.2f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x)")
    first = result["by_threads"][str(thread_counts[0])]
    result.update({k: first[k] for k in ("kernel", "pop_steps_per_s", "speedup", "gflops",
                                         "seq_steps_per_s", "threads")})
    result["peak_memory_mb"] = round(memory_mb, 1)
    print(f"  peak memory     : {memory_mb:12,.0f} MiB")
    print(json.dumps(result))


def _summary(rounds: list, kernels: list[str], flops_per_model_step: int) -> dict:
    """Medians over rounds of (measured, seq, peak) at one thread count."""
    seq_rate = statistics.median(seq for _, seq, _ in rounds)
    peak = statistics.median(peak for _, _, peak in rounds)
    row = {"seq_steps_per_s": round(seq_rate, 1), "peak_gflops": round(peak, 1)}
    for i, kernel in enumerate(kernels):
        rate = statistics.median(m[kernel][0] for m, _, _ in rounds)
        ratios = sorted(m[kernel][0] / seq for m, seq, _ in rounds)
        part = {"class": rounds[0][0][kernel][1], "steps_per_s": round(rate, 1),
                "speedup": round(statistics.median(ratios), 2),
                "speedup_range": [round(ratios[0], 2), round(ratios[-1], 2)],
                "gflops": round(rate * flops_per_model_step / 1e9, 1)}
        if i == 0:
            row.update({"kernel": kernel, "pop_steps_per_s": part["steps_per_s"],
                        "speedup": part["speedup"], "gflops": part["gflops"]})
        row.update({f"{kernel}_{k}": v for k, v in part.items()})
    return row


def _report(row: dict, kernels: list[str]) -> None:
    peak = row["peak_gflops"]
    print(f"  {row['threads']} thread{'s' if row['threads'] > 1 else ''}:")
    print(f"  sequential loop : {row['seq_steps_per_s']:12,.0f} model-steps/s")
    for kernel in kernels:
        gflops = row[f"{kernel}_gflops"]
        low, high = row[f"{kernel}_speedup_range"]
        print(f"  cohort ({kernel:4s})   : {row[f'{kernel}_steps_per_s']:12,.0f} model-steps/s   "
              f"({row[f'{kernel}_speedup']}x, rounds {low:.2f}-{high:.2f}x), {gflops:,.1f} "
              f"GFLOP/s of a measured matmul peak of {peak:,.1f} ({gflops / peak:.0%}), "
              f"{row[f'{kernel}_class']}")


if __name__ == "__main__":
    main()
