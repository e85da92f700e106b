"""Masks for lottery tickets: magnitude pruning, random masks with the same layer-wise counts,
and densities. A mask is {tensor name: bool tensor} over a network's prunable tensors (those of
two or more dimensions: weights, not biases); True keeps a weight.

Counts are exact and deterministic: each round removes round(fraction * remaining) weights of a
pool (the hidden layers together with global scope, each tensor with layer-wise scope; the
output layer always on its own, at its own fraction), choosing the smallest magnitudes with ties
broken by position, so a mask is a function of the weights and the previous mask alone.
"""

from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]
Mask = dict[str, torch.Tensor]


def prunable(state: Params, arch=None) -> list[str]:
    """Names of the prunable tensors, in state-dict order; the last is the output layer. What
    the architecture declares (`Architecture.prunable_tensors`); without one, every tensor of two or
    more dimensions, as the built-ins declare."""
    names = arch.prunable_tensors(state) if arch is not None else None
    return names if names is not None else [k for k, v in state.items() if v.dim() >= 2]


def full_mask(state: Params, arch=None) -> Mask:
    return {k: torch.ones_like(state[k], dtype=torch.bool) for k in prunable(state, arch)}


def removed_count(fraction: float, remaining: int) -> int:
    """Weights one round removes from a pool of `remaining` (rounded half up)."""
    return int(fraction * remaining + 0.5)


def magnitude_prune(mask: Mask, weights: Params, fraction: float, output_fraction: float,
                    scope: str) -> Mask:
    """The next level's mask: from the weights `mask` keeps, remove the smallest magnitudes of
    `weights` (the previous level's trained weights)."""
    names = list(mask)
    hidden, output = names[:-1], names[-1:]
    pools = [[k] for k in hidden] if scope == "layerwise" else ([hidden] if hidden else [])
    out = dict(mask)
    for pool, share in [(p, fraction) for p in pools] + [(output, output_fraction)]:
        keep = torch.cat([mask[k].flatten() for k in pool])
        score = torch.cat([weights[k].detach().abs().flatten().to(torch.float64)
                           for k in pool]).to(keep.device)
        n_remove = removed_count(share, int(keep.sum()))
        if n_remove == 0:
            continue
        # pruned entries score +inf so that only kept ones are ranked; stable: ties by position
        order = torch.argsort(score.masked_fill(~keep, float("inf")), stable=True)
        keep = keep.clone()
        keep[order[:n_remove]] = False
        for k, part in zip(pool, keep.split([mask[k].numel() for k in pool])):
            out[k] = part.view_as(mask[k])
    return out


def random_mask_like(mask: Mask, seed: int) -> Mask:
    """A uniformly random mask keeping exactly as many weights of each tensor as `mask` does."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, m in mask.items():
        keep = torch.zeros(m.numel(), dtype=torch.bool)
        keep[torch.randperm(m.numel(), generator=g)[:int(m.sum())]] = True
        out[k] = keep.view(m.shape).to(m.device)
    return out


def apply_mask(state: Params, mask: Mask | None) -> Params:
    """`state` with pruned weights set to exactly zero (unpruned tensors as they are)."""
    if mask is None:
        return dict(state)
    return {k: v * mask[k].to(v.dtype) if k in mask else v for k, v in state.items()}


def density(mask: Mask) -> float:
    """Kept / prunable over all prunable tensors."""
    return sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())


def tensor_densities(mask: Mask) -> list[float]:
    return [int(m.sum()) / m.numel() for m in mask.values()]
