"""`alpha` against WeightWatcher 0.7.7 itself (a test-only dependency: the `dev` extra).

WeightWatcher reads each nn.Linear weight, takes the squared singular values (SciPy, float64,
on a machine without CUDA) and fits them with `WWFit`: the standard fit from 20 eigenvalues
above its threshold, the small-sample fit below, no fit under 8 eigenvalues. dlstore must give
the same alpha to rounding error on every layer, whichever branch it takes."""

import logging
import math

import numpy as np
import pytest
import torch

from dlstore.metrics.spectra import spectral_metrics

ww = pytest.importorskip("weightwatcher")
# WeightWatcher 0.7.7 calls a pandas API that pandas 3 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records")

# (out, in): min(out, in) eigenvalues: 7 (not fitted), 8, 9, 12, 19 (small-sample fit), 20, 25,
# 64 (standard fit)
SHAPES = [(7, 30), (8, 30), (9, 40), (12, 12), (19, 64), (20, 50), (25, 25), (64, 100),
          (10, 64)]
# CUDA would make WeightWatcher take float32 SVDs and a coarser threshold: rounding-level
# agreement holds for its CPU path
RTOL = 1e-10  # measured: 2.2e-15 at most


def _layers(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = []
    for i, (out, inp) in enumerate(SHAPES):
        if seed % 2:  # heavy-tailed entries (Student t, 3 degrees of freedom): fatter spectra
            chi2 = torch.randn(3, out, inp, generator=g).pow(2).sum(0)
            w = 0.1 * torch.randn(out, inp, generator=g) / (chi2 / 3).sqrt()
        else:
            w = torch.randn(out, inp, generator=g) / math.sqrt(inp)
        if i == len(SHAPES) - 1:  # 10 eigenvalues, rank 4: WeightWatcher's whole-tail fallback
            w = torch.randn(out, 4, generator=g) @ torch.randn(4, inp, generator=g)
        weights.append(w)
    return weights


def _weightwatcher_alpha(weights: list[torch.Tensor]) -> list[float]:
    model = torch.nn.Sequential(*[torch.nn.Linear(w.shape[1], w.shape[0]) for w in weights])
    with torch.no_grad():
        for layer, w in zip(model, weights):
            layer.weight.copy_(w)
    logging.disable(logging.WARNING)  # WeightWatcher warns that it runs without CUDA
    try:
        frame = ww.WeightWatcher(model=model).analyze()
    finally:
        logging.disable(logging.NOTSET)
    fitted = {int(row.longname): float(row.alpha) for row in frame.itertuples()}
    return [fitted.get(i, math.nan) for i in range(len(weights))]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_alpha_matches_weightwatcher_on_small_and_large_layers(seed, capsys):
    weights = _layers(seed)
    want = _weightwatcher_alpha(weights)
    capsys.readouterr()  # WeightWatcher prints "SMALL N PL FIT" for every small layer
    assert math.isnan(want[0]) and not any(math.isnan(a) for a in want[1:])
    for w, expected in zip(weights, want):
        stack = w[None].repeat(3, 1, 1)  # three members: the fit is per member, vectorised
        got = spectral_metrics(stack)["alpha"]
        if math.isnan(expected):
            assert torch.isnan(got).all(), w.shape
        else:
            np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, err_msg=str(w.shape))
