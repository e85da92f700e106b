"""The stacked optimizer: SGD (momentum, weight decay) and Adam/AdamW over a cohort's parameters
stacked along a member axis [P, ...], each member with its own learning rate and hyperparameters.
"""

from __future__ import annotations

import torch

from dlstore.stacks import Params
from dlstore.training.plan import MemberPlan


class StackedOptimizer:
    """torch.optim.SGD (momentum, L2 weight decay), torch.optim.Adam and torch.optim.AdamW
    (decoupled weight decay), written in place on
    stacked parameters with per-member hyperparameters as [P] columns.

    In place, because at zoo sizes the update is bound by memory traffic, not arithmetic. Frozen
    (diverged) members get a zero gradient and a zero learning rate, so their weights stay as they
    were even when their gradients are NaN."""

    def __init__(self, kind: str, members: list[MemberPlan], device: torch.device):
        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        self.kind = kind
        self.lr = column([m.lr for m in members])
        self.weight_decay = column([m.weight_decay for m in members])
        self.use_weight_decay = any(m.weight_decay for m in members)
        self.momentum = column([m.momentum for m in members])
        self.use_momentum = any(m.momentum for m in members)
        self.beta1 = column([m.betas[0] for m in members])
        self.beta2 = column([m.betas[1] for m in members])
        self.eps = column([m.eps for m in members])
        self.state1: dict[str, torch.Tensor] = {}  # momentum buffer / Adam first moment
        self.state2: dict[str, torch.Tensor] = {}  # Adam second moment
        self.t = 0

    def step(self, params: Params, grads: Params, lr_scale: float,
             frozen: torch.Tensor | None = None, masks: Params | None = None) -> None:
        lr = self.lr * lr_scale
        if frozen is not None:
            lr = lr.masked_fill(frozen, 0.0)
        self.t += 1
        with torch.no_grad():
            for k, p in params.items():
                g = grads[k]
                shape = (-1, *([1] * (p.dim() - 1)))
                if frozen is not None:
                    g.masked_fill_(frozen.view(shape), 0.0)
                if masks and k in masks:  # padded and pruned entries get no gradient
                    g.mul_(masks[k])
                if self.use_weight_decay and self.kind == "adamw":
                    p.mul_(1.0 - lr.view(shape) * self.weight_decay.view(shape))
                elif self.use_weight_decay:
                    g.addcmul_(p, self.weight_decay.view(shape))
                if self.kind == "sgd":
                    if self.use_momentum:
                        if k not in self.state1:
                            self.state1[k] = g.clone()
                        else:
                            self.state1[k].mul_(self.momentum.view(shape)).add_(g)
                        g = self.state1[k]
                    p.addcmul_(g, lr.view(shape), value=-1.0)
                else:
                    self._adam(k, p, g, lr.view(shape), shape)

    def _adam(self, k: str, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor, shape) -> None:
        b1, b2 = self.beta1.view(shape), self.beta2.view(shape)
        if k not in self.state1:
            self.state1[k] = torch.zeros_like(p)
            self.state2[k] = torch.zeros_like(p)
        m, v = self.state1[k], self.state2[k]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g * g, 1 - b2)
        bias1 = 1 - b1**self.t
        bias2_sqrt = torch.sqrt(1 - b2**self.t)
        denom = (v.sqrt() / bias2_sqrt).add_(self.eps.view(shape))
        p.addcmul_(m / denom, lr / bias1, value=-1.0)
