"""resnet's declared permutation symmetries (`ResNetOptions.permutation_symmetries`): permuting
a stage's residual channels across all its blocks, and each block's inner channels, by the
declaration leaves the network's outputs unchanged (the truth it claims), canonical forms agree,
and groupnorm, whose function only within-group permutations keep, is refused in one line."""

import pytest
import torch

from dlstore.analysis.wsl import canonicalize, hidden_layers, random_permutation
from dlstore.architectures.base import UndeclaredProperty, init_state
from dlstore.architectures.registry import parse_arch_options
from dlstore.layout import Layout

DIGITS = (1, 8, 8)


def randomized_state(arch, seed: int) -> dict[str, torch.Tensor]:
    """An initial state with every norm parameter and running statistic moved off its initial
    value (ones, zeros), so that a permutation that forgot one of them would show."""
    state = init_state(arch, DIGITS, 10, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for name, value in state.items():
        if value.dim() == 1 and ".norm" in f".{name}":
            if name.endswith("running_var") or name.endswith(".weight"):
                state[name] = 0.5 + torch.rand(value.shape, generator=gen)
            else:
                state[name] = torch.randn(value.shape, generator=gen)
    return state


def outputs(arch, state: dict[str, torch.Tensor], x: torch.Tensor, train: bool) -> torch.Tensor:
    net = arch.build(DIGITS, 10)
    net.load_state_dict(state)
    net.train(train)
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize("norm", ["batchnorm", "none"])
@pytest.mark.parametrize("stages,blocks", [(2, 2), (3, 1)])
def test_declared_permutations_keep_the_function(norm, stages, blocks):
    arch = parse_arch_options({"arch": "resnet", "width": 4, "stages": stages, "blocks": blocks,
                               "norm": norm, "activation": "relu"})
    states = [randomized_state(arch, seed) for seed in range(3)]
    stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    layers = hidden_layers(Layout.from_state_dict(states[0]), arch)
    # one group per block's inner channels, one per stage's residual stream
    assert len(layers) == stages * blocks + stages
    assert [layer.units for layer in layers[stages * blocks:]] == [4 * 2**s for s in range(stages)]
    # every channel-indexed tensor moves with some group, on axis 0 or 1
    covered = {n for layer in layers for n in layer.incoming + layer.outgoing}
    per_channel = {k for k, v in states[0].items() if v.dim() >= 1 and k != "out.bias"}
    assert covered == per_channel
    permuted = random_permutation(stacked, layers, torch.Generator().manual_seed(0))
    for name in ("stem.weight", f"blocks.{blocks}.conv2.weight", "out.weight"):
        assert not torch.equal(permuted[name], stacked[name])
    x = torch.rand(16, *DIGITS)
    for i in range(3):
        mine = {k: v[i] for k, v in permuted.items()}
        for train in (False, True):  # eval: running statistics; train: the batch's own
            torch.testing.assert_close(outputs(arch, mine, x, train),
                                       outputs(arch, states[i], x, train), atol=1e-5, rtol=0)
    for k, v in canonicalize(permuted, layers).items():
        torch.testing.assert_close(v, canonicalize(stacked, layers)[k], atol=1e-6, rtol=0)


def test_a_stage_permuted_block_by_block_breaks_the_function():
    # the reason the stream is one group: permuting only the first block's output channels
    # (conv2) and what reads them next, not the stem's, changes the outputs
    arch = parse_arch_options({"arch": "resnet", "width": 4, "stages": 1, "blocks": 2,
                               "norm": "none"})
    state = randomized_state(arch, 0)
    perm = torch.tensor([1, 0, 3, 2])
    broken = dict(state)
    broken["blocks.0.conv2.weight"] = state["blocks.0.conv2.weight"][perm]
    broken["blocks.0.conv2.bias"] = state["blocks.0.conv2.bias"][perm]
    broken["blocks.1.conv1.weight"] = state["blocks.1.conv1.weight"][:, perm]
    x = torch.rand(8, *DIGITS)
    assert not torch.allclose(outputs(arch, broken, x, False), outputs(arch, state, x, False),
                              atol=1e-3)


def test_groupnorm_is_refused_in_one_line():
    arch = parse_arch_options({"arch": "resnet", "width": 4, "stages": 2, "norm": "groupnorm",
                               "group_size": 2})
    layout = Layout.from_state_dict(init_state(arch, DIGITS, 10, 0))
    with pytest.raises(UndeclaredProperty, match="groupnorm") as err:
        hidden_layers(layout, arch)
    assert "\n" not in str(err.value)


TINY_RESNETS = """
name = "{name}"
seeds = 2
checkpoints = [0, 4]
[dataset]
name = "digits"
[model]
arch = "resnet"
width = 4
stages = 2
norm = "{norm}"
group_size = 2
[train]
batch_size = 20
steps = 4
lr = 0.05
"""


@pytest.fixture(scope="module")
def resnet_store(tmp_path_factory):
    from dlstore.building.build import build_zoo
    from dlstore.spec import ZooSpec
    from dlstore.store.store import Store

    store = Store(tmp_path_factory.mktemp("resnets") / "store", create=True)
    for norm in ("batchnorm", "groupnorm"):
        build_zoo(ZooSpec.from_text(TINY_RESNETS.format(name=f"rn-{norm}", norm=norm)), store,
                  device="cpu")
    return store


def test_canonical_weights_of_a_built_batchnorm_resnet_are_permutation_invariant(resnet_store):
    from dlstore.analysis.wsl import WeightDataset, runs_architecture

    query = ("SELECT run_id, step FROM checkpoints JOIN runs USING (run_id) "
             "WHERE zoo = 'rn-batchnorm' ORDER BY run_id, step")
    keys = resnet_store.sql(query)
    flat, layout = resnet_store.weights(keys)
    arch = runs_architecture(resnet_store, keys["run_id"].to_list())
    layers = hidden_layers(layout, arch)
    permuted = layout.flatten(random_permutation(layout.unflatten(flat), layers,
                                                 torch.Generator().manual_seed(3)))
    assert not torch.equal(permuted, flat)
    canonical = WeightDataset(resnet_store, query, features="canonical", splits={"train": 0.5,
                              "test": 0.5})
    again = layout.flatten(canonicalize(layout.unflatten(permuted), layers))
    torch.testing.assert_close(again, canonical.features.to(again.dtype), atol=1e-6, rtol=0)


def test_wsl_refuses_canonical_groupnorm_resnets_in_one_line(resnet_store, tmp_path, capsys):
    from tests.test_cli_output import cli

    query = ("SELECT run_id, step FROM checkpoints JOIN runs USING (run_id) "
             "WHERE zoo = 'rn-groupnorm'")
    code, _, err = cli(capsys, "wsl", "fit", "--store", str(resnet_store.root), "--query", query,
                       "--features", "canonical", "--split", "0.5,0,0.5", "--plot",
                       str(tmp_path / "x.png"))
    assert code == 1 and "groupnorm" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
