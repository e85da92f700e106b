"""What a cohort trains: its members (config, start weights, mask, data sizes) and the shared
settings (steps, checkpoints, input shape). Built by `dlstore.building.plan`, read by the
trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dlstore.architectures.base import Architecture
from dlstore.metrics.families import MetricsOptions
from dlstore.stacks import Params


@dataclass
class MemberPlan:
    """One run as the trainer sees it: its start, its data and its optimizer settings."""

    run_id: str
    init: Params
    y_train: torch.Tensor  # [n_train] labels this run trains on (label noise applied)
    order_seed: int
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    mask: dict[str, torch.Tensor] | None = None  # pruning mask (bool, True = kept), by tensor

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])


@dataclass
class CohortPlan:
    """Runs that share an architecture family, a dataset, an optimizer kind, a batch size and a
    number of steps: everything that has to be equal for them to step together. `arch` is the
    widest member's architecture; members' `init` tensors carry their own (possibly smaller)
    shapes."""

    arch: Architecture
    input_shape: tuple[int, ...]
    n_classes: int
    optimizer: str  # "sgd" | "adam" | "adamw"
    schedule: str
    batch_size: int
    total_steps: int
    checkpoint_steps: list[int]
    x_train: torch.Tensor  # [N, ...] shared inputs; member i uses the first n_train rows
    x_test: torch.Tensor
    y_test: torch.Tensor
    members: list[MemberPlan] = field(default_factory=list)
    start_step: int = 0  # rewound tickets resume the schedule and data order here
    metrics: MetricsOptions = field(default_factory=MetricsOptions)
    entropy_rate: float | None = None  # of a sequence task's source, where known (excess loss)
