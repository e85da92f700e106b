"""The 2-D image networks (`cnn2d`, `resnet`) and buffers in a cohort: shapes and sizes, exact
padding, permutation symmetries, dropout that a member draws for itself, BatchNorm's running
statistics trained as buffers (against the plain loop and `nn.BatchNorm2d`), and a built store
(load_model, lottery tickets). Images come from scikit-learn's digits, [1, 8, 8]."""

import copy
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlstore.analysis.wsl import canonicalize, hidden_layers, random_permutation
from dlstore.architectures.base import Architecture, init_state, n_params
from dlstore.architectures.kernels import VmapKernel
from dlstore.architectures.registry import parse_arch_options
from dlstore.architectures.resnet import BatchNorm2d
from dlstore.building.build import build_zoo
from dlstore.building.plan import cohort_plan, plan_build, plan_cohorts
from dlstore.datasets.base import run_data
from dlstore.errors import SpecError
from dlstore.layout import Layout
from dlstore.metrics.hessian import hessian_vector_product
from dlstore.spec import ZooSpec
from dlstore.stacks import pad_stack
from dlstore.store.store import Store
from dlstore.training.cohort import CohortTrainer
from dlstore.training.reference import train_reference
from tests.test_population import ATOL, assert_matches_reference, train_cohorts

DIGITS = (1, 8, 8)


def image_spec(model: str, grid: str = "train.lr = [0.05]", train: str = "", seeds: int = 2,
               checkpoints: str = '"every:5"', dataset: str = "", extra: str = "") -> ZooSpec:
    return ZooSpec.from_text(textwrap.dedent(f"""
        name = "img"
        seeds = {seeds}
        checkpoints = {checkpoints}
        [dataset]
        name = "digits"
        {dataset}
        [model]
        {model}
        [train]
        batch_size = 20
        steps = 15
        lr = 0.05
        {train}
        [grid]
        {grid}
    """) + textwrap.dedent(extra))


def options(**raw) -> Architecture:
    return parse_arch_options(raw)


# -- shapes, sizes, declarations ---------------------------------------------------------------

def test_cnn2d_defaults_are_the_small_cnn_zoo_network():
    # Unterthiner et al. 2020: 3 convs of 16 channels, 3x3, stride 2, GAP, linear 16 -> 10
    cnn = options(arch="cnn2d")
    net = cnn.build((1, 28, 28), 10)
    assert n_params(cnn, (1, 28, 28), 10) == cnn.size((1, 28, 28), 10).params == 4970
    assert [tuple(c.weight.shape) for c in net.convs] == [(16, 1, 3, 3)] + [(16, 16, 3, 3)] * 2
    assert [c.stride for c in net.convs] == [(2, 2)] * 3
    assert tuple(net.out.weight.shape) == (10, 16)
    x = torch.randn(2, 1, 28, 28)
    assert net.features(x).shape == (2, 16) and net(x).shape == (2, 10)


@pytest.mark.parametrize("arch", ["cnn2d", "resnet"])
@pytest.mark.parametrize("shape", [(784,), (28, 28), (1, 1, 28, 28)])
def test_inputs_that_are_no_images_are_one_line(arch, shape):
    with pytest.raises(SpecError) as e:
        options(arch=arch).build(shape, 10)
    message = str(e.value)
    assert f"{arch} needs image inputs [C, H, W]" in message and str(list(shape)) in message
    assert "\n" not in message


def test_a_spec_pairing_an_image_network_with_sequences_fails_before_training():
    spec = ZooSpec.from_text(textwrap.dedent("""
        name = "bad"
        [dataset]
        name = "mnist1d"
        num_samples = 200
        [model]
        arch = "cnn2d"
        [train]
        batch_size = 20
        steps = 2
    """))
    with pytest.raises(SpecError, match=r"cnn2d needs image inputs \[C, H, W\], the dataset "
                                        r"gives \[40\]"):
        plan_build(spec, "cpu")


def test_groupnorm_widths_must_be_whole_groups():
    with pytest.raises(SpecError, match="multiple of group_size 8"):
        options(arch="resnet", norm="groupnorm", width=12)
    assert options(arch="resnet", norm="groupnorm", width=12, group_size=4).width == 12


@pytest.mark.parametrize("raw, shape, n_classes", [
    ({"arch": "cnn2d"}, (1, 28, 28), 10),
    ({"arch": "cnn2d", "width": 5, "depth": 6, "dropout": 0.2}, (3, 9, 7), 4),  # reaches 1x1
    ({"arch": "cnn2d", "width": 3, "depth": 1}, (2, 32, 32), 10),
    ({"arch": "resnet"}, (1, 28, 28), 10),
    ({"arch": "resnet", "norm": "none", "blocks": 3}, (3, 32, 32), 10),  # ResNet-20
    ({"arch": "resnet", "norm": "groupnorm", "width": 8, "stages": 2, "blocks": 2,
      "group_size": 4}, DIGITS, 10),
    ({"arch": "resnet", "width": 4, "stages": 5}, DIGITS, 3),  # maps of 1x1
])
def test_counted_sizes_match_the_built_network(raw, shape, n_classes):
    arch = options(**raw)
    counted = arch.size(shape, n_classes)
    built = Architecture.size(arch, shape, n_classes)  # the module, built and run
    assert (counted.params, counted.activations) == (built.params, built.activations)


def test_deep_networks_are_counted_without_a_loop_over_layers():
    assert options(arch="cnn2d", depth=10**9).size((1, 28, 28), 10).params > 2320 * 10**8
    assert options(arch="resnet", blocks=10**9).size(DIGITS, 10).params > 10**13


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm"])
def test_an_init_scheme_draws_kernels_and_leaves_norm_scales_at_one(norm):
    arch = options(arch="resnet", norm=norm, init="orthogonal")
    state = init_state(arch, DIGITS, 10, 0)
    default = init_state(options(arch="resnet", norm=norm), DIGITS, 10, 0)
    assert not torch.equal(state["stem.weight"], default["stem.weight"])
    for k, v in state.items():
        if k.endswith("norm1.weight") or k == "norm.weight":
            assert torch.equal(v, torch.ones_like(v)), k
        elif k.endswith(".bias") or k.endswith("running_mean"):
            assert torch.count_nonzero(v) == 0, k


def test_prunable_tensors_are_kernels_and_the_classifier_never_buffers():
    for raw in ({"arch": "cnn2d", "dropout": 0.5}, {"arch": "resnet", "blocks": 2}):
        arch = options(**raw)
        state = init_state(arch, DIGITS, 10, 0)
        buffers = VmapKernel(arch, DIGITS, 10).buffers
        assert buffers  # running statistics, counters; dropout seed and counter
        names = arch.prunable_tensors(state)
        assert names[-1] == "out.weight" and not set(names) & set(buffers)
        assert all(state[k].dim() in (2, 4) for k in names)


def test_a_mask_on_a_buffer_is_refused():
    spec = image_spec('arch = "resnet"\nwidth = 4\nstages = 1', seeds=1)
    runs, datas = plan_cohorts(list(spec.runs), cohort_size=4)[0]
    plan = cohort_plan(runs, datas)
    init = plan.members[0].init
    plan.members[0].mask = {"blocks.0.norm1.running_var":
                            torch.ones_like(init["blocks.0.norm1.running_var"], dtype=torch.bool)}
    with pytest.raises(ValueError, match="pruning masks name buffers"):
        next(CohortTrainer(plan).run())


# -- padding: a narrower network is the zero-padded corner of a wider one ---------------------

def _pad_into(narrow: dict, wide: dict, axes: dict) -> dict:
    return {k: pad_stack([narrow[k], torch.zeros_like(v)], axes[k])[0][0] for k, v in wide.items()}


@pytest.mark.parametrize("raw, widths", [
    ({"arch": "cnn2d", "activation": "tanh"}, (3, 8)),
    ({"arch": "cnn2d", "dropout": 0.4}, (3, 8)),
    ({"arch": "resnet", "stages": 2}, (3, 8)),
    ({"arch": "resnet", "stages": 2, "norm": "groupnorm", "group_size": 4}, (4, 12)),
    ({"arch": "resnet", "stages": 2, "norm": "none", "activation": "gelu"}, (3, 8)),
])
def test_zero_padding_changes_nothing_the_narrow_network_computes(raw, widths):
    narrow_opts, wide_opts = (options(**raw, width=w) for w in widths)
    narrow = narrow_opts.build(DIGITS, 10)
    narrow.load_state_dict(init_state(narrow_opts, DIGITS, 10, 0))
    wide = wide_opts.build(DIGITS, 10)
    shapes = {k: tuple(v.shape) for k, v in wide.state_dict().items()}
    wide.load_state_dict(_pad_into(narrow.state_dict(), wide.state_dict(),
                                   wide_opts.padded_axes(shapes)))
    x = torch.rand(16, *DIGITS)
    for _ in range(2):  # train mode (batch statistics, dropout), twice: buffers move
        torch.testing.assert_close(wide(x), narrow(x), atol=1e-6, rtol=0)
    wide.eval(), narrow.eval()
    torch.testing.assert_close(wide(x), narrow(x), atol=1e-6, rtol=0)
    for k, v in wide.state_dict().items():  # padding held at zero, buffers included
        true = narrow.state_dict()[k]
        corner = tuple(slice(0, n) for n in true.shape)
        assert torch.equal(v[corner], true), k
        padding = v.clone()
        padding[corner] = 0
        assert torch.count_nonzero(padding) == 0, k


@pytest.mark.parametrize("model", [
    'arch = "cnn2d"',
    'arch = "resnet"\nstages = 2\nactivation = "gelu"',  # BatchNorm (see test_population)
    # the other norms: minutes on two cores, in `make test-slow`
    pytest.param('arch = "resnet"\nstages = 2\nnorm = "groupnorm"\ngroup_size = 2',
                 marks=pytest.mark.slow),
    pytest.param('arch = "resnet"\nstages = 2\nnorm = "none"', marks=pytest.mark.slow),
])
def test_mixed_widths_share_one_cohort_and_match_the_unpadded_reference(model):
    # widths 2 and 6 (stages of 2-12 channels) are also the ones whose reference runs crashed
    # in oneDNN before image inputs were copied into the standard layout (cnn2d.standard_layout)
    spec = image_spec(model, "model.width = [2, 6]\ntrain.lr = [0.05, 0.1]", seeds=1,
                      train="momentum = 0.9\nweight_decay = 0.01")
    [(runs, _)] = plan_cohorts(list(spec.runs), cohort_size=8)
    assert len(runs) == 4
    assert_matches_reference(spec)


# -- permutation symmetries --------------------------------------------------------------------

def test_cnn2d_channel_permutations_keep_the_function_and_canonicalize_alike():
    arch = options(arch="cnn2d", width=6)
    states = [init_state(arch, DIGITS, 10, seed) for seed in range(3)]
    stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    layers = hidden_layers(Layout.from_state_dict(states[0]), arch)
    assert [(layer.units, layer.outgoing, layer.block) for layer in layers] == [
        (6, ("convs.1.weight",), 1), (6, ("convs.2.weight",), 1), (6, ("out.weight",), 1)]
    permuted = random_permutation(stacked, layers, torch.Generator().manual_seed(0))
    assert not torch.equal(permuted["convs.0.weight"], stacked["convs.0.weight"])
    kernel = VmapKernel(arch, DIGITS, 10)
    x = torch.rand(8, *DIGITS)
    torch.testing.assert_close(kernel.forward_shared(permuted, x),
                               kernel.forward_shared(stacked, x), atol=1e-6, rtol=0)
    for k, v in canonicalize(permuted, layers).items():
        torch.testing.assert_close(v, canonicalize(stacked, layers)[k], atol=1e-7, rtol=0)


# -- dropout -----------------------------------------------------------------------------------

def test_cnn2d_dropout_matches_the_reference_and_is_the_members_own():
    # the masks hash the network's own seed and forward count: the same in any cohort and alone
    spec = image_spec('arch = "cnn2d"\nwidth = 8\ndropout = 0.3', "train.lr = [0.05, 0.2]")
    assert_matches_reference(spec)
    together = train_cohorts(spec)
    target = spec.runs[2]
    runs, datas = plan_cohorts([target], cohort_size=1)[0]
    alone = {ck.step: ck.params for ck in CohortTrainer(cohort_plan(runs, datas)).run()}
    for name, value in alone[15].items():
        torch.testing.assert_close(value[0], together[target.run_id][15][name], atol=ATOL,
                                   rtol=0)
    assert int(alone[15]["dropout.calls"][0]) == 15  # one training forward a step
    undropped = image_spec('arch = "cnn2d"\nwidth = 8', "train.lr = [0.05, 0.2]")
    plain = train_cohorts(undropped)[undropped.runs[2].run_id][15]
    assert not torch.allclose(plain["out.weight"], together[target.run_id][15]["out.weight"])


def test_dropout_draws_fresh_masks_each_step_and_none_in_eval_mode():
    arch = options(arch="cnn2d", width=64, dropout=0.5, activation="tanh")
    net = arch.build(DIGITS, 10)
    net.load_state_dict(init_state(arch, DIGITS, 10, 0))
    x = torch.rand(32, *DIGITS)
    first, second = net.features(x), net.features(x)
    dropped = first == 0
    assert 0.4 < dropped.double().mean() < 0.6 and not torch.equal(dropped, second == 0)
    other = arch.build(DIGITS, 10)
    other.load_state_dict(init_state(arch, DIGITS, 10, 1))
    assert other.dropout.seed != net.dropout.seed  # each network its own noise
    net.eval()
    assert torch.equal(net(x), net(x)) and int(net.dropout.calls) == 2


# -- BatchNorm as buffers ----------------------------------------------------------------------

def test_written_out_batchnorm_is_torch_batchnorm():
    ours, torchs = BatchNorm2d(6), nn.BatchNorm2d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2), ours.bias.uniform_(-1, 1)
    torchs.load_state_dict(ours.state_dict())
    for step in range(5):
        x = torch.randn(10, 6, 5, 5) * (step + 1) + step
        torch.testing.assert_close(ours(x), torchs(x), atol=1e-5, rtol=1e-5)
    for k, v in torchs.state_dict().items():  # momentum 0.1, unbiased running variance
        torch.testing.assert_close(ours.state_dict()[k], v, atol=1e-5, rtol=1e-6)
    assert int(ours.num_batches_tracked) == 5
    ours.eval(), torchs.eval()
    x = torch.randn(10, 6, 5, 5)
    torch.testing.assert_close(ours(x), torchs(x), atol=1e-5, rtol=1e-5)


def test_one_cohort_step_gives_each_member_its_module_step():
    # losses, gradients and the buffers one train-mode forward leaves, member by member
    arch = options(arch="resnet", width=4, blocks=2)
    nets = [arch.build(DIGITS, 10) for _ in range(3)]
    for seed, net in enumerate(nets):
        net.load_state_dict(init_state(arch, DIGITS, 10, seed))
    kernel = VmapKernel(arch, DIGITS, 10)
    state = {k: torch.stack([n.state_dict()[k] for n in nets]) for k in nets[0].state_dict()}
    x, y = torch.rand(3, 16, *DIGITS), torch.randint(0, 10, (3, 16))
    losses, grads, buffers = kernel.loss_grads_and_buffers(state, x, y)
    assert set(grads) == {k for k, _ in nets[0].named_parameters()}
    assert set(buffers) == set(kernel.buffers) == {k for k, _ in nets[0].named_buffers()}
    for i, net in enumerate(nets):
        loss = F.cross_entropy(net(x[i]), y[i])
        loss.backward()
        torch.testing.assert_close(losses[i], loss.detach(), atol=1e-6, rtol=0)
        for k, p in net.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, atol=1e-6, rtol=0)
        for k, b in net.named_buffers():
            torch.testing.assert_close(buffers[k][i], b, atol=1e-6, rtol=0)
    assert (buffers["norm.num_batches_tracked"] == 1).all()


@pytest.mark.slow  # a minute on two cores; BatchNorm's cohort equivalence stays in the default run
def test_batchnorm_relu_resnet_matches_the_reference():
    # BatchNorm with ReLU in a cohort. The buffers are the module's own (its train-mode
    # forward updates them), and a member's step is the module's step (the test above), yet
    # at 1e-5 this holds only where no ReLU flips: vmap's grouped convolutions round 1e-7
    # apart from the plain ones, BatchNorm centres pre-activations on the kink, and a
    # pre-activation within rounding of 0 flips now and then (on digits, 5 of 36 runs of 15
    # steps at lr 0.02-0.2 flipped one, with or without momentum and weight decay); the
    # flipped unit moves that step's gradient ~1e-3 and training amplifies it. With GELU or
    # tanh (no kink) the same runs stay within 2e-5, at lr <= 0.05 within 5e-7. These two
    # runs flip nothing: 3e-7 at most.
    spec = image_spec('arch = "resnet"', "train.lr = [0.05]")
    assert_matches_reference(spec)


def test_cohort_members_in_eval_mode_give_the_reference_outputs():
    spec = image_spec('arch = "resnet"\nwidth = 8\nstages = 2', "train.lr = [0.05]",
                      checkpoints="[15]")
    runs, datas = plan_cohorts(list(spec.runs), cohort_size=4)[0]
    plan = cohort_plan(runs, datas)
    [last] = list(CohortTrainer(plan).run())
    x = plan.x_test[:64]
    cohort = last.evaluator.kernel.forward_shared(last.params, x)
    for i, run in enumerate(runs):
        state = train_reference(run, run_data(run.dataset, run.seed))[15]
        reference = run.model.build(DIGITS, 10)
        reference.load_state_dict(state)
        torch.testing.assert_close(cohort[i], reference.eval()(x), atol=1e-5, rtol=0)
        # the same state dict in torch's own BatchNorm2d modules
        torchs = copy.deepcopy(reference)
        for name, module in list(torchs.named_modules()):
            if isinstance(module, BatchNorm2d):
                parent, _, leaf = name.rpartition(".")
                setattr(torchs.get_submodule(parent), leaf, nn.BatchNorm2d(module.num_features))
        torchs.load_state_dict({k: v[i] for k, v in last.params.items()})
        assert type(torchs.norm) is nn.BatchNorm2d
        torch.testing.assert_close(cohort[i], torchs.eval()(x), atol=1e-5, rtol=0)


def test_buffers_are_trained_but_never_optimized():
    # lr 1e-30: the parameters stay where they start (to 1e-25), the running statistics move
    # anyway; that weight decay never touches them the reference equivalence with decay shows
    spec = image_spec('arch = "resnet"\nwidth = 4\nstages = 1', "train.lr = [1e-30]", seeds=1,
                      train="weight_decay = 0.5\nmomentum = 0.9", checkpoints="[0, 15]")
    runs, datas = plan_cohorts(list(spec.runs), cohort_size=4)[0]
    first, last = CohortTrainer(cohort_plan(runs, datas)).run()
    kernel = first.evaluator.kernel
    for k in first.params:
        if k in kernel.buffers:
            assert not torch.equal(first.params[k], last.params[k]), k
        else:
            torch.testing.assert_close(first.params[k], last.params[k], atol=1e-25, rtol=0)
    assert int(last.params["blocks.0.norm1.num_batches_tracked"][0]) == 15
    # weight metrics leave the buffers out
    weights = [v for k, v in last.params.items() if k not in kernel.buffers]
    norm = torch.sqrt(sum(v.double().pow(2).sum() for v in weights))
    assert float(last.metrics["weight_norm"][0]) == pytest.approx(float(norm), rel=1e-9)
    assert not any(isinstance(k, tuple) and k[1] in kernel.buffers for k in last.metrics)


def test_a_diverged_members_buffers_freeze():
    spec = image_spec('arch = "resnet"\nwidth = 4\nstages = 1', "train.lr = [0.05, 1e6]",
                      seeds=1, train="momentum = 0.9", checkpoints='"every:1"')
    runs, datas = plan_cohorts(list(spec.runs), cohort_size=4)[0]
    trainer = CohortTrainer(cohort_plan(runs, datas))
    checkpoints = list(trainer.run())
    blown = [r.train.lr for r in runs].index(1e6)
    diverged_at = int(trainer.diverged_step[blown])
    assert 0 <= diverged_at < 14
    after = [ck for ck in checkpoints if ck.step > diverged_at]
    for name in trainer.kernel.buffers:
        torch.testing.assert_close(after[0].params[name][blown], after[-1].params[name][blown],
                                   equal_nan=True, atol=0, rtol=0)
    assert int(after[-1].params["norm.num_batches_tracked"][1 - blown]) == 15


def test_the_hessian_holds_buffers_fixed():
    # Hessian-vector products of the eval-mode loss in the parameters, running statistics
    # held where they are, against double backward through the plain module
    arch = options(arch="resnet", width=4, stages=1)
    net = arch.build(DIGITS, 10)
    state = init_state(arch, DIGITS, 10, 0)
    net.load_state_dict(state)
    net.train()(torch.rand(32, *DIGITS))  # running statistics away from their start
    net.eval()
    kernel = VmapKernel(arch, DIGITS, 10)
    params = {k: v.detach()[None] for k, v in net.named_parameters()}
    fixed = {k: v[None] for k, v in net.named_buffers()}
    vector = {k: torch.randn_like(v) for k, v in params.items()}
    x, y = torch.rand(16, *DIGITS), torch.randint(0, 10, (16,))

    def loss_one(p, x, y, w):
        return (F.cross_entropy(kernel.forward_one(p, x), y, reduction="none") * w).sum() / w.sum()

    hv = hessian_vector_product(loss_one)(params, vector, x, y[None], torch.ones(1, 16), fixed)
    loss = F.cross_entropy(net(x), y)
    weights = [p for _, p in net.named_parameters()]
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    dot = sum((g * vector[k][0]).sum() for (k, _), g in zip(net.named_parameters(), grads))
    for (k, _), h in zip(net.named_parameters(), torch.autograd.grad(dot, weights)):
        torch.testing.assert_close(hv[k][0], h, atol=1e-5, rtol=1e-4)


# -- a built store -----------------------------------------------------------------------------

IMAGE_ZOO = """
    name = "{arch}"
    seeds = 2
    checkpoints = "log:3"
    [dataset]
    name = "digits"
    n_train = 600
    [model]
    arch = "{arch}"
    {model}
    [train]
    lr = 0.2
    momentum = 0.9
    batch_size = 32
    epochs = 4
    [grid]
    model.width = [4, 8]
"""


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("images") / "s", create=True)
    specs = [ZooSpec.from_text(textwrap.dedent(IMAGE_ZOO.format(arch=arch, model=model)))
             for arch, model in (("cnn2d", "dropout = 0.2"), ("resnet", "stages = 2"))]
    for spec in specs:
        report = build_zoo(spec, store, device="cpu")
        assert report.runs_built == len(spec.runs) == 4
    return store, specs


def test_load_model_reproduces_the_stored_test_accuracy(image_store):
    store, specs = image_store
    final = {r["run_id"]: r["value"] for r in store.sql(
        "SELECT run_id, value FROM final WHERE metric = 'test_acc'").to_dicts()}
    for run in (r for spec in specs for r in spec.runs):
        model = store.load_model(run.run_id)
        assert not model.training
        data = store.load_dataset(run.run_id)
        with torch.no_grad():
            acc = (model(data["x_test"]).argmax(1) == data["y_test"]).double().mean().item()
        assert acc == pytest.approx(final[run.run_id], abs=1e-9)
        assert final[run.run_id] > 0.2  # above chance (0.1): it learned in 4 epochs


def test_stored_checkpoints_hold_the_buffers(image_store):
    store, specs = image_store
    for run in specs[1].runs:
        final_step = store.run(run.run_id)["final_step"]
        state = store.load_state_dict(run.run_id)
        assert int(state["norm.num_batches_tracked"]) == final_step
        assert state["norm.running_var"].shape == (2 * run.model.width,)
        assert not torch.equal(state["norm.running_var"], torch.ones(2 * run.model.width))
    for run in specs[0].runs:
        assert int(store.load_state_dict(run.run_id)["dropout.calls"]) > 0


@pytest.mark.slow  # builds of a few minutes; tickets of cnn1d are in the default run
@pytest.mark.parametrize("arch, model", [("cnn2d", ""), ("resnet", "stages = 2")])
def test_lottery_tickets_build(tmp_path, arch, model):
    spec = ZooSpec.from_text(textwrap.dedent(IMAGE_ZOO.format(arch=arch, model=model)).replace(
        "seeds = 2", "seeds = 1").replace("model.width = [4, 8]", "model.width = [4]")
        + textwrap.dedent("""
        [tickets]
        levels = 1
        rewind_steps = [0]
        stability = true
    """))
    store = Store(tmp_path / "s", create=True)
    report = build_zoo(spec, store, device="cpu")
    assert report.runs_built == report.runs_total >= 3
    masks = store.sql("SELECT mask_id, tensor_names FROM masks").to_dicts()
    arch_options = spec.runs[0].model
    names = arch_options.prunable_tensors(init_state(arch_options, DIGITS, 10, 0))
    assert masks and all(m["tensor_names"] == names for m in masks)
    rows = store.sql("SELECT c.run_id, c.step, r.mask_id FROM checkpoints c "
                     "JOIN runs r USING (run_id) WHERE r.level > 0").to_dicts()
    for row in rows:
        state = store.load_state_dict(row["run_id"], row["step"])
        for name, keep in store.load_mask(row["mask_id"]).items():
            assert torch.count_nonzero(state[name][~keep]) == 0
    barriers = store.sql("SELECT count(*) AS n FROM group_metrics "
                         "WHERE metric = 'test_error_barrier'").to_dicts()
    assert barriers[0]["n"] >= 1
