"""Whole-model metrics recorded at every checkpoint, computed for all members of a cohort at once.

Functions take stacked parameters (a leading member axis P) and return one value per member.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]
IGNORE = -100  # a target position of a sequence task that no loss counts


def loss_and_accuracy(forward: Callable[[Params, torch.Tensor], torch.Tensor], params: Params,
                      x: torch.Tensor, y: torch.Tensor, n_valid: torch.Tensor | None = None,
                      chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy of every member on a whole split.

    `forward(params, x)` maps stacked params [P, ...] and shared inputs [N, ...] to logits
    [P, N, C]. `y` is [N] (shared labels) or [P, N] (per-member labels, e.g. label noise);
    `n_valid` [P] restricts member i to the first n_valid[i] examples (its training subset).
    Sequence tasks: logits [P, N, V, T] and per-position targets [N, T] or [P, N, T], where
    positions holding IGNORE (-100) are no targets; loss and accuracy are then means over the
    marked tokens. Examples are processed in chunks to bound activation memory.
    """
    n_members = next(iter(params.values())).shape[0]
    n = x.shape[0]
    loss_sum = torch.zeros(n_members, dtype=torch.float64, device=x.device)
    correct = torch.zeros(n_members, dtype=torch.float64, device=x.device)
    count = torch.zeros(n_members, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk):
        xs = x[start:start + chunk]
        logits = forward(params, xs)  # [P, n, C] or [P, n, V, T]
        per_member = y.dim() == logits.dim() - 1  # [P, N] or [P, N, T]
        ys = y[:, start:start + chunk] if per_member else y[start:start + chunk]
        ys = ys.expand(n_members, *ys.shape[-(logits.dim() - 2):])  # [P, n] or [P, n, T]
        # the class axis second, as cross_entropy takes it
        losses = F.cross_entropy(logits.movedim(2, 1), ys, reduction="none")
        marked = ys != IGNORE
        hits = (logits.argmax(2) == ys) & marked
        if n_valid is not None:
            rows = (torch.arange(start, start + xs.shape[0], device=x.device)[None, :]
                    < n_valid[:, None])  # [P, n]
            marked = marked & rows.view(*rows.shape, *([1] * (ys.dim() - 2)))
            hits = hits & marked
        loss_sum += torch.where(marked, losses, 0.0).flatten(1).sum(1, dtype=torch.float64)
        correct += hits.flatten(1).sum(1, dtype=torch.float64)
        count += marked.flatten(1).sum(1, dtype=torch.float64)
    return loss_sum / count, correct / count


def weight_norm(params: Params) -> torch.Tensor:
    """L2 norm of all parameters of each member."""
    return torch.sqrt(sum(p.flatten(1).to(torch.float64).pow(2).sum(1) for p in params.values()))


def dist_from_init(params: Params, init: Params) -> torch.Tensor:
    """L2 distance of each member's parameters from its initial parameters."""
    return torch.sqrt(sum((params[k] - init[k]).flatten(1).to(torch.float64).pow(2).sum(1)
                          for k in params))
