"""The cohort sampler: each member's minibatch indices at each step, from its own data-order
seed, exactly as the reference loop draws them alone.
"""

from __future__ import annotations

import torch

from dlstore.training.plan import MemberPlan
from dlstore.training.schedule import BatchOrder


class CohortSampler:
    """Every member's batch indices for a step as one [P, B] tensor. Each member keeps its own
    `BatchOrder` (so its batches are those it would draw alone); permutations are made only at a
    member's epoch boundary and stacked, so a step costs one gather, not P Python calls."""

    def __init__(self, members: list[MemberPlan], batch_size: int, device: torch.device,
                 start_step: int = 0):
        self.orders = [BatchOrder(m.order_seed, m.n_train, batch_size) for m in members]
        self.batch_size = batch_size
        self.device = device
        self.steps_per_epoch = torch.tensor([o.steps_per_epoch for o in self.orders])
        self.uniform = bool((self.steps_per_epoch == self.steps_per_epoch[0]).all())
        width = max(o.n_train for o in self.orders)
        self.perms = torch.zeros((len(members), width), dtype=torch.long)
        for i, order in enumerate(self.orders):
            order.skip_to(start_step)
            if start_step % order.steps_per_epoch:  # starting within an epoch: its permutation
                self.perms[i, :order.n_train] = order.current
        self._perms_dev = self.perms.to(device)
        self._offsets = torch.arange(batch_size, device=device)

    def epoch(self, step: int) -> torch.Tensor:
        return step / self.steps_per_epoch.to(torch.float64)

    def batch(self, step: int) -> torch.Tensor:
        within = step % self.steps_per_epoch  # [P] batch index within each member's epoch
        starting = (within == 0).nonzero().flatten().tolist()
        for i in starting:
            perm = self.orders[i].epoch_permutation()
            self.perms[i, :perm.shape[0]] = perm
        if starting:
            self._perms_dev = self.perms.to(self.device, non_blocking=True)
        if self.uniform:
            start = int(within[0]) * self.batch_size
            return self._perms_dev[:, start:start + self.batch_size]
        cols = (within.to(self.device) * self.batch_size)[:, None] + self._offsets
        return self._perms_dev.gather(1, cols)
