"""Statistics of weight tensors, computed for every member of a stack at once.

The per-tensor features of Unterthiner et al. 2020 ("Predicting neural network accuracy from
weights"): mean, standard deviation and the quantiles 0, 25, 50, 75 and 100 %. They are recorded
per checkpoint (metrics table, `tensor` = the state-dict name) and used as weight-space features.
"""

from __future__ import annotations

import torch

STATISTICS = ("mean", "std", "q0", "q25", "q50", "q75", "q100")
_QUANTILES = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)


def tensor_statistics(stacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: [P] float64} for a stack [P, ...] of one tensor of P members, each at its true
    shape (not zero-padded: padding would count as weights).

    `std` is the population standard deviation (ddof 0); quantiles interpolate linearly, as
    numpy's default does."""
    flat = stacked.detach().reshape(stacked.shape[0], -1).to(torch.float64)
    out = {"mean": flat.mean(1), "std": flat.std(1, correction=0)}
    q = torch.quantile(flat, _QUANTILES.to(flat.device), dim=1)  # [5, P]
    for name, row in zip(STATISTICS[2:], q):
        out[name] = row
    return out
