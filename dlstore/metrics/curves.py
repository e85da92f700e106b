"""Mode connectivity along a trained curve (Garipov et al. 2018, "Loss surfaces, mode
connectivity, and fast ensembling of DNNs"), for stacks of pairs of networks.

A quadratic Bezier curve joins end points a and b through a bend c:

    theta(t) = (1 - t)^2 a + 2 t (1 - t) c + t^2 b,   t in [0, 1].

The ends stay fixed; the bend starts at (a + b) / 2 (so the untrained curve is the straight line)
and is trained to minimise the loss at a point t ~ U[0, 1] drawn anew every step, plus Garipov et
al.'s L2 regulariser 0.5 wd ||theta(t)||^2 of the point (not of the bend), by SGD with momentum
under their learning-rate schedule (constant for the first half, linear down to 1% by 90%,
then 1%; here per step where they change it per epoch). The gradient of the bend is the point's
gradient times dtheta/dc = 2 t (1 - t), so the cohort kernel's `loss_and_grads` on the stacked
points of every pair (one stacked member per pair) gives every bend's gradient in one pass.

Networks with BatchNorm: the running statistics of a point on the curve are no interpolation of
the ends' (Garipov et al.'s `update_bn`): at every evaluated point they are recomputed from the
training examples the barrier is measured on, by forwards in train mode over chunks of them,
each chunk entering with weight (its size / examples seen so far), so that the statistics are the
size-weighted means of the chunks' batch statistics (the running mean is then the mean over all
the examples; the variance the mean of the chunks' unbiased variances). The ends are evaluated
the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from dlstore.architectures.base import Architecture
from dlstore.architectures.kernels import buffer_names
from dlstore.metrics.basic import loss_and_accuracy
from dlstore.metrics.connectivity import mode_connectivity, path_barrier

Params = dict[str, torch.Tensor]
# the values recorded per pair, named as the straight-line group metrics with a `curve_` prefix
CURVE_METRICS = ("curve_train_loss_barrier", "curve_train_error_barrier",
                 "curve_test_loss_barrier", "curve_test_error_barrier",
                 "curve_mode_connectivity")


def garipov_lr_factor(step: int, steps: int) -> float:
    """The learning-rate factor of Garipov et al.'s schedule at `step` of `steps`."""
    alpha = step / steps
    if alpha <= 0.5:
        return 1.0
    if alpha <= 0.9:
        return 1.0 - (alpha - 0.5) / 0.4 * 0.99
    return 0.01


def bezier(a: Params, bend: Params, b: Params, t: torch.Tensor) -> Params:
    """The points theta(t_i) of the curves of member i of the stacks (`t`: [P], one per pair)
    for the tensors of `bend` (the parameters)."""
    out = {}
    for k, c in bend.items():
        tt = t.to(c.dtype).view(-1, *([1] * (c.dim() - 1)))
        out[k] = (1 - tt) ** 2 * a[k] + 2 * tt * (1 - tt) * c + tt ** 2 * b[k]
    return out


def curve_points(a: Params, bend: Params, b: Params, ts: torch.Tensor) -> Params:
    """Stack [T * P, ...]: for each t of `ts` (outer) every pair's theta(t) (inner), as
    `connectivity.interpolate` orders them. Tensors that are no parameters (buffers) are a's."""
    n_points, n_pairs = len(ts), next(iter(bend.values())).shape[0]
    def repeat(v: torch.Tensor) -> torch.Tensor:
        return v.repeat(n_points, *([1] * (v.dim() - 1)))
    t = ts.repeat_interleave(n_pairs)
    points = bezier({k: repeat(a[k]) for k in bend}, {k: repeat(v) for k, v in bend.items()},
                    {k: repeat(b[k]) for k in bend}, t)
    return {k: points[k] if k in points else repeat(v) for k, v in a.items()}


class CurveSampler:
    """Each pair's t and batches, from its own seed (never from its position in a stack): per
    step one t ~ U[0, 1] and `batch_size` training indices drawn uniformly (with replacement)
    from its first n_train examples. Drawn in blocks on the CPU, so that a pair trained alone
    draws exactly what it draws among others."""

    BLOCK = 128

    def __init__(self, seeds: Sequence[int], n_train: Sequence[int], batch_size: int,
                 device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.n_train = list(n_train)
        self.batch_size = batch_size
        self.device = device
        self._t: torch.Tensor | None = None
        self._idx: torch.Tensor | None = None
        self._next = 0

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """t [P] float32 and indices [P, batch_size] of the next step."""
        if self._t is None or self._next == self.BLOCK:
            ts, idx = [], []
            for g, n in zip(self.generators, self.n_train):
                ts.append(torch.rand(self.BLOCK, generator=g))
                idx.append(torch.randint(n, (self.BLOCK, self.batch_size), generator=g))
            self._t = torch.stack(ts, 1).to(self.device)  # [BLOCK, P]
            self._idx = torch.stack(idx, 1).to(self.device)  # [BLOCK, P, B]
            self._next = 0
        k, self._next = self._next, self._next + 1
        return self._t[k], self._idx[k]


def train_bends(kernel, a: Params, b: Params, x: torch.Tensor, y: torch.Tensor,
                sampler: CurveSampler, steps: int, lr: float, momentum: float,
                weight_decay: float) -> Params:
    """The trained bends [P, ...] of the pairs (a_i, b_i) of the stacks `a`, `b` (parameters and
    buffers, state-dict order), on inputs `x` [N, ...] and each pair's labels `y` [P, N]. The
    buffers start as a's and follow the training forwards (running statistics do not enter a
    train-mode forward; they are recomputed where the curve is evaluated). A pair whose loss
    turns NaN or infinite keeps the bend it had (its momentum is dropped)."""
    buffers = tuple(getattr(kernel, "buffers", ()))
    bend = {k: ((a[k] + b[k]) / 2).clone() for k in a if k not in buffers}
    fixed = {k: a[k] for k in buffers}
    # torch.optim.SGD's momentum (buffer = momentum * buffer + grad, the first buffer the
    # gradient), written out: it is elementwise, so one update serves every stacked pair, and
    # a diverged pair's buffer can be dropped
    velocity: Params = {}
    n_pairs = next(iter(bend.values())).shape[0]
    alive = torch.ones(n_pairs, dtype=torch.bool, device=next(iter(bend.values())).device)
    for step in range(steps):
        t, idx = sampler.draw()
        point = bezier(a, bend, b, t)
        xb, yb = x[idx], y.gather(1, idx)
        if buffers:  # carried on as the trainer carries them (e.g. a dropout's counter)
            losses, grads, fixed = kernel.loss_grads_and_buffers({**point, **fixed}, xb, yb)
        else:
            losses, grads = kernel.loss_and_grads(point, xb, yb)
        alive = alive & torch.isfinite(losses)
        step_lr = lr * garipov_lr_factor(step, steps)
        with torch.no_grad():
            for k, c in bend.items():
                shape = (-1, *([1] * (c.dim() - 1)))
                keep = alive.view(shape)
                scale = (2 * t * (1 - t)).to(c.dtype).view(shape)
                grad = torch.where(keep, (grads[k] + weight_decay * point[k]) * scale, 0.0)
                if momentum and k in velocity:
                    velocity[k] = torch.where(keep, velocity[k] * momentum + grad, 0.0)
                elif momentum:
                    velocity[k] = grad
                c.sub_(velocity[k] if momentum else grad, alpha=step_lr)
    return {k: v.detach() for k, v in bend.items()}


class NormStatistics:
    """Recomputes the BatchNorm running statistics of stacked networks (every
    `nn.modules.batchnorm._BatchNorm` of the architecture's module) from data, as described in
    the module docstring. `names` is empty for a network without BatchNorm."""

    def __init__(self, arch: Architecture, input_shape: tuple[int, ...], n_classes: int):
        with torch.device("meta"):
            self.module = arch.build(input_shape, n_classes).train()
        self.norms = [m for m in self.module.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.names = tuple(f"{name}.{buffer}" for name, m in self.module.named_modules()
                           if m in self.norms
                           for buffer in ("running_mean", "running_var", "num_batches_tracked"))
        self.buffers = buffer_names(self.module)
        self._forward = vmap(self._one, in_dims=(0, 0, None))

    def _one(self, params: Params, buffers: Params, x: torch.Tensor) -> Params:
        state = {k: v.clone() for k, v in buffers.items()}
        functional_call(self.module, {**params, **state}, (x,))
        return {k: state[k] for k in self.names}

    def recompute(self, state: Params, x: torch.Tensor, chunk: int = 1024) -> Params:
        """`state` ([Q, ...] stacks) with its BatchNorm statistics recomputed on `x`."""
        if not self.names:
            return state
        params = {k: v for k, v in state.items() if k not in self.buffers}
        buffers = {k: (torch.zeros_like(v) if k in self.names else v)
                   for k, v in state.items() if k in self.buffers}
        seen = 0
        with torch.no_grad():
            for start in range(0, x.shape[0], chunk):
                xs = x[start:start + chunk]
                for m in self.norms:  # the chunk's share of the examples seen so far
                    m.momentum = xs.shape[0] / (seen + xs.shape[0])
                buffers.update(self._forward(params, buffers, xs))
                seen += xs.shape[0]
        return {**state, **{k: buffers[k] for k in self.names}}


def with_statistics(norms: NormStatistics, points: Params, x: torch.Tensor,
                    n_valid: torch.Tensor, n_points: int, chunk: int = 1024) -> Params:
    """`points` ([T * P, ...], `curve_points`' order) with the BatchNorm statistics of pair i's
    points recomputed on the first n_valid[i] examples of `x` (unchanged without BatchNorm)."""
    if not norms.names:
        return points
    n_pairs = n_valid.shape[0]
    stats = {k: points[k].clone() for k in norms.names}
    for n in n_valid.unique().tolist():  # the pairs that see the same examples, together
        pairs = (n_valid == n).nonzero().squeeze(1)
        members = (pairs[None, :] + n_pairs * torch.arange(n_points, device=pairs.device)
                   [:, None]).flatten()
        recomputed = norms.recompute({k: v[members] for k, v in points.items()}, x[:n], chunk)
        for k in norms.names:
            stats[k][members] = recomputed[k]
    return {**points, **stats}


def path_values(kernel, points: Params, x: torch.Tensor, y: torch.Tensor,
                n_valid: torch.Tensor, n_points: int, chunk: int = 1024
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and error [P, T] of the `points` ([T * P, ...]) on the first n_valid[i] examples
    of `x`, with pair i's labels `y` [P, N]."""
    n_pairs = y.shape[0]
    loss, acc = loss_and_accuracy(kernel.forward_shared, points, x, y.repeat(n_points, 1),
                                  n_valid.repeat(n_points), chunk=chunk)
    return loss.view(n_points, n_pairs).T, (1.0 - acc).view(n_points, n_pairs).T


def curve_metrics(kernel, norms: NormStatistics, a: Params, bend: Params, b: Params,
                  x_train: torch.Tensor, y_train: torch.Tensor, n_train: torch.Tensor,
                  x_test: torch.Tensor, y_test: torch.Tensor, n_points: int,
                  chunk: int = 1024) -> dict[str, torch.Tensor]:
    """{`CURVE_METRICS` name: [P] float64} along the curves (a_i, bend_i, b_i) at `n_points`
    evenly spaced t: barriers on pair i's first n_train[i] training examples (labels y_train
    [P, N]) and on the test split (BatchNorm statistics from those training examples), and the
    signed mc of the train error; also "train_loss_path" and "train_error_path" [P, T]."""
    dtype = next(iter(bend.values())).dtype
    ts = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64, device=x_train.device)
    n_pairs = y_train.shape[0]
    x_train = x_train[:int(n_train.max())]  # what no pair sees is not evaluated
    with torch.no_grad():
        points = curve_points(a, bend, b, ts.to(dtype))
        points = with_statistics(norms, points, x_train, n_train, n_points, chunk)
        train = path_values(kernel, points, x_train, y_train, n_train, n_points, chunk)
        test = path_values(kernel, points, x_test, y_test.expand(n_pairs, -1),
                           torch.full_like(n_train, x_test.shape[0]), n_points, chunk)
    return {"curve_train_loss_barrier": path_barrier(train[0], ts),
            "curve_train_error_barrier": path_barrier(train[1], ts),
            "curve_test_loss_barrier": path_barrier(test[0], ts),
            "curve_test_error_barrier": path_barrier(test[1], ts),
            "curve_mode_connectivity": mode_connectivity(train[1]),
            "train_loss_path": train[0], "train_error_path": train[1]}
