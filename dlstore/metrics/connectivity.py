"""Linear mode connectivity: the loss and error barrier on the straight line between two networks.

For pairs (a, b) of members with the same shapes, theta(t) = (1 - t) a + t b. The barrier of a
quantity f (mean loss, or error = 1 - accuracy) is

    max_t  f(theta(t)) - ((1 - t) f(a) + t f(b))

(Frankle et al. 2020, "Linear mode connectivity and the lottery ticket hypothesis"): zero when the
two networks are linearly connected, large when a ridge separates them. Every pair and every t is
evaluated in one stacked forward pass, so a cohort's pairs cost a few batched evaluations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dlstore.metrics.basic import loss_and_accuracy

Params = dict[str, torch.Tensor]


def interpolate(a: Params, b: Params, ts: torch.Tensor) -> Params:
    """Stack [T * P, ...]: for each t of `ts` (outer) every pair's (1 - t) a + t b (inner).
    Integer tensors (buffers such as BatchNorm's batch counter) do not interpolate: a's."""
    out = {}
    for k in a:
        if not a[k].is_floating_point():
            out[k] = a[k].repeat(len(ts), *([1] * (a[k].dim() - 1)))
            continue
        shape = (-1, 1, *([1] * (a[k].dim() - 1)))
        t = ts.to(a[k].dtype).view(shape)
        out[k] = torch.lerp(a[k].unsqueeze(0), b[k].unsqueeze(0), t).flatten(0, 1)
    return out


def interpolation_barrier(forward: Callable[[Params, torch.Tensor], torch.Tensor], a: Params,
                          b: Params, x: torch.Tensor, y: torch.Tensor, n_points: int = 11,
                          chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Barriers between member i of `a` and member i of `b` ([P, ...] stacks), on inputs `x` and
    labels `y` (shared [N] or per pair [P, N]), along `n_points` evenly spaced t in [0, 1].

    `forward(params, x)` maps stacked params [Q, ...] and shared inputs [N, ...] to logits
    [Q, N, C] (a kernel's `forward_shared`). Returns {"loss_barrier", "error_barrier"} [P]
    float64, and "loss_path" / "error_path" [P, n_points], the values along the line."""
    if n_points < 2:
        raise ValueError("n_points must be >= 2 (the two endpoints)")
    ts = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64, device=x.device)
    n_pairs = next(iter(a.values())).shape[0]
    stacked = interpolate(a, b, ts)
    labels = y if y.dim() == 1 else y.repeat(n_points, 1)
    with torch.no_grad():
        loss, acc = loss_and_accuracy(forward, stacked, x, labels, chunk=chunk)
    out = {}
    for name, path in (("loss", loss), ("error", 1.0 - acc)):
        path = path.view(n_points, n_pairs).T  # [P, T]
        out[f"{name}_barrier"] = path_barrier(path, ts)
        out[f"{name}_path"] = path
    return out


def path_barrier(path: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """The barrier [P] of values along a path [P, T] at positions `ts` [T] in [0, 1]: the
    largest rise above the chord between its two ends (0 where it never rises above it)."""
    chord = (1.0 - ts) * path[:, :1] + ts * path[:, -1:]
    return (path - chord).amax(1)


def mode_connectivity(path: torch.Tensor) -> torch.Tensor:
    """The signed mode connectivity of Yang et al. 2021 from values along a path [P, T]
    (e.g. `error_path`): mc = (f(a) + f(b)) / 2 - f(theta(t*)), where t* maximises
    |(f(a) + f(b)) / 2 - f(theta(t))|. Negative: a barrier between the two networks; near 0:
    connected; positive: the path is better than its ends (typical of poorly trained pairs)."""
    ends = (path[:, :1] + path[:, -1:]) / 2
    deviation = ends - path
    worst = deviation.abs().argmax(1, keepdim=True)
    return deviation.gather(1, worst).squeeze(1)
