"""Spectra of weight matrices, computed for every member of a stack at once.

A weight tensor [P, out, ...] is read as P matrices out x rest (a convolution kernel
[out, in, k] becomes out x (in * k)); with singular values s_1 >= s_2 >= ...:

- `spectral_norm` = s_1, `frobenius_norm` = sqrt(sum s_i^2);
- `stable_rank` = frobenius_norm^2 / spectral_norm^2;
- `effective_rank` = exp(H(p)), the entropy effective rank of Roy & Vetterli 2007, with
  p_i = s_i / sum_j s_j;
- `alpha`: the power-law exponent of the eigenvalues lambda_i = s_i^2 of W^T W, fitted as
  WeightWatcher 0.7.7 does (Martin & Mahoney 2021; `WW_powerlaw.WWFit`, the continuous power
  law of Clauset, Shalizi & Newman 2009). Eigenvalues below 1e-5 are dropped; of the n
  remaining, every sorted eigenvalue but the largest is a candidate x_min, with tail size t:
  - n >= 20 (the standard fit): alpha = 1 + t / sum log(x / x_min) over the tail, and the fit
    kept is the one whose Kolmogorov-Smirnov distance D between the tail's empirical and fitted
    distribution is smallest;
  - n < 20 (WeightWatcher's small-sample fit): only tails of t >= 8 are fitted, with the
    bias-corrected alpha = 1 + (t - 1) / sum log(x / x_min), and the fit kept is again the one
    of smallest D (WeightWatcher also computes D - 0.868 / sqrt(t) for each, but the value it
    reports is that of smallest D); with no such tail it fits the whole spectrum (n >= 2).
  With fewer than 8 eigenvalues (min(out, rest) < 8, zeros included) WeightWatcher does not fit
  the layer, nor with fewer than 2 above the threshold: alpha is NaN there.
"""

from __future__ import annotations

import torch

SPECTRA = ("spectral_norm", "frobenius_norm", "stable_rank", "effective_rank", "alpha")
EVALS_THRESHOLD = 1e-5  # WeightWatcher's EVALS_THRESH
MIN_EVALS = 8  # WeightWatcher 0.7.7's DEFAULT_MIN_EVALS (of min(out, rest), zeros included)
SMALL_N = 20  # WeightWatcher's SMALL_N_CUTOFF: fewer eigenvalues above the threshold take the
SMALL_N_TAIL = 8  # small-sample fit, whose tails have at least this many eigenvalues
# members per chunk of the [P, K, K] Kolmogorov-Smirnov tensor: bounds it to about 32 MB
_KS_ELEMENTS = 1 << 22


def is_weight_matrix(stacked: torch.Tensor) -> bool:
    """Tensors with a spectrum: weights of linear and convolution layers ([P, out, in, ...]);
    biases and other vectors have none."""
    return stacked.dim() >= 3


def spectral_metrics(stacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: [P] float64} for a stack [P, out, ...] of one weight tensor, each member at its
    true shape (zero padding would add zero singular values and change `effective_rank`)."""
    matrices = stacked.detach().reshape(stacked.shape[0], stacked.shape[1], -1).to(torch.float64)
    s = torch.linalg.svdvals(matrices)  # [P, min(out, rest)], descending
    spectral = s[:, 0]
    frobenius = s.pow(2).sum(1).sqrt()
    p = s / s.sum(1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)
    return {
        "spectral_norm": spectral,
        "frobenius_norm": frobenius,
        "stable_rank": frobenius.pow(2) / spectral.pow(2),
        "effective_rank": entropy.exp(),
        "alpha": powerlaw_alpha(s.pow(2)),
    }


def powerlaw_alpha(evals: torch.Tensor, threshold: float = EVALS_THRESHOLD,
                   min_evals: int = MIN_EVALS) -> torch.Tensor:
    """The power-law exponent [P] of each row of `evals` [P, K] (eigenvalues of one member),
    fitted as described in the module docstring; NaN where K < `min_evals` or fewer than 2
    eigenvalues exceed `threshold`."""
    x = torch.sort(evals.to(torch.float64), dim=1).values  # ascending
    n_members, k = x.shape
    if k < max(min_evals, 1):
        return torch.full((n_members,), float("nan"), dtype=torch.float64, device=x.device)
    valid = x > threshold
    n_valid = valid.sum(1)
    first = k - n_valid  # eigenvalues below the threshold are the smallest: they sort first
    log_x = torch.where(valid, x, torch.ones_like(x)).log()
    tail_log_sum = log_x.flip(1).cumsum(1).flip(1)  # sum_{j >= i} log x_j
    n_tail = torch.arange(k, 0, -1, device=x.device, dtype=torch.float64)  # K - i
    log_ratio_sum = tail_log_sum - n_tail * log_x  # [P, K] sum_{j >= i} log(x_j / x_i)
    positions = torch.arange(k, device=x.device)
    candidate = (positions >= first[:, None]) & (positions < k - 1)
    alphas = 1 + n_tail / log_ratio_sum  # [P, K], candidate x_min = x_i
    distance = torch.where(candidate, _chunked_ks(x, alphas, n_tail), torch.inf)
    alpha = alphas.gather(1, distance.argmin(1)[:, None]).squeeze(1)
    small = n_valid < SMALL_N
    if small.any():  # computed for the whole stack, kept where n < 20
        alpha = torch.where(small, _small_sample_alpha(x, log_ratio_sum, n_tail, candidate,
                                                       first), alpha)
    return torch.where(n_valid > 1, alpha, torch.nan)


def _small_sample_alpha(x: torch.Tensor, log_ratio_sum: torch.Tensor, n_tail: torch.Tensor,
                        candidate: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[P]: the alpha WeightWatcher 0.7.7's small-sample fit returns for each row; `candidate`
    [P, K] marks the x_min it may choose among. `WWFit.fit_powerlaw_smallN` fits tails of at
    least 8 eigenvalues and ranks them by D - 0.868 / sqrt(t), but `WWFit.__init__` then keeps
    the candidate of smallest D (as after the standard fit), so that is the value WeightWatcher
    reports, and the one kept here."""
    alphas = 1 + (n_tail - 1) / log_ratio_sum  # [P, K] bias-corrected MLE
    # a tail of equal eigenvalues (sum of logs ~ 0) has no fit, as in WeightWatcher
    usable = candidate & (n_tail >= SMALL_N_TAIL) & (log_ratio_sum > 1e-12) & (alphas > 1)
    # no usable tail: WeightWatcher fits the whole spectrum above the threshold instead
    positions = torch.arange(x.shape[1], device=x.device)
    whole = (positions == first[:, None]) & (log_ratio_sum > 1e-12)
    fitted = usable | (whole & ~usable.any(1, keepdim=True))
    # candidates it did not fit keep its initial D = 1 and alpha = 0
    distance = torch.where(fitted, _chunked_ks(x, alphas, n_tail).nan_to_num(nan=torch.inf),
                           torch.ones_like(alphas))
    distance = torch.where(candidate | fitted, distance, torch.inf)
    best = distance.argmin(1)[:, None]  # the first of equal minima, as numpy's argmin
    return torch.where(fitted, alphas, torch.zeros_like(alphas)).gather(1, best).squeeze(1)


def _chunked_ks(x: torch.Tensor, alphas: torch.Tensor, n_tail: torch.Tensor) -> torch.Tensor:
    """`_ks_distance` over chunks of members, so that its [P, K, K] tensor stays small."""
    n_members, k = x.shape
    distance = torch.empty_like(alphas)
    chunk = max(1, _KS_ELEMENTS // (k * k))
    for start in range(0, n_members, chunk):
        part = slice(start, start + chunk)
        distance[part] = _ks_distance(x[part], alphas[part], n_tail)
    return distance


def _ks_distance(x: torch.Tensor, alphas: torch.Tensor, n_tail: torch.Tensor) -> torch.Tensor:
    """[P, K]: for candidate x_min = x_i, max over the tail j >= i of |fitted CDF(x_j) -
    empirical CDF(x_j)|, where the empirical CDF of the j-th tail point is (j - i) / n. A
    candidate with alpha <= 1 gets distance 1 (no normalisable power law), as in WeightWatcher."""
    k = x.shape[1]
    ratio = x[:, None, :] / x[:, :, None]  # [P, i, j] = x_j / x_i
    fitted = 1 - ratio.pow(1 - alphas[:, :, None])
    offset = torch.arange(k, device=x.device, dtype=torch.float64)
    empirical = (offset[None, :] - offset[:, None]) / n_tail[:, None]  # [i, j] = (j - i) / n_i
    gap = (fitted - empirical).abs()
    in_tail = offset[None, :] >= offset[:, None]
    gap = torch.where(in_tail, gap, torch.zeros_like(gap))
    gap = torch.nan_to_num(gap, nan=torch.inf)
    return torch.where(alphas > 1, gap.amax(2), torch.ones_like(alphas))
