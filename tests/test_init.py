"""The `[model] init` option: initialisation schemes drawn from the run's init seed."""

import math

import pytest
import torch

from dlstore.architectures.base import init_state
from dlstore.architectures.mlp import MLPOptions
from dlstore.building.plan import plan_cohorts
from tests.test_population import assert_matches_reference, make_spec

SCHEMES = ["kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal", "orthogonal"]


def state(init: str, seed: int = 0, width: int = 64) -> dict[str, torch.Tensor]:
    return init_state(MLPOptions(arch="mlp", width=width, depth=2, init=init), (40,), 10, seed)


def test_default_is_pytorch_init_and_keeps_run_ids():
    assert all(torch.equal(a, b) for a, b in zip(state("default").values(),
                                                 init_state(MLPOptions(arch="mlp", width=64),
                                                            (40,), 10, 0).values()))
    plain = make_spec("lr = 0.1\nsteps = 5", "train.lr = [0.1]")
    explicit = make_spec("lr = 0.1\nsteps = 5", "train.lr = [0.1]", model="init = 'default'")
    assert [r.run_id for r in plain.runs] == [r.run_id for r in explicit.runs]
    other = make_spec("lr = 0.1\nsteps = 5", "train.lr = [0.1]", model="init = 'orthogonal'")
    assert {r.run_id for r in other.runs}.isdisjoint(r.run_id for r in plain.runs)


@pytest.mark.parametrize("init", SCHEMES)
def test_schemes_draw_weights_from_the_init_seed_and_zero_biases(init):
    first = state(init)
    assert all(torch.equal(a, b) for a, b in zip(first.values(), state(init).values()))
    assert not torch.equal(first["layers.0.weight"], state(init, seed=1)["layers.0.weight"])
    assert not torch.equal(first["layers.0.weight"], state("default")["layers.0.weight"])
    for name, value in first.items():
        if name.endswith("bias"):
            assert not value.any()
    w = first["layers.1.weight"]  # 64 x 64
    fan_in, fan_out = w.shape[1], w.shape[0]
    if init == "orthogonal":
        assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)
    elif init == "xavier_uniform":
        assert w.abs().max() <= math.sqrt(6 / (fan_in + fan_out))
    else:
        target = {"kaiming_uniform": math.sqrt(2 / fan_in), "kaiming_normal": math.sqrt(2 / fan_in),
                  "xavier_normal": math.sqrt(2 / (fan_in + fan_out))}[init]
        assert w.std().item() == pytest.approx(target, rel=0.1)


def test_initialisations_share_a_cohort_and_match_the_reference():
    spec = make_spec("optimizer = 'sgd'\nlr = 0.05\nbatch_size = 25\nsteps = 10",
                     "model.init = ['default', 'kaiming_normal', 'orthogonal']", seeds=1)
    assert len(plan_cohorts(list(spec.runs), cohort_size=64)) == 1
    assert_matches_reference(spec)
