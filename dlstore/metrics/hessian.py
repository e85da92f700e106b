"""The Hessian of the training loss, for every member of a stack at once, from Hessian-vector
products: its top eigenvalue by power iteration and its trace by Hutchinson's estimator, as
PyHessian computes them (Yao et al. 2020), vectorised over members with `torch.func`
(`vmap` over `jvp` of `grad`: forward-over-reverse Hessian-vector products).

`loss_one(params, x, y, weight)` is one member's loss: its parameters (one member, no leading
axis), the shared inputs, its targets and per-example weights. The Hessian is that of the loss
alone (no weight-decay term), as PyHessian measures it.

Zero-padded members of a mixed-width stack pass `masks` (1 on their true entries): every vector
is restricted to the true entries, so the result is the Hessian of the member's own network
(padded units are inert while their weights are zero, so the principal submatrix on the true
entries is exactly that Hessian).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap

Params = dict[str, torch.Tensor]
PROBE_BATCH = 512
LossOne = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def hessian_vector_product(loss_one: LossOne) -> Callable:
    """hvp(params [P, ...], vectors [P, ...], x [N, ...], y [P, N, ...], weight [P, N]) ->
    H_i v_i for every member i."""
    gradient = grad(loss_one)

    def one(params: Params, vector: Params, x, y, weight) -> Params:
        return jvp(lambda p: gradient(p, x, y, weight), (params,), (vector,))[1]

    return vmap(one, in_dims=(0, 0, None, 0, 0))


def hessian_spectrum(loss_one: LossOne, params: Params, x: torch.Tensor, y: torch.Tensor,
                     weight: torch.Tensor, iterations: int = 100, tolerance: float = 1e-3,
                     probes: int = 10, masks: Params | None = None, seed: int = 0
                     ) -> dict[str, torch.Tensor]:
    """{"hessian_top_eig", "hessian_trace"}: [P] float64 for stacked `params`.

    Power iteration runs for each member until its eigenvalue estimate changes by less than
    `tolerance` (relative) between two products, or for `iterations` products; it finds the
    eigenvalue of largest magnitude. The trace averages v^T H v over `probes` Rademacher
    vectors (exact when H is diagonal). Random vectors come from `seed`, so a result is
    reproducible."""
    hvp = hessian_vector_product(loss_one)
    params = {k: v.detach() for k, v in params.items()}
    first = next(iter(params.values()))
    generator = torch.Generator(device=first.device).manual_seed(seed)

    def restrict(vectors: Params) -> Params:  # [P, ...] or [probes, P, ...]
        if not masks:
            return vectors
        return {k: v * masks[k] if k in masks else v for k, v in vectors.items()}

    def dot(a: Params, b: Params) -> torch.Tensor:
        return sum((a[k] * b[k]).flatten(1).sum(1, dtype=torch.float64) for k in a)

    vector = restrict({k: torch.randn(v.shape, generator=generator, device=v.device,
                                      dtype=v.dtype) for k, v in params.items()})
    n_members = first.shape[0]
    eigenvalue = torch.full((n_members,), torch.nan, dtype=torch.float64, device=first.device)
    # members whose estimate has converged leave the computation: later products cost only
    # the members still iterating
    active = torch.arange(n_members, device=first.device)
    for _ in range(iterations):
        current = {k: v[active] for k, v in vector.items()}
        norm = dot(current, current).sqrt().clamp_min(1e-30)
        current = {k: v / norm.view(-1, *[1] * (v.dim() - 1)).to(v.dtype)
                   for k, v in current.items()}
        product = hvp({k: v[active] for k, v in params.items()}, current, x, y[active],
                      weight[active])
        if masks:
            product = {k: v * masks[k][active] if k in masks else v for k, v in product.items()}
        estimate = dot(current, product)
        previous = eigenvalue[active]
        eigenvalue[active] = estimate
        for k in vector:
            vector[k][active] = product[k]
        # a member with non-finite weights (diverged) never converges: it leaves too
        still = ~((estimate - previous).abs() <= tolerance * estimate.abs().clamp_min(1e-12))
        still &= torch.isfinite(estimate)
        active = active[still]
        if active.numel() == 0:
            break
    # probes go through in batches (a second vmap) of about PROBE_BATCH member-probes
    batched = vmap(hvp, in_dims=(None, 0, None, None, None))
    trace = torch.zeros_like(eigenvalue)
    for start in range(0, probes, max(1, PROBE_BATCH // n_members)):
        count = min(max(1, PROBE_BATCH // n_members), probes - start)
        probe = restrict({k: torch.randint(0, 2, (count, *v.shape), generator=generator,
                                           device=v.device).to(v.dtype) * 2 - 1
                          for k, v in params.items()})
        product = batched(params, probe, x, y, weight)
        trace += sum((probe[k] * product[k]).flatten(2).sum(2, dtype=torch.float64).sum(0)
                     for k in probe)
    return {"hessian_top_eig": eigenvalue, "hessian_trace": trace / probes}
