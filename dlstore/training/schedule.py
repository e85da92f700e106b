"""Data order and learning-rate schedule: defined once, shared by the cohort trainer and the
sequential reference loop, so that both see the same batches and the same learning rates."""

from __future__ import annotations

import math

import torch


class BatchOrder:
    """The batches one run draws: a fresh permutation of its `n_train` examples every epoch, from
    a generator of its own seeded with the run's order seed (never from its place in a cohort).
    Incomplete last batches are dropped, so every step has `batch_size` examples."""

    def __init__(self, order_seed: int, n_train: int, batch_size: int):
        if batch_size > n_train:
            raise ValueError(f"batch_size {batch_size} exceeds the {n_train} training examples")
        self.generator = torch.Generator().manual_seed(order_seed)
        self.n_train = n_train
        self.batch_size = batch_size
        self.steps_per_epoch = n_train // batch_size
        self._perm = torch.empty(0, dtype=torch.long)

    def epoch_permutation(self) -> torch.Tensor:
        """Advance to the next epoch and return its permutation."""
        self._perm = torch.randperm(self.n_train, generator=self.generator)
        return self._perm

    def skip_to(self, step: int) -> None:
        """Draw the permutations that steps 0..step-1 would have drawn, so that the next call is
        `batch(step)` (a run that starts at a rewind step sees the batches it would have)."""
        for _ in range(-(-step // self.steps_per_epoch)):
            self.epoch_permutation()

    @property
    def current(self) -> torch.Tensor:
        """The permutation of the epoch in progress."""
        return self._perm

    def batch(self, step: int) -> torch.Tensor:
        """Indices of the batch at `step`; steps must be asked for in order."""
        k = step % self.steps_per_epoch
        if k == 0:
            self.epoch_permutation()
        return self._perm[k * self.batch_size:(k + 1) * self.batch_size]


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based) of `total_steps`."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    raise ValueError(f"unknown schedule {schedule!r}")
