"""The fused convolution kernel (dlstore.architectures.fused) against autograd through the
networks' own modules: cnn1d's, and a small 2-D network of the shape cnn2d takes (3x3
convolutions at stride 2, global average pooling, a linear classifier)."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from dlstore.architectures.base import init_state
from dlstore.architectures.cnn1d import CNN1dOptions
from dlstore.architectures.cnn2d import GENERIC_BELOW, CNN2dOptions
from dlstore.architectures.fused import ConvLayer, ConvNetKernel
from dlstore.architectures.kernels import VmapKernel
from dlstore.building.plan import cohort_plan, plan_cohorts
from dlstore.training.cohort import CohortTrainer
from tests.test_image_models import DIGITS, image_spec
from tests.test_population import assert_tickets_match_reference, rewind_and_prune

# float32 sums in another order than autograd's; the differences seen are ~1e-7
ATOL = 1e-5


def stacked(states: list[dict[str, torch.Tensor]], noise: float = 0.1, seed: int = 0):
    """Members' states stacked [P, ...], moved off their init so that no unit is dead."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.stack([s[k] for s in states])
            + noise * torch.randn((len(states), *states[0][k].shape), generator=g)
            for k in states[0]}


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def cnn1d_members(options: CNN1dOptions, shape, n_classes: int, members: int):
    return stacked([init_state(options, shape, n_classes, seed) for seed in range(members)])


CNN1D = [  # options, input shape
    (dict(width=4, depth=2, kernel=5), (40,)),  # the zoo's MNIST-1D network
    (dict(width=3, depth=3, kernel=4, activation="gelu"), (2, 17)),  # even kernel, channels
    (dict(width=5, depth=9, kernel=9, activation="tanh"), (3,)),  # the length reaches 1
    (dict(width=3, depth=1, kernel=3), (2, 11)),  # one layer: the first is the last
    (dict(width=6, depth=4, kernel=2), (40,)),
]


@pytest.mark.parametrize("fields, shape", CNN1D)
def test_cnn1d_kernel_matches_autograd_through_the_module(fields, shape):
    options = CNN1dOptions(arch="cnn1d", **fields)
    fast, reference = options.cohort_kernel(shape, 5), VmapKernel(options, shape, 5)
    assert isinstance(fast, ConvNetKernel)
    params = cnn1d_members(options, shape, 5, members=6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((6, 7, *shape), generator=g)  # each member its own batch
    y = torch.randint(0, 5, (6, 7), generator=g)
    assert_kernels_agree(fast, reference, params, x, y, torch.randn((11, *shape), generator=g))


def assert_kernels_agree(fast, reference, params, x, y, shared):
    """Losses, gradients, shared logits and features, and one member's logits of two kernels."""
    losses, grads = fast.loss_and_grads(params, x, y)
    want_losses, want_grads = reference.loss_and_grads(params, x, y)
    assert_close(losses, want_losses)
    assert list(grads) == list(params)
    for name in params:
        assert_close(grads[name], want_grads[name])
    assert_close(fast.forward_shared(params, shared), reference.forward_shared(params, shared))
    assert_close(fast.features_shared(params, shared),
                 reference.features_shared(params, shared))
    one = {k: v[1] for k, v in params.items()}
    assert_close(fast.forward_one(one, shared), reference.forward_one(one, shared))
    assert fast.classifier == reference.classifier == "out"


def test_members_in_chunks_give_what_the_cohort_at_once_gives():
    options = CNN1dOptions(arch="cnn1d", width=4, depth=3, kernel=5)
    params = cnn1d_members(options, (40,), 10, members=5)
    x, y = torch.randn(5, 9, 40), torch.randint(0, 10, (5, 9))
    whole = options.cohort_kernel((40,), 10)
    whole.chunk_bytes = 2**40
    one_by_one = options.cohort_kernel((40,), 10)
    one_by_one.chunk_bytes = 1
    assert len(one_by_one._chunks(one_by_one._geometries(params), 5, 9, x.device)) == 5
    losses, grads = whole.loss_and_grads(params, x, y)
    chunked_losses, chunked = one_by_one.loss_and_grads(params, x, y)
    assert_close(chunked_losses, losses)
    for name in grads:
        assert_close(chunked[name], grads[name])
    assert_close(one_by_one.forward_shared(params, x[0]), whole.forward_shared(params, x[0]))


def test_a_narrower_member_zero_padded_computes_what_it_computes_alone():
    narrow = CNN1dOptions(arch="cnn1d", width=3, depth=3, kernel=5, activation="tanh")
    wide = narrow.model_copy(update={"width": 7})
    alone = cnn1d_members(narrow, (40,), 10, members=1)
    other = cnn1d_members(wide, (40,), 10, members=1)
    # channel-major flattening puts the narrow member's features first in the wide layout
    padded = {}
    for name, value in alone.items():
        out = torch.zeros_like(other[name])
        out[(slice(None), *(slice(0, n) for n in value.shape[1:]))] = value
        padded[name] = torch.cat([out, other[name]])
    kernel = wide.cohort_kernel((40,), 10)
    x, y = torch.randn(2, 8, 40), torch.randint(0, 10, (2, 8))
    losses, grads = kernel.loss_and_grads(padded, x, y)
    want_losses, want_grads = narrow.cohort_kernel((40,), 10).loss_and_grads(alone, x[:1], y[:1])
    assert_close(losses[:1], want_losses)
    for name, value in want_grads.items():
        assert_close(grads[name][(slice(0, 1), *(slice(0, n) for n in value.shape[1:]))], value)
    assert_close(kernel.forward_shared(padded, x[0])[:1],
                 narrow.cohort_kernel((40,), 10).forward_shared(alone, x[0]))


def test_evaluation_on_another_thread_leaves_training_alone():
    # a checkpoint's metrics may be computed on another thread while the cohort trains on:
    # each thread has its own workspace
    options = CNN1dOptions(arch="cnn1d", width=8, depth=2, kernel=5)
    kernel = options.cohort_kernel((40,), 10)
    params = cnn1d_members(options, (40,), 10, members=4)
    x, y, shared = torch.randn(4, 32, 40), torch.randint(0, 10, (4, 32)), torch.randn(64, 40)
    want_losses, want_grads = kernel.loss_and_grads(params, x, y)
    want_logits = kernel.forward_shared(params, shared)
    errors = []

    def evaluate():
        for _ in range(20):
            if not torch.equal(kernel.forward_shared(params, shared), want_logits):
                errors.append("logits")

    thread = threading.Thread(target=evaluate)
    thread.start()
    for _ in range(20):
        losses, grads = kernel.loss_and_grads(params, x, y)
        if not all(torch.equal(grads[k], want_grads[k]) for k in grads):
            errors.append("grads")
    thread.join()
    assert not errors


class SmallCNN2d(nn.Module):
    """The 2-D network the kernel is built to serve: 3x3 convolutions at stride 2 (padding 1),
    global average pooling, a linear classifier."""

    def __init__(self, in_channels: int, width: int, n_classes: int, activation: str,
                 depth: int = 3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels if i == 0 else width, width, 3,
                                             stride=2, padding=1) for i in range(depth))
        self.act = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU()}[activation]
        self.out = nn.Linear(width, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.act(conv(x))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


@pytest.mark.parametrize("shape, activation", [
    ((1, 8, 8), "relu"),  # scikit-learn's digits
    ((3, 12, 12), "gelu"),
    ((2, 7, 9), "tanh"),  # odd sizes, not square
    ((1, 3, 5), "relu"),  # smaller than the network's reach
])
def test_2d_kernel_matches_autograd_through_a_small_cnn(shape, activation):
    members, width, n_classes = 5, 16, 4
    torch.manual_seed(0)
    nets = [SmallCNN2d(shape[0], width, n_classes, activation) for _ in range(members)]
    params = stacked([{k: v.detach() for k, v in net.named_parameters()} for net in nets])
    kernel = ConvNetKernel([ConvLayer(f"convs.{i}", (3, 3), (2, 2), (1, 1)) for i in range(3)],
                           activation, "mean", "out", shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((members, 6, *shape), generator=g)
    y = torch.randint(0, n_classes, (members, 6), generator=g)
    template = nets[0]
    want_grads, want_losses = vmap(grad_and_value(
        lambda p, x, y: F.cross_entropy(functional_call(template, p, (x,)), y)))(params, x, y)
    losses, grads = kernel.loss_and_grads(params, x, y)
    assert_close(losses, want_losses)
    assert list(grads) == list(params)
    for name in params:
        assert_close(grads[name], want_grads[name])
    shared = torch.randn((7, *shape), generator=g)
    assert_close(kernel.forward_shared(params, shared),
                 vmap(lambda p: functional_call(template, p, (shared,)))(params))
    assert_close(kernel.features_shared(params, shared),
                 vmap(lambda p: _features(template, p, shared))(params))
    one = {k: v[3] for k, v in params.items()}
    assert_close(kernel.forward_one(one, shared), functional_call(template, one, (shared,)))


def _features(module: nn.Module, params, x):
    return functional_call(_FeaturesOf(module), {f"net.{k}": v for k, v in params.items()},
                           (x,))


class _FeaturesOf(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.features(x)


# -- cnn2d declares the fused kernel ------------------------------------------------------------

CNN2D = [  # options, input shape
    (dict(), (1, 28, 28)),  # the Small CNN Zoo's 4,970-parameter network on MNIST
    (dict(width=5, depth=6, activation="tanh"), (3, 9, 7)),  # reaches 1x1, not square
    (dict(width=3, depth=1, activation="gelu"), (2, 12, 12)),  # one layer: the first is the last
]


@pytest.mark.parametrize("fields, shape", CNN2D)
def test_cnn2d_kernel_matches_autograd_through_its_module(fields, shape):
    options = CNN2dOptions(arch="cnn2d", **fields)
    fast, reference = options.cohort_kernel(shape, 10), VmapKernel(options, shape, 10)
    assert isinstance(fast, ConvNetKernel) and not reference.buffers
    fast.generic_below = 0  # every step fused, however small
    params = stacked([init_state(options, shape, 10, seed) for seed in range(4)])
    g = torch.Generator().manual_seed(2)
    x = torch.rand((4, 6, *shape), generator=g)
    y = torch.randint(0, 10, (4, 6), generator=g)
    assert_kernels_agree(fast, reference, params, x, y, torch.rand((9, *shape), generator=g))


def test_cnn2d_dropout_in_the_fused_kernel_is_the_modules_own():
    # the fused kernel draws each member's masks from its own seed and forward count, as the
    # module does: losses, gradients and buffers as the generic kernel gives them, step by step
    options = CNN2dOptions(arch="cnn2d", width=6, dropout=0.4)
    fast, reference = options.cohort_kernel(DIGITS, 10), VmapKernel(options, DIGITS, 10)
    assert isinstance(fast, ConvNetKernel)
    fast.generic_below = 0
    assert fast.buffers == reference.buffers == ("dropout.seed", "dropout.calls")
    states = [init_state(options, DIGITS, 10, seed) for seed in range(4)]
    state = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    state["dropout.calls"] = torch.tensor([0, 3, 7, 3])
    params = [k for k in state if k not in fast.buffers]
    state |= stacked([{k: s[k] for k in params} for s in states])
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x, y = torch.rand((4, 16, *DIGITS), generator=g), torch.randint(0, 10, (4, 16), generator=g)
        losses, grads, buffers = fast.loss_grads_and_buffers(state, x, y)
        want_losses, want_grads, want_buffers = reference.loss_grads_and_buffers(state, x, y)
        assert_close(losses, want_losses)
        assert list(grads) == params
        for name in params:
            assert_close(grads[name], want_grads[name])
        for name in fast.buffers:
            assert torch.equal(buffers[name], want_buffers[name])
        state |= buffers
    assert state["dropout.calls"].tolist() == [2, 5, 9, 5]
    # dropout acts: without it the same weights on the same batch give other losses
    undropped = options.model_copy(update={"dropout": 0.0}).cohort_kernel(DIGITS, 10)
    assert not torch.allclose(undropped.loss_and_grads(
        {k: state[k] for k in params}, x, y)[0], losses)
    shared = torch.rand((5, *DIGITS), generator=g)  # evaluation: no dropout, as in eval mode
    assert_close(fast.forward_shared(state, shared), reference.forward_shared(state, shared))
    with pytest.raises(ValueError, match="loss_grads_and_buffers"):
        fast.loss_and_grads({k: state[k] for k in params}, x, y)


@pytest.mark.parametrize("optimizer, activation, dropout", [("sgd", "relu", 0.0),
                                                            ("adam", "tanh", 0.3)])
def test_cnn2d_fused_tickets_of_mixed_widths_match_the_reference_loop(optimizer, activation,
                                                                     dropout):
    # everything a cnn2d cohort mixes, trained by the fused kernel: widths padded to the
    # widest, pruning masks of several densities, rewound starts, weight decay, momentum/adam,
    # dropout (each member's own masks, also where its width is padded)
    lr, momentum = (0.05, "momentum = 0.9") if optimizer == "sgd" else (0.005, "")
    spec = image_spec(f'arch = "cnn2d"\nactivation = "{activation}"\ndropout = {dropout}',
                      f"model.width = [3, 6]\ntrain.lr = [{lr}]",
                      train=f'optimizer = "{optimizer}"\nweight_decay = 0.01\n{momentum}',
                      checkpoints="[0, 15]")
    [(runs, datas)] = plan_cohorts(list(spec.runs), cohort_size=8)
    plan = cohort_plan(runs, datas)
    trainer = CohortTrainer(plan)
    assert isinstance(trainer.kernel, ConvNetKernel)
    trainer.kernel.generic_below = 0  # digits' small steps fused too
    starts = rewind_and_prune(plan, runs, datas)
    together = {ck.step: ck.params for ck in trainer.run()}
    assert_tickets_match_reference(runs, starts, together, [0, 15], "convs.1.weight")


def test_small_cnn2d_steps_train_on_the_generic_kernel():
    # below GENERIC_BELOW examples x pixels a step goes to vmap's kernel (faster there), with
    # or without dropout; larger steps are fused; both give the module's loss and gradients
    assert 64 * 8 * 8 < GENERIC_BELOW <= 256 * 8 * 8
    for dropout in (0.0, 0.3):
        options = CNN2dOptions(arch="cnn2d", width=4, dropout=dropout)
        kernel = options.cohort_kernel(DIGITS, 10)
        states = [init_state(options, DIGITS, 10, i) for i in range(3)]
        state = {k: torch.stack([s[k] for s in states]) for k in states[0]}
        for batch, generic in ((64, True), (256, False)):
            x, y = torch.rand(3, batch, *DIGITS), torch.randint(0, 10, (3, batch))
            assert kernel._small(y) == generic
            if dropout:
                losses, grads, _ = kernel.loss_grads_and_buffers(state, x, y)
                want_losses, want_grads, _ = kernel.generic.loss_grads_and_buffers(state, x, y)
            else:
                losses, grads = kernel.loss_and_grads(state, x, y)
                want_losses, want_grads = kernel.generic.loss_and_grads(state, x, y)
            assert_close(losses, want_losses)
            assert list(grads) == list(want_grads)
            for name, value in want_grads.items():
                assert_close(grads[name], value)
