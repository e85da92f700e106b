"""The `[model] init_scale` option: a factor on every weight matrix / kernel the init scheme
draws (the init's scale, an axis of the Small CNN Zoo), validated, out of run ids at its default,
and trained in one cohort with other scales exactly as the plain loop trains it."""

import pytest
import torch

from dlstore.architectures.base import init_state
from dlstore.architectures.mlp import MLPOptions
from dlstore.building.plan import plan_cohorts
from dlstore.errors import SpecError
from tests.test_population import assert_matches_reference, make_spec


def state(init: str, scale: float, width: int = 32) -> dict[str, torch.Tensor]:
    return init_state(MLPOptions(arch="mlp", width=width, init=init, init_scale=scale), (40,),
                      10, 0)


@pytest.mark.parametrize("init", ["default", "xavier_normal", "orthogonal"])
def test_scale_multiplies_the_weights_and_leaves_biases(init):
    plain, scaled = state(init, 1.0), state(init, 0.25)
    for name, value in plain.items():
        if value.dim() >= 2:
            torch.testing.assert_close(scaled[name], 0.25 * value, rtol=1e-6, atol=0)
            assert not torch.equal(scaled[name], value)
        else:  # PyTorch's bias draw under "default", zeros under a scheme: never scaled
            assert torch.equal(scaled[name], value)


def test_default_scale_keeps_run_ids_and_other_scales_rename():
    plain = make_spec("lr = 0.1\nsteps = 5", "train.lr = [0.1]")
    explicit = make_spec("lr = 0.1\nsteps = 5", "train.lr = [0.1]", model="init_scale = 1.0")
    assert [r.run_id for r in plain.runs] == [r.run_id for r in explicit.runs]
    other = make_spec("lr = 0.1\nsteps = 5", "train.lr = [0.1]", model="init_scale = 2.0")
    assert {r.run_id for r in other.runs}.isdisjoint(r.run_id for r in plain.runs)


@pytest.mark.parametrize("bad", ["0", "-1.0", "1e9", "'big'", "nan"])
def test_bad_scales_are_one_line_errors(bad):
    with pytest.raises(SpecError, match="init_scale") as err:
        make_spec("lr = 0.1\nsteps = 5", "train.lr = [0.1]", model=f"init_scale = {bad}")
    assert "\n" not in str(err.value)


def test_scales_share_a_cohort_and_match_the_reference():
    spec = make_spec("optimizer = 'sgd'\nlr = 0.05\nbatch_size = 25\nsteps = 10",
                     "model.init_scale = [0.5, 1.0, 3.0]\n"
                     "model.init = ['default', 'kaiming_normal']",
                     seeds=1)
    assert len(plan_cohorts(list(spec.runs), cohort_size=64)) == 1
    assert_matches_reference(spec)
