"""Neural collapse (Papyan, Han & Donoho 2020), for every member of a stack at once.

On penultimate-layer features h_i with labels y_i, class means mu_c, global mean mu_G and the
centred class means m_c = mu_c - mu_G:

- `nc1` = tr(Sigma_W Sigma_B^+) / C: within-class variability relative to between-class
  (Sigma_W = mean over examples of (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
  Sigma_B = mean over classes of m_c m_c^T, ^+ the pseudo-inverse). 0 when features collapse.
- NC2, convergence of the m_c to a simplex equiangular tight frame:
  `nc2_equinorm` = std_c ||m_c|| / mean_c ||m_c||; `nc2_equiangular` = std over c != c' of
  cos(m_c, m_c'); `nc2_maxangle` = mean over c != c' of |cos(m_c, m_c') + 1/(C - 1)|.
  All 0 for a simplex ETF.
- `nc3` = || W / ||W||_F - M / ||M||_F ||_F^2, W the classifier's weights [C, d] and M the
  centred class means [C, d]: self-duality, 0 when the classifier aligns with the means.
- `nc4`: the fraction of examples where the network's prediction differs from the
  nearest-class-centre prediction argmin_c ||h - mu_c||.

Standard deviations are population ones (ddof 0). Examples carry weights (0 leaves an example
out), so members with training sets of different sizes share one computation; a class with no
example in a member's sample gets a zero mean.
"""

from __future__ import annotations

import torch

COLLAPSE = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "nc3", "nc4")


def neural_collapse(features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                    bias: torch.Tensor, n_classes: int, weight: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
    """{name: [P] float64} from features [P, N, d], labels [N] or [P, N], classifier weights
    [P, C, d] and biases [P, C]; `weight` [P, N] (default all 1)."""
    h = features.detach().to(torch.float64)
    n_members, n, _ = h.shape
    labels = labels.expand(n_members, n)
    w = (torch.ones((n_members, n), dtype=torch.float64, device=h.device) if weight is None
         else weight.to(torch.float64).expand(n_members, n))
    onehot = torch.nn.functional.one_hot(labels, n_classes).to(torch.float64) * w[..., None]
    counts = onehot.sum(1)  # [P, C]
    means = onehot.transpose(1, 2) @ h / counts.clamp_min(1.0)[..., None]  # [P, C, d]
    total = w.sum(1)
    global_mean = (w[..., None] * h).sum(1) / total[:, None]  # [P, d]

    within = h - means.gather(1, labels[..., None].expand_as(h))  # h_i - mu_{y_i}
    sigma_w = (within * w[..., None]).transpose(1, 2) @ within / total[:, None, None]
    centred = means - global_mean[:, None, :]  # [P, C, d]
    sigma_b = centred.transpose(1, 2) @ centred / n_classes
    nc1 = torch.linalg.pinv(sigma_b, hermitian=True).mul(sigma_w).sum((1, 2)) / n_classes

    norms = centred.norm(dim=2)  # [P, C]
    unit = centred / norms.clamp_min(1e-30)[..., None]
    cosines = unit @ unit.transpose(1, 2)
    off = ~torch.eye(n_classes, dtype=torch.bool, device=h.device)
    pairs = cosines[:, off]  # [P, C (C - 1)]

    cls = classifier.detach().to(torch.float64)
    duality = (cls / cls.flatten(1).norm(dim=1)[:, None, None]
               - centred / centred.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None])

    network = (h @ cls.transpose(1, 2) + bias.detach().to(torch.float64)[:, None, :]).argmax(2)
    nearest = torch.cdist(h, means).argmin(2)
    mismatch = ((network != nearest).to(torch.float64) * w).sum(1) / total
    return {
        "nc1": nc1,
        "nc2_equinorm": norms.std(1, correction=0) / norms.mean(1),
        "nc2_equiangular": pairs.std(1, correction=0),
        "nc2_maxangle": (pairs + 1.0 / (n_classes - 1)).abs().mean(1),
        "nc3": duality.pow(2).sum((1, 2)),
        "nc4": mismatch,
    }
