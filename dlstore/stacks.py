"""Stacked parameters: a cohort's state dicts as one tensor per name with a leading member axis
[P, ...], narrower members zero-padded into the widest's shape.
"""

from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]


def member_slices(params: Params, shapes: Params, members: list[int]) -> Params:
    """The stacks [len(members), ...] of `members`, each tensor cut to the true shapes of
    `shapes` (from a padded cohort stack)."""
    index = torch.tensor(members, device=next(iter(params.values())).device)
    return {k: v.index_select(0, index)[(slice(None), *(slice(0, n) for n in shapes[k].shape))]
            .contiguous() for k, v in params.items()}


def pad_stack(tensors: list[torch.Tensor], axes: tuple[int, ...] = ()
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack tensors whose shapes may differ along `axes`, each zero-padded at the end of those
    axes to the largest size. Returns the stack and a 0/1 mask of true entries (None if all
    shapes are equal). A difference along any other axis is a ValueError."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    if all(list(t.shape) == shape for t in tensors):
        return torch.stack(tensors), None
    for t in tensors:
        fixed = [a for a, (n, m) in enumerate(zip(t.shape, shape)) if n != m and a not in axes]
        if len(t.shape) != len(shape) or fixed:
            raise ValueError(f"cannot stack shapes {list(t.shape)} and {shape}: they differ "
                             f"along axes {fixed or 'count'}, padding is declared along {axes}")
    out = tensors[0].new_zeros((len(tensors), *shape))
    mask = torch.zeros_like(out)
    for i, t in enumerate(tensors):
        region = (i, *(slice(0, n) for n in t.shape))
        out[region] = t
        mask[region] = 1.0
    return out, mask


def stack_labels(labels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' label vectors of different lengths as one [P, N_max] stack (zero-padded) and
    their lengths [P]; per-position targets [n, T] of sequence tasks stack to [P, N_max, T]."""
    n = torch.tensor([y.shape[0] for y in labels])
    out = torch.zeros((len(labels), int(n.max()), *labels[0].shape[1:]), dtype=torch.long)
    for i, y in enumerate(labels):
        out[i, :y.shape[0]] = y
    return out, n
