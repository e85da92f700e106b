"""What a spec may ask of the machine, checked before a build allocates anything or creates a
store, and rough estimates of what a build will cost (`build-zoo --dry-run`).

A spec that would exhaust memory (a width, depth, kernel, input dimension, class count or sample
count too large) or never end (`epochs = 1e12`, a checkpoint at every one of 10^9 steps) is a
one-line SpecError stating the estimate, instead of minutes of swapping or an endless loop.
Sizes come from the options alone (`Architecture.size`, `Dataset.shape`): nothing is built
or generated to find out that it is too large.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from dlstore.architectures.base import Architecture, SizeEstimate
from dlstore.datasets.base import DatasetTensors, DataShape, clean_split
from dlstore.errors import SpecError
from dlstore.spec import RunConfig, parse_checkpoints
from dlstore.training.device import member_memory

# A run of 10^9 steps would train for days even at the fastest measured rate (28k model-steps/s
# for a whole cohort of 2.7k-parameter MLPs on the project's CPU).
MAX_STEPS = 10**9
# Every checkpoint is a shard write and an evaluation of both splits; the recipes save 3-646.
MAX_CHECKPOINTS = 10_000

# Rates of the README's benchmark table (2-core AVX-512 CPU): the MLP kernel reached 57-98
# GFLOP/s, the generic vmap path (cnn1d) 11. A GPU figure was never measured here: a guess.
FLOPS = {("cpu", "mlp"): 60e9, ("cpu", "other"): 11e9, ("cuda", "mlp"): 2e12,
         ("cuda", "other"): 5e11}
# the 10k-run build spent 35% of its time outside training steps (evaluation, shard writes)
OVERHEAD = 1.5
# a cohort step's fixed cost (kernel launches, the Python loop), what small networks pay most
STEP_SECONDS = 1e-3
# metric rows per checkpoint: 6 whole-model metrics plus about 10 per tensor (statistics,
# spectra); each row about 16 bytes of compressed Parquet
METRIC_ROWS_FIXED, METRIC_ROWS_PER_TENSOR, METRIC_ROW_BYTES = 6, 10, 16


def machine_memory() -> int:
    """Physical RAM: what a build can have at most (free memory moves, so a check against it
    would refuse specs that fit once caches are dropped)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def data_shape(run: RunConfig) -> DataShape:
    """The run's dataset's sizes, from its options when the dataset knows them, else from
    generating it (a dataset registered without `shape`)."""
    shape = run.dataset.shape()
    if shape is not None:
        return shape
    split: DatasetTensors = clean_split(run.dataset)
    n = split.x_train.shape[0] + split.x_test.shape[0]
    return DataShape(n, split.input_shape, split.n_classes)


def network_size(run: RunConfig, shape: DataShape) -> SizeEstimate:
    return run.model.size(shape.input_shape, shape.n_classes)


def check_memory(runs: list[RunConfig], cohort_size: int | str, device: torch.device,
                 ram: int | None = None) -> None:
    """SpecError if generating a run's dataset, or training one cohort member (`cohort_size`
    members when it is a number), needs more memory than the machine has (GPU memory too when
    training on a GPU)."""
    ram = machine_memory() if ram is None else ram
    gpu = (torch.cuda.get_device_properties(device).total_memory
           if device.type == "cuda" else None)
    seen_data, seen_nets = set(), set()
    for run in runs:  # runs of a grid point share their options objects: cheap to skip
        if (run.dataset, run.model, run.train.batch_size) in seen_nets:
            continue
        seen_nets.add((run.dataset, run.model, run.train.batch_size))
        shape = data_shape(run)
        data = shape.generation_bytes
        if run.dataset not in seen_data:
            seen_data.add(run.dataset)
            if data > ram:
                raise SpecError(
                    f"dataset {run.dataset.name}: {shape.n_examples:,} examples of "
                    f"{math.prod(shape.input_shape):,} numbers need ~{human_bytes(data)} to "
                    f"generate, more than the {human_bytes(ram)} this machine has")
        size = network_size(run, shape)
        members = 1 if cohort_size == "auto" else min(cohort_size, len(runs))
        need = members * member_memory(size.params, size.activations, run.train.batch_size)
        on_device = need + 4 * shape.n_examples * math.prod(shape.input_shape)
        have, where = (gpu, "GPU") if gpu is not None else (ram, "machine")
        data_there = on_device - need + (0 if gpu is not None else data)
        if need + data_there > have:
            who = ("one member" if members == 1
                   else f"a cohort of {members} members (build.cohort_size)")
            raise SpecError(
                f"model {_describe(run)}: {size.params:,} parameters and "
                f"{size.activations:,} activations per example; {who} needs "
                f"~{human_bytes(need)} (parameters, gradients, optimizer state and a batch of "
                f"{run.train.batch_size} activations) and the data ~{human_bytes(data_there)}, "
                f"more than the {human_bytes(have)} this {where} has")


def check_length(run: RunConfig, n_train: int) -> int:
    """SpecError if the run would take more than MAX_STEPS steps or save more than
    MAX_CHECKPOINTS checkpoints; else its step count."""
    t = run.train
    total = t.total_steps(n_train)
    if total > MAX_STEPS:
        how = (f"{t.epochs:,} epochs of {t.steps_per_epoch(n_train):,} batches"
               if t.steps is None else "train.steps")
        raise SpecError(f"train: run {run.run_id} would take {total:,} optimizer steps ({how}), "
                        f"more than the {MAX_STEPS:,} a run may take: it would never end")
    n = checkpoint_count(run.checkpoints, total)
    if n > MAX_CHECKPOINTS:
        raise SpecError(f"checkpoints: {_value(run.checkpoints)} saves {n:,} checkpoints of the "
                        f"{total:,} steps of run {run.run_id}, more than the "
                        f"{MAX_CHECKPOINTS:,} a run may save")
    return total


def checkpoint_count(value: str | tuple[int, ...], total_steps: int) -> int:
    """How many checkpoints `value` gives a run of `total_steps` steps (at most), computed
    without listing them."""
    parsed = parse_checkpoints(list(value) if isinstance(value, tuple) else value)
    if isinstance(parsed, list):
        return len(parsed)
    kind, k = parsed
    if kind == "every":  # 0, k, 2k, ... and the last step
        return total_steps // k + 1 + (total_steps % k != 0)
    return min(k, total_steps + 1)


@dataclass
class Estimate:
    seconds: float
    bytes: int
    checkpoints: int


def estimate_cohorts(cohorts: list[tuple[list[RunConfig], list[DatasetTensors]]],
                     device: torch.device) -> Estimate:
    """Rough training time and stored bytes of planned cohorts: forward and backward cost (3x
    the forward's multiply-adds, 2 FLOPs each) of every member's steps at the benchmark's rate,
    plus evaluation and writing, plus a fixed cost per cohort step; float32 weights of every
    checkpoint plus its metric rows."""
    seconds, stored, n_checkpoints = 0.0, 0, 0
    for runs, datas in cohorts:
        seconds += STEP_SECONDS * (runs[0].train.total_steps(datas[0].x_train.shape[0])
                                   - runs[0].start_step)
        for run, data in zip(runs, datas):
            shape = DataShape(data.x_train.shape[0], data.input_shape, data.n_classes)
            size = network_size(run, shape)
            total = run.train.total_steps(data.x_train.shape[0])
            # the benchmark measured the mlp's declared fast kernel and the generic vmap one
            fast = type(run.model).cohort_kernel is not Architecture.cohort_kernel
            rate = FLOPS[(device.type if device.type == "cuda" else "cpu",
                          "mlp" if fast else "other")]
            seconds += (OVERHEAD * 6 * size.macs * run.train.batch_size
                        * (total - run.start_step) / rate)
            n = checkpoint_count(run.checkpoints, total)
            n_tensors = 2 * ((run.model.depth or 0) + 1)  # a weight and a bias per layer
            rows = METRIC_ROWS_FIXED + METRIC_ROWS_PER_TENSOR * n_tensors
            stored += n * (4 * size.params + rows * METRIC_ROW_BYTES)
            n_checkpoints += n
    return Estimate(seconds, stored, n_checkpoints)


def _describe(run: RunConfig) -> str:
    m = run.model
    extra = f", kernel {m.kernel:,}" if hasattr(m, "kernel") else ""
    if m.width is None or m.depth is None:  # a plugin architecture without these notions
        return f"{m.arch} on {run.dataset.name}"
    return f"{m.arch} width {m.width:,}, depth {m.depth:,}{extra} on {run.dataset.name}"


def _value(value: str | tuple[int, ...]) -> str:
    return repr(value) if isinstance(value, str) else f"a list of {len(value)} steps"
