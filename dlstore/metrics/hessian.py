"""The Hessian of the training loss, for every member of a stack at once, from Hessian-vector
products: its top eigenvalue (largest magnitude, the one PyHessian's power iteration finds) by a
block LOBPCG iteration that stops on a residual bound, and its trace by Hutchinson's estimator
as PyHessian computes it (Yao et al. 2020), vectorised over members with `torch.func` (`vmap`
over `jvp` of `grad`: forward-over-reverse Hessian-vector products).

`loss_one(params, x, y, weight)` is one member's loss: its parameters (one member, no leading
axis), the shared inputs, its targets and per-example weights. The Hessian is that of the loss
alone (no weight-decay term), as PyHessian measures it.

`fixed` holds stacks [P, ...] that a member's loss reads but the Hessian does not differentiate
(buffers: BatchNorm's running statistics): they join the parameters in `loss_one`'s first
argument.

Zero-padded members of a mixed-width stack pass `masks` (1 on their true entries): every vector
is restricted to the true entries, so the result is the Hessian of the member's own network
(padded units are inert while their weights are zero, so the principal submatrix on the true
entries is exactly that Hessian).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap

Params = dict[str, torch.Tensor]
PROBE_BATCH = 512
# LOBPCG block: 2 vectors would keep the top two eigenvalues apart however close they are; the
# third keeps it from settling on a pair of one sign while a pair of nearly the same magnitude
# and the other sign is the top (untrained networks have such spectra: with 2, 1 of 128 random
# ones stopped on the wrong pair)
BLOCK = 3
# a vector that keeps less than this fraction of its length once orthogonalised is dropped
DROP = 1e-3
LossOne = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def hessian_vector_product(loss_one: LossOne) -> Callable:
    """hvp(params [P, ...], vectors [P, ...], x [N, ...], y [P, N, ...], weight [P, N],
    fixed [P, ...]) -> H_i v_i for every member i, differentiating `params` only."""
    gradient = grad(lambda p, fixed, x, y, weight: loss_one({**p, **fixed}, x, y, weight))

    def one(params: Params, vector: Params, x, y, weight, fixed: Params) -> Params:
        return jvp(lambda p: gradient(p, fixed, x, y, weight), (params,), (vector,))[1]

    batched = vmap(one, in_dims=(0, 0, None, 0, 0, 0))

    def hvp(params: Params, vectors: Params, x, y, weight, fixed: Params | None = None):
        return batched(params, vectors, x, y, weight, fixed or {})

    return hvp


def hessian_spectrum(loss_one: LossOne, params: Params, x: torch.Tensor, y: torch.Tensor,
                     weight: torch.Tensor, iterations: int = 100, tolerance: float = 1e-3,
                     probes: int = 10, masks: Params | None = None, seed: int = 0,
                     fixed: Params | None = None) -> dict[str, torch.Tensor]:
    """{"hessian_top_eig", "hessian_trace"}: [P] float64 for stacked `params`.

    The top eigenvalue is that of largest magnitude, found by `top_eigenvalue` (block LOBPCG);
    each member stops once every Ritz pair (theta_i, v_i) of its block has ||H v_i - theta_i
    v_i|| <= `tolerance` |theta_1|, so an eigenvalue of H lies within `tolerance` |theta_1| of
    the value returned (and, with the gap g to the rest of the spectrum, within
    (tolerance theta_1)^2 / g); a member that has not met it after `iterations`
    keeps its last estimate, a diverged one (non-finite) gets NaN. The trace averages v^T H v
    over `probes` Rademacher vectors (exact when H is diagonal). Random vectors come from
    `seed`, so a result is reproducible."""
    hvp = hessian_vector_product(loss_one)
    params = {k: v.detach() for k, v in params.items()}
    fixed = {k: v.detach() for k, v in (fixed or {}).items()}
    first = next(iter(params.values()))
    generator = torch.Generator(device=first.device).manual_seed(seed)

    def restrict(vectors: Params) -> Params:  # [P, ...] or [probes, P, ...]
        if not masks:
            return vectors
        return {k: v * masks[k] if k in masks else v for k, v in vectors.items()}

    n_members = first.shape[0]
    eigenvalue = top_eigenvalue(hvp, params, x, y, weight, iterations, tolerance, masks,
                                generator, fixed)
    # probes go through in batches (a second vmap) of about PROBE_BATCH member-probes
    batched = vmap(hvp, in_dims=(None, 0, None, None, None, None))
    trace = torch.zeros_like(eigenvalue)
    for start in range(0, probes, max(1, PROBE_BATCH // n_members)):
        count = min(max(1, PROBE_BATCH // n_members), probes - start)
        probe = restrict({k: torch.randint(0, 2, (count, *v.shape), generator=generator,
                                           device=v.device).to(v.dtype) * 2 - 1
                          for k, v in params.items()})
        product = batched(params, probe, x, y, weight, fixed)
        trace += sum((probe[k] * product[k]).flatten(2).sum(2, dtype=torch.float64).sum(0)
                     for k in probe)
    return {"hessian_top_eig": eigenvalue, "hessian_trace": trace / probes}


def top_eigenvalue(hvp: Callable, params: Params, x: torch.Tensor, y: torch.Tensor,
                   weight: torch.Tensor, iterations: int, tolerance: float,
                   masks: Params | None, generator: torch.Generator,
                   fixed: Params | None = None) -> torch.Tensor:
    """[P] float64: the eigenvalue of largest magnitude of each member's Hessian.

    LOBPCG (Knyazev 2001) on a block of `BLOCK` vectors: each iteration takes the Rayleigh-Ritz
    pairs of largest magnitude in span[X, R, P] (the block, its residuals, the previous
    update), 2 * `BLOCK` Hessian-vector products (one batched call). Unlike power iteration,
    whose rate is |lambda_2 / lambda_1| and whose change-based stop triggered early when the
    top two eigenvalues are close, the block holds both, and the residual test bounds the
    error. A start vector (nearly) orthogonal to the top eigenvector, or a top eigenvalue
    outside the block's reach, can still go unnoticed by any such method; the random block of
    `BLOCK` makes that unlikely. The linear algebra is float64 on flat vectors [P, n, b]; the
    products are in the parameters' dtype (float32: residuals below ~1e-6 |lambda| are not
    reachable there)."""
    keys = list(params)
    first = params[keys[0]]
    shapes = [v.shape[1:] for v in params.values()]
    sizes = [math.prod(s) for s in shapes]
    n_members, n = first.shape[0], sum(sizes)
    mask = torch.cat([(masks[k] if masks and k in masks else torch.ones_like(params[k]))
                      .reshape(n_members, -1) for k in keys], 1).to(torch.float64)  # [P, n]
    block = min(BLOCK, n)
    fixed = fixed or {}
    batched = vmap(hvp, in_dims=(None, 0, None, None, None, None))  # over the block

    def apply(active: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """H v for flat vectors [m, n, b] of the members `active`."""
        parts = vectors.permute(2, 0, 1).split(sizes, dim=2)  # [b, m, n_k]
        tangent = {k: t.reshape(t.shape[0], t.shape[1], *s).to(params[k].dtype)
                   for k, t, s in zip(keys, parts, shapes)}
        product = batched({k: v[active] for k, v in params.items()}, tangent, x, y[active],
                          weight[active], {k: v[active] for k, v in fixed.items()})
        flat = torch.cat([product[k].flatten(2) for k in keys], 2).to(torch.float64)
        return flat.permute(1, 2, 0) * mask[active, :, None]  # [m, n, b]

    start = torch.randn((n_members, n, block), generator=generator, device=first.device,
                        dtype=first.dtype).to(torch.float64) * mask[:, :, None]
    active = torch.arange(n_members, device=first.device)
    block_x = torch.linalg.qr(start).Q  # [m, n, b] orthonormal
    block_x, block_hx = _rayleigh_ritz(block_x, apply(active, block_x), block)
    block_p = None
    eigenvalue = torch.full((n_members,), torch.nan, dtype=torch.float64, device=first.device)
    for step in range(iterations):
        theta = (block_x * block_hx).sum(1)  # [m, b]: the block holds Ritz vectors
        residual = block_hx - block_x * theta[:, None, :]
        eigenvalue[active] = theta[:, 0]
        # every pair of the block, not only the top one: a top pair alone can meet the bound on
        # the second eigenvalue when the two are closer than `tolerance` (the bound is to the
        # nearest eigenvalue), while the block has not yet taken the top one in
        done = (residual.norm(dim=1) <= tolerance * theta[:, :1].abs()).all(1)
        done |= ~torch.isfinite(theta).all(1)  # diverged: it never converges, and leaves
        if step == iterations - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = ~done
            active, block_x, block_hx, residual = (t[keep] for t in (active, block_x,
                                                                    block_hx, residual))
            if block_p is not None:
                block_p = block_p[keep]
        # the residuals and the previous update, orthonormalised against the block, get fresh
        # products in one batched call (carrying the update's products instead saves work but
        # amplifies their rounding error wherever it is nearly in the span of the others)
        search = residual if block_p is None else torch.cat([residual, block_p], 2)
        search = _orthonormalise(search * mask[active, :, None], block_x)
        basis = torch.cat([block_x, search], 2)  # [m, n, c]
        images = torch.cat([block_hx, apply(active, search)], 2)
        block_x, block_hx, coeff = _rayleigh_ritz(basis, images, block, True)
        # the update: the new block's part outside the old one
        block_p = basis[:, :, block:] @ coeff[:, block:]
    return torch.where(torch.isfinite(eigenvalue), eigenvalue, torch.nan)


def _rayleigh_ritz(basis: torch.Tensor, images: torch.Tensor, block: int,
                   coefficients: bool = False) -> tuple[torch.Tensor, ...]:
    """The `block` Ritz vectors of largest |Ritz value| in the orthonormal (or zero) columns
    of `basis` [m, n, c], and their images, from `images` = H basis; with `coefficients`, also
    the [m, c, block] combinations. A member with non-finite products gets a zero matrix
    here (eigh would fail on it), and leaves on its non-finite Ritz values."""
    small = basis.transpose(1, 2) @ images  # [m, c, c]
    small = (small + small.transpose(1, 2)) / 2
    small = torch.where(torch.isfinite(small).all(2, keepdim=True).all(1, keepdim=True), small,
                        torch.zeros_like(small))
    ritz, vectors = torch.linalg.eigh(small)
    order = ritz.abs().argsort(1, descending=True)[:, :block]  # largest magnitude first
    coeff = vectors.gather(2, order[:, None, :].expand(-1, vectors.shape[1], -1))
    out = (basis @ coeff, images @ coeff)
    return (*out, coeff) if coefficients else out


def _orthonormalise(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The columns of `vectors` [m, n, c] orthogonalised against the orthonormal `basis`
    [m, n, k] and each other (twice: classical Gram-Schmidt loses orthogonality once), unit
    length; a column (nearly) in the span of the others becomes zero, which Rayleigh-Ritz
    then ignores (a zero column adds a zero Ritz value)."""
    columns = [basis[:, :, i] for i in range(basis.shape[2])]
    for j in range(vectors.shape[2]):
        v = vectors[:, :, j]
        length = v.norm(dim=1)
        for _ in range(2):
            for q in columns:
                v = v - (q * v).sum(1, keepdim=True) * q
        norm = v.norm(dim=1)
        keep = norm > DROP * length
        columns.append(v * torch.where(keep, 1 / norm.clamp_min(1e-300), 0.0)[:, None])
    return torch.stack(columns[basis.shape[2]:], 2)
