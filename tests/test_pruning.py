"""Masks: exact counts per level, output layer at half the rate, controls with equal counts, and
pruned weights that stay exactly zero in the weights and the optimizer state."""

import pytest
import torch

from dlstore.experiments.pruning import (
    apply_mask,
    density,
    full_mask,
    magnitude_prune,
    prunable,
    random_mask_like,
    removed_count,
)
from dlstore.training.optim import StackedOptimizer
from dlstore.training.plan import MemberPlan


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.weight": (30, 10), "layers.0.bias": (30,), "layers.1.weight": (20, 30),
              "layers.1.bias": (20,), "layers.2.weight": (5, 20), "layers.2.bias": (5,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def expected_counts(sizes: list[int], levels: int, fraction: float) -> list[int]:
    counts, n = [], sum(sizes)
    for _ in range(levels):
        n -= removed_count(fraction, n)
        counts.append(n)
    return counts


def test_prunable_tensors_are_weights_not_biases():
    assert prunable(state()) == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_densities_per_level_are_exact_with_the_output_layer_at_half_rate(scope):
    mask = full_mask(state())
    kept = []
    for level in range(1, 9):
        # fresh weights each level, as after retraining; the mask must still only shrink
        previous = mask
        mask = magnitude_prune(mask, state(level), 0.2, 0.1, scope)
        assert all(bool((mask[k] <= previous[k]).all()) for k in mask)
        kept.append({k: int(m.sum()) for k, m in mask.items()})
    output = [k["layers.2.weight"] for k in kept]
    assert output == expected_counts([100], 8, 0.1)  # the output layer alone, at 10 %
    if scope == "global":
        hidden = [k["layers.0.weight"] + k["layers.1.weight"] for k in kept]
        assert hidden == expected_counts([300, 600], 8, 0.2)
    else:
        for name, size in (("layers.0.weight", 300), ("layers.1.weight", 600)):
            assert [k[name] for k in kept] == expected_counts([size], 8, 0.2)
    total = sum(kept[-1].values()) / 1000
    assert density(mask) == pytest.approx(total)
    # 0.8^8 = 16.8 % of the 900 hidden weights, 0.9^8 = 43 % of the 100 output weights
    assert 0.19 < total < 0.20


def test_magnitude_pruning_removes_the_smallest_and_breaks_ties_by_position():
    weights = {"a.weight": torch.tensor([[0.5, -0.1, 0.1, 2.0]]),
               "out.weight": torch.tensor([[1.0, -3.0]])}
    mask = magnitude_prune(full_mask(weights), weights, 0.5, 0.5, "global")
    assert mask["a.weight"].tolist() == [[True, False, False, True]]
    assert mask["out.weight"].tolist() == [[False, True]]
    once = magnitude_prune(full_mask(weights), weights, 0.25, 0.0, "global")
    # one of four: |-0.1| and |0.1| tie, the first by position goes
    assert once["a.weight"].tolist() == [[True, False, True, True]]


def test_random_mask_keeps_each_tensors_count():
    mask = magnitude_prune(full_mask(state()), state(1), 0.6, 0.3, "global")
    other = random_mask_like(mask, seed=5)
    assert {k: int(m.sum()) for k, m in other.items()} == {k: int(m.sum()) for k, m in
                                                            mask.items()}
    assert any(not torch.equal(other[k], mask[k]) for k in mask)
    assert all(torch.equal(other[k], v) for k, v in random_mask_like(mask, seed=5).items())


def test_apply_mask_zeroes_exactly_the_pruned_weights():
    weights = state()
    mask = magnitude_prune(full_mask(weights), weights, 0.5, 0.25, "layerwise")
    out = apply_mask(weights, mask)
    for k in mask:
        assert torch.equal(out[k] != 0, mask[k])
    assert torch.equal(out["layers.0.bias"], weights["layers.0.bias"])


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_pruned_entries_stay_zero_in_weights_and_optimizer_state(kind):
    weights = state()
    mask = magnitude_prune(full_mask(weights), weights, 0.5, 0.25, "global")
    members = [MemberPlan("a", weights, torch.zeros(4, dtype=torch.long), 0, lr=0.1,
                          weight_decay=0.01, momentum=0.9)]
    params = {k: v.unsqueeze(0).clone() * (mask[k] if k in mask else 1) for k, v in
              weights.items()}
    masks = {k: mask[k].unsqueeze(0).float() for k in mask}
    optimizer = StackedOptimizer(kind, members, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        optimizer.step(params, grads, 1.0, masks=masks)
    for k in mask:
        pruned = ~mask[k].unsqueeze(0)
        assert torch.count_nonzero(params[k][pruned]) == 0
        assert torch.count_nonzero(optimizer.state1[k][pruned]) == 0
        if kind == "adam":
            assert torch.count_nonzero(optimizer.state2[k][pruned]) == 0
        assert torch.count_nonzero(params[k][~pruned]) == int((~pruned).sum())  # the rest trained
