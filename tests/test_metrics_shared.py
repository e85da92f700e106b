"""Shared metric primitives against direct per-model computations and known answers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlstore.architectures.mlp import MLPKernel, MLPOptions
from dlstore.metrics.connectivity import interpolation_barrier
from dlstore.metrics.weights import STATISTICS, tensor_statistics


def test_tensor_statistics_match_numpy_per_member():
    stack = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0))
    stats = tensor_statistics(stack)
    assert set(stats) == set(STATISTICS)
    for i in range(5):
        values = stack[i].flatten().double().numpy()
        want = [values.mean(), values.std(), *np.quantile(values, [0, .25, .5, .75, 1])]
        got = [stats[name][i].item() for name in STATISTICS]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _mlp(depth: int, members: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    sizes = [6] + [8] * depth + [3]
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"layers.{i}.weight"] = torch.randn(members, b, a, generator=g)
        params[f"layers.{i}.bias"] = torch.randn(members, b, generator=g)
    return MLPKernel(MLPOptions(arch="mlp", width=8, depth=depth)), params


def _data(n: int = 200):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_barrier_is_zero_between_identical_networks():
    kernel, a = _mlp(depth=2, members=4, seed=0)
    x, y = _data()
    out = interpolation_barrier(kernel.forward_shared, a, a, x, y)
    assert torch.allclose(out["loss_barrier"], torch.zeros(4, dtype=torch.float64), atol=1e-6)
    assert torch.equal(out["error_barrier"], torch.zeros(4, dtype=torch.float64))


def test_loss_barrier_of_a_convex_model_is_zero():
    """Softmax regression (an MLP with no hidden layer) has a loss convex in its parameters: the
    loss never rises above the chord, so the max over the line is the endpoint value 0."""
    kernel, a = _mlp(depth=0, members=3, seed=0)
    _, b = _mlp(depth=0, members=3, seed=1)
    x, y = _data()
    out = interpolation_barrier(kernel.forward_shared, a, b, x, y, n_points=21)
    assert torch.allclose(out["loss_barrier"], torch.zeros(3, dtype=torch.float64), atol=1e-5)


def test_stacked_barrier_equals_the_per_pair_computation():
    kernel, a = _mlp(depth=2, members=3, seed=0)
    _, b = _mlp(depth=2, members=3, seed=5)
    x, y = _data()
    out = interpolation_barrier(kernel.forward_shared, a, b, x, y, n_points=5)
    for i in range(3):
        losses, errors = [], []
        for t in np.linspace(0, 1, 5):
            h = x
            for layer in range(3):
                w = (1 - t) * a[f"layers.{layer}.weight"][i] + t * b[f"layers.{layer}.weight"][i]
                c = (1 - t) * a[f"layers.{layer}.bias"][i] + t * b[f"layers.{layer}.bias"][i]
                h = h @ w.T + c
                if layer < 2:
                    h = torch.relu(h)
            losses.append(F.cross_entropy(h, y).item())
            errors.append(1 - (h.argmax(1) == y).double().mean().item())
        for name, path in (("loss", losses), ("error", errors)):
            chord = [(1 - t) * path[0] + t * path[-1] for t in np.linspace(0, 1, 5)]
            want = max(p - c for p, c in zip(path, chord))
            assert out[f"{name}_barrier"][i].item() == pytest.approx(want, abs=1e-5)


def test_a_network_and_its_permutation_have_an_error_barrier():
    """Permuting hidden units keeps the function (both endpoints label every input as the
    network does: error 0), but averaging two different orderings mixes unrelated units, so
    points inside the line make errors: a barrier that must be positive."""
    kernel, a = _mlp(depth=1, members=1, seed=0)
    x, _ = _data()
    y = kernel.forward_shared(a, x)[0].argmax(1)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    b = {"layers.0.weight": a["layers.0.weight"][:, perm],
         "layers.0.bias": a["layers.0.bias"][:, perm],
         "layers.1.weight": a["layers.1.weight"][:, :, perm],
         "layers.1.bias": a["layers.1.bias"]}
    out = interpolation_barrier(kernel.forward_shared, a, b, x, y)
    assert out["error_path"][0, 0] == 0 and out["error_path"][0, -1] == 0
    assert out["error_barrier"][0] > 0.05
