"""How similar two networks are on the same inputs, for every pair of a stack at once.

- `linear_cka`: linear centred kernel alignment of two representations (Kornblith et al. 2019),
  ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X [N, d1] and Y [N, d2]:
  1 for identical representations, invariant to orthogonal transforms and isotropic scaling.
- `disagreement`: the fraction of inputs on which the two networks predict different classes.
"""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[P] float64 for representations x [P, N, d1] and y [P, N, d2] of P pairs."""
    x = x.detach().to(torch.float64)
    y = y.detach().to(torch.float64)
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    cross = (y.transpose(1, 2) @ x).pow(2).sum((1, 2))
    self_x = (x.transpose(1, 2) @ x).pow(2).sum((1, 2)).sqrt()
    self_y = (y.transpose(1, 2) @ y).pow(2).sum((1, 2)).sqrt()
    return cross / (self_x * self_y)


def disagreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """[P] float64: fraction of the N inputs where pair i's predictions differ ([P, N, C])."""
    return (logits_a.argmax(-1) != logits_b.argmax(-1)).to(torch.float64).mean(1)
