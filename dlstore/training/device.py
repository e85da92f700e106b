"""The device a build trains on, and how many members fit in one cohort there.
"""

from __future__ import annotations

import os

import torch

from dlstore.errors import DlstoreError


def resolve_device(device: str) -> torch.device:
    """"auto" = cuda when available, else cpu; asking for cuda without one is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DlstoreError(f"device {device!r} asked for, but torch sees no CUDA device "
                           f"(torch {torch.__version__}); use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DlstoreError(f"unknown device {device!r}; use auto, cpu or cuda") from None


# A CPU step is fastest when a cohort's activations stay in cache: measured on a 2-core AVX-512
# machine, 32-256 members of a 2.7k-23k-parameter MLP ran 1.3-2x faster per model-step than 512-
# 1024 (bench/train_throughput.py --members). A GPU wants every member it can hold.
CPU_ACTIVATION_BUDGET = 8 * 2**20


CPU_MAX_COHORT = 1024


GPU_MEMORY_FRACTION = 0.4


GPU_MAX_COHORT = 65536


def member_memory(n_params: int, activation_units: int, batch_size: int) -> int:
    """Bytes one cohort member needs while training: float32 parameters, gradients, initial
    weights, two optimizer states and a mask (6 copies), and one batch's activations, their
    gradients and pre-activations (3 copies)."""
    return 4 * 6 * n_params + 4 * 3 * batch_size * activation_units


def auto_cohort_size(n_params: int, activation_units: int, batch_size: int,
                     device: torch.device) -> int:
    """Members per cohort for a network of `n_params` parameters and `activation_units` numbers
    of activations per example: from cache size on a CPU, from free memory on a GPU, and never
    more than half the free RAM."""
    step_bytes = 4 * 3 * batch_size * activation_units  # activations, their grads, pre-activations
    member_bytes = member_memory(n_params, activation_units, batch_size)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(max(1, min(GPU_MAX_COHORT, GPU_MEMORY_FRACTION * free // member_bytes)))
    free_ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    by_cache = CPU_ACTIVATION_BUDGET // step_bytes
    by_ram = free_ram // 2 // member_bytes
    return int(max(1, min(CPU_MAX_COHORT, max(16, by_cache), by_ram)))
