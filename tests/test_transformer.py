"""The causal transformer on sequence tasks: causality, sizes, exact padding by whole heads,
the cohort against the plain reference loop (dropout 0, 1e-5), dropout that a member draws from
its own generator, the per-token metrics (answer-token accuracy, tokens seen, excess loss over
the entropy rate) and a built store."""

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dlstore.architectures.base import init_state, n_params
from dlstore.architectures.kernels import VmapKernel, kernel_for
from dlstore.architectures.registry import parse_arch_options
from dlstore.architectures.transformer_kernel import TransformerKernel
from dlstore.building.build import build_zoo
from dlstore.building.plan import cohort_plan, plan_build, plan_cohorts
from dlstore.datasets.base import run_data
from dlstore.datasets.sequences import IGNORE
from dlstore.errors import SpecError
from dlstore.metrics.basic import loss_and_accuracy
from dlstore.spec import ZooSpec
from dlstore.stacks import pad_stack
from dlstore.store.store import Store
from dlstore.training.cohort import CohortTrainer
from dlstore.training.reference import train_reference
from tests.test_population import ATOL, assert_matches_reference, train_cohorts


def options(**raw):
    return parse_arch_options({"arch": "transformer", **raw})


def seq_spec(model: str, grid: str, dataset: str = 'name = "arithmetic"\np = 11',
             train: str = "", seeds: int | list[int] = 2, steps: int = 10) -> ZooSpec:
    return ZooSpec.from_text(textwrap.dedent(f"""
        name = "tf"
        seeds = {seeds}
        checkpoints = "every:5"
        [dataset]
        {dataset}
        [model]
        arch = "transformer"
        head_dim = 8
        depth = 1
        {model}
        [train]
        optimizer = "adamw"
        batch_size = 16
        steps = {steps}
        lr = 0.003
        weight_decay = 0.1
        {train}
        [grid]
        {grid}
    """))


def test_outputs_are_class_first_and_causal():
    arch = options(width=16, head_dim=8, depth=2)
    net = arch.build((6,), 9)
    net.load_state_dict(init_state(arch, (6,), 9, 0))
    x = torch.randint(0, 9, (5, 6)).float()
    logits = net(x)
    assert logits.shape == (5, 9, 6)  # [N, V, T]: what cross_entropy takes with [N, T] targets
    changed = x.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 9
    after = net(changed)
    torch.testing.assert_close(after[..., :3], logits[..., :3], atol=0, rtol=0)
    assert not torch.allclose(after[..., 3:], logits[..., 3:])  # later positions see it
    assert net.features(x).shape == (5, 16)


@pytest.mark.parametrize("raw", [{"width": 32, "depth": 2}, {"width": 48, "head_dim": 16,
                                                             "mlp_ratio": 2, "context": 12}])
def test_counted_size_matches_the_built_network(raw):
    arch = options(**raw)
    assert arch.size((8,), 20).params == n_params(arch, (8,), 20)


@pytest.mark.parametrize("raw, shape, message", [
    ({"width": 20, "head_dim": 8}, (4,), "multiple of head_dim"),
    ({}, (1, 8, 8), "needs token sequences"),
    ({"context": 3}, (4,), "fewer than the task's 4 tokens"),
])
def test_bad_options_are_one_line(raw, shape, message):
    with pytest.raises(SpecError) as e:
        options(**raw).build(shape, 10)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dataset, model, message", [
    ('name = "mnist1d"\nnum_samples = 200', 'arch = "transformer"\nwidth = 16\nhead_dim = 8',
     "transformer predicts a token at every position; dataset mnist1d gives one class"),
    ('name = "arithmetic"\np = 7', 'arch = "mlp"',
     "mlp predicts one class per example; dataset arithmetic is a sequence task"),
])
def test_a_network_paired_with_targets_it_does_not_predict_fails_before_training(
        dataset, model, message):
    spec = ZooSpec.from_text(f'name = "bad"\n[dataset]\n{dataset}\n[model]\n{model}\n'
                             '[train]\nbatch_size = 8\nsteps = 2\n')
    with pytest.raises(SpecError, match=message):
        plan_build(spec, "cpu")


def test_prunable_tensors_are_the_linear_weights_head_last():
    arch = options(width=16, head_dim=8, depth=1)
    names = arch.prunable_tensors(init_state(arch, (4,), 13, 0))
    assert names[-1] == "head.weight" and "tok_emb.weight" not in names
    assert set(names) == {f"blocks.0.{n}.weight" for n in ("q", "k", "v", "proj", "fc", "out")
                          } | {"head.weight"}


# -- padding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_zero_padding_by_whole_heads_changes_nothing(dropout):
    narrow_opts, wide_opts = (options(width=w, head_dim=8, depth=2, dropout=dropout)
                              for w in (8, 24))
    narrow, wide = narrow_opts.build((6,), 11), wide_opts.build((6,), 11)
    narrow.load_state_dict(init_state(narrow_opts, (6,), 11, 0))
    shapes = {k: tuple(v.shape) for k, v in wide.state_dict().items()}
    axes = wide_opts.padded_axes(shapes)
    state = {}
    for k, v in narrow.state_dict().items():
        padded = torch.zeros(shapes[k], dtype=v.dtype)
        padded[tuple(slice(0, n) for n in v.shape)] = v
        state[k] = padded if axes[k] else v  # scalars (width, dropout seed) stay the narrow's
    wide.load_state_dict(state)
    assert int(wide.width) == 8 and wide.heads == 3
    x = torch.randint(0, 11, (7, 6)).float()
    for _ in range(2):  # train mode twice: the dropout counter moves
        torch.testing.assert_close(wide(x), narrow(x), atol=2e-6, rtol=0)
    wide.eval(), narrow.eval()
    torch.testing.assert_close(wide(x), narrow(x), atol=2e-6, rtol=0)


def test_mixed_widths_share_one_cohort_and_match_the_reference():
    # dropout 0: the cohort (vmap over the stacked, padded members) against the torch.optim loop
    spec = seq_spec("", "model.width = [8, 16]\ntrain.weight_decay = [0.0, 1.0]", seeds=1)
    [(runs, _)] = plan_cohorts(list(spec.runs), cohort_size=8)
    assert len(runs) == 4
    assert assert_matches_reference(spec) < ATOL


# -- dropout -----------------------------------------------------------------------------------

def test_dropout_is_the_members_own_and_reproducible():
    spec = seq_spec("width = 16\ndropout = 0.2", "train.lr = [0.003, 0.01]", steps=6)  # 4 runs
    together, again = train_cohorts(spec), train_cohorts(spec)
    target = spec.runs[1]
    runs, datas = plan_cohorts([target], cohort_size=1)[0]
    alone = {ck.step: ck.params for ck in CohortTrainer(cohort_plan(runs, datas)).run()}
    reference = train_reference(target, run_data(target.dataset, target.seed))
    for name, value in alone[6].items():
        mine = together[target.run_id][6][name]
        torch.testing.assert_close(value[0], mine, atol=ATOL, rtol=0)  # any cohort
        torch.testing.assert_close(reference[6][name], mine, atol=ATOL, rtol=0)  # the loop
        assert torch.equal(again[target.run_id][6][name], mine)  # a rerun
    assert int(alone[6]["dropout_calls"][0]) == 6
    plain = seq_spec("width = 16", "train.lr = [0.003]", steps=6, seeds=[1])  # the same run
    undropped = train_cohorts(plain)[plain.runs[0].run_id][6]
    assert not torch.allclose(undropped["head.weight"], together[target.run_id][6]["head.weight"])


def test_dropout_rate_fresh_masks_and_none_in_eval_mode():
    arch = options(width=32, head_dim=8, depth=1, dropout=0.5)
    net = arch.build((8,), 10)
    net.load_state_dict(init_state(arch, (8,), 10, 0))
    x = torch.randint(0, 10, (64, 8)).float()
    h = net.tok_emb(x.long()) + net.pos_emb.weight[:8]
    key = torch.tensor(12345)
    first = net._dropout(h, key, 0)
    dropped = first == 0
    assert 0.45 < dropped.double().mean() < 0.55
    assert not torch.equal(dropped, net._dropout(h, key + 1, 0) == 0)
    assert not torch.equal(dropped, net._dropout(h, key, 1) == 0)  # each site its own mask
    assert not torch.equal(net(x), net(x))  # train mode: a new mask every forward
    net.eval()
    assert torch.equal(net(x), net(x))


# -- metrics -----------------------------------------------------------------------------------

def test_loss_and_accuracy_are_per_marked_token():
    # two members, two sequences of three positions, vocabulary 2; member 1 uses only its
    # first sequence (n_valid). Logits favour token 0 everywhere by log(3): p(0) = 3/4
    logits = torch.zeros(2, 2, 2, 3)
    logits[:, :, 0] = math.log(3.0)
    y = torch.tensor([[0, IGNORE, 1], [IGNORE, IGNORE, 0]])  # 3 marked tokens, 2 of them 0
    loss, acc = loss_and_accuracy(lambda p, x: logits[:, :x.shape[0]], {"w": torch.zeros(2)},
                                  torch.zeros(2, 3), y, n_valid=torch.tensor([2, 1]), chunk=1)
    nll0, nll1 = -math.log(0.75), -math.log(0.25)
    assert loss.tolist() == pytest.approx([(2 * nll0 + nll1) / 3, (nll0 + nll1) / 2])
    assert acc.tolist() == pytest.approx([2 / 3, 1 / 2])


MARKOV = 'name = "markov"\nvocab = 8\norder = 1\nseq_len = 8\ntrain_tokens = 2048\n' \
         'test_tokens = 512'


@pytest.fixture(scope="module")
def markov_store(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("tf") / "s", create=True)
    spec = seq_spec("width = 16", "model.width = [8, 16]", dataset=MARKOV, seeds=1, steps=20)
    report = build_zoo(spec, store, device="cpu")
    assert report.runs_built == 2
    return store, spec


def test_the_store_records_tokens_seen_and_the_excess_over_the_entropy_rate(markov_store):
    store, spec = markov_store
    rate = spec.runs[0].dataset.entropy_rate()
    rows = store.sql("SELECT run_id, step, metric, value FROM curves WHERE metric IN "
                     "('tokens_seen', 'test_loss', 'test_excess_loss', 'train_loss')").to_dicts()
    by = {(r["run_id"], r["step"], r["metric"]): r["value"] for r in rows}
    for run in spec.runs:
        for step in (0, 5, 10, 15, 20):
            assert by[(run.run_id, step, "tokens_seen")] == step * 16 * 8
            assert by[(run.run_id, step, "test_excess_loss")] == pytest.approx(
                by[(run.run_id, step, "test_loss")] - rate, abs=1e-9)
        # it learned: the loss fell from about log(8), towards (never below, on average) H
        assert by[(run.run_id, 0, "test_loss")] == pytest.approx(math.log(8), abs=0.3)
        assert by[(run.run_id, 20, "test_loss")] < by[(run.run_id, 0, "test_loss")] - 0.05


def test_load_model_reproduces_the_stored_per_token_loss(markov_store):
    store, spec = markov_store
    final = {r["run_id"]: r["value"] for r in store.sql(
        "SELECT run_id, value FROM final WHERE metric = 'test_loss'").to_dicts()}
    for run in spec.runs:
        model = store.load_model(run.run_id)
        data = store.load_dataset(run.run_id)
        with torch.no_grad():
            loss = F.cross_entropy(model(data["x_test"]), data["y_test"]).item()
        assert loss == pytest.approx(final[run.run_id], abs=1e-5)


def test_answer_token_accuracy_of_arithmetic_is_the_token_accuracy():
    # arithmetic marks only the answer: the evaluator's test_acc is the answer accuracy
    spec = seq_spec("width = 16", "train.lr = [0.003]", seeds=1, steps=5)
    runs, datas = plan_cohorts(list(spec.runs), cohort_size=1)[0]
    plan = cohort_plan(runs, datas)
    trainer = CohortTrainer(plan)
    last = list(trainer.run())[-1]
    kernel = VmapKernel(plan.arch, plan.input_shape, plan.n_classes)
    with torch.no_grad():
        logits = kernel.forward_shared(last.params, plan.x_test)[0]  # [N, V, 4]
    answers = (logits[:, :, -1].argmax(1) == plan.y_test[:, -1]).double().mean().item()
    assert last.metrics["test_acc"][0].item() == pytest.approx(answers, abs=1e-12)
    assert "test_excess_loss" not in last.metrics  # no known entropy rate for arithmetic


# -- the cohort kernel -------------------------------------------------------------------------

PARITY = 'name = "sparse_parity"\nn_bits = 6\nk = 2\nn_samples = 64'


def _cohort(dataset: str, widths: list[int], dropout: float = 0.0):
    """Members of `widths` on `dataset` (2 seeds each): their modules in train mode, the widest
    options, stacked and zero-padded states, and one batch [P, 12, T] each."""
    spec = seq_spec(f"dropout = {dropout}", f"model.width = {widths}", dataset=dataset)
    runs = list(spec.runs)
    data = run_data(runs[0].dataset, runs[0].seed)
    shape, classes = data.input_shape, data.n_classes
    nets, states = [], []
    for run in runs:
        net = run.model.build(shape, classes)
        state = init_state(run.model, shape, classes, run.seed)
        net.load_state_dict(state)
        nets.append(net.train())
        states.append(state)
    wide = max((run.model for run in runs), key=lambda m: m.width)
    axes = wide.padded_axes({k: tuple(v.shape) for k, v in
                             wide.build(shape, classes).state_dict().items()})
    stacked = {k: pad_stack([s[k] for s in states], axes[k])[0] for k in states[0]}
    rows = torch.randint(0, data.x_train.shape[0], (len(runs), 12),
                         generator=torch.Generator().manual_seed(0))
    return nets, wide, shape, classes, stacked, data.x_train[rows], data.y_train[rows]


@pytest.mark.parametrize("dataset", ['name = "arithmetic"\np = 7', MARKOV, PARITY],
                         ids=["arithmetic", "markov", "parity"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_the_fast_kernel_gives_the_modules_losses_gradients_and_buffers(dataset, dropout):
    # mixed widths in one cohort (padded heads and masked LayerNorm), each member against
    # autograd through its own module; with dropout, the module's own masks and counter
    nets, wide, shape, classes, state, x, y = _cohort(dataset, [8, 16], dropout)
    kernel = kernel_for(wide, shape, classes)
    assert isinstance(kernel, TransformerKernel)
    assert kernel.buffers == tuple(k for k, _ in nets[0].named_buffers())
    for _ in range(2):  # twice: the second forward draws new masks (the counter moved)
        losses, grads, buffers = kernel.loss_grads_and_buffers(state, x, y)
        for i, net in enumerate(nets):
            loss = F.cross_entropy(net(x[i]), y[i])  # advances the module's dropout_calls
            torch.testing.assert_close(losses[i], loss, atol=1e-5, rtol=0)
            names, params = zip(*net.named_parameters())
            for name, grad in zip(names, torch.autograd.grad(loss, params)):
                mine = grads[name][i]
                corner = mine[tuple(slice(0, n) for n in grad.shape)]
                torch.testing.assert_close(corner, grad, atol=1e-5, rtol=0)
                assert mine.abs().sum().item() == pytest.approx(corner.abs().sum().item(), rel=1e-6)
            for name, value in net.named_buffers():
                assert torch.equal(buffers[name][i], value), name
        state = {**state, **buffers}
    if dropout:
        assert buffers["dropout_calls"].tolist() == [2] * len(nets)


def test_the_fast_kernel_without_padding_or_dropout_trains_through_loss_and_grads():
    # every member at full width: the fused LayerNorm path; loss_and_grads as the trainer of a
    # buffer-free module would call it
    nets, wide, shape, classes, state, x, y = _cohort(MARKOV, [16])
    losses, grads = kernel_for(wide, shape, classes).loss_and_grads(state, x, y)
    for i, net in enumerate(nets):
        loss = F.cross_entropy(net(x[i]), y[i])
        torch.testing.assert_close(losses[i], loss, atol=1e-5, rtol=0)
        for (name, _), grad in zip(net.named_parameters(),
                                   torch.autograd.grad(loss, list(net.parameters()))):
            torch.testing.assert_close(grads[name][i], grad, atol=1e-5, rtol=0)
    assert set(grads) == {name for name, _ in nets[0].named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_the_fast_kernel_evaluates_as_the_module_in_eval_mode(dropout):
    nets, wide, shape, classes, state, x, _ = _cohort('name = "arithmetic"\np = 7', [8, 16],
                                                     dropout)
    kernel = kernel_for(wide, shape, classes)
    shared = x[0]  # [N, T]: every member on the same inputs
    logits, features = kernel.forward_shared(state, shared), kernel.features_shared(state, shared)
    for i, net in enumerate(nets):
        net.eval()
        with torch.no_grad():
            torch.testing.assert_close(logits[i], net(shared), atol=1e-5, rtol=0)  # [N, V, T]
            width = int(net.width)
            torch.testing.assert_close(features[i][:, :width], net.features(shared), atol=1e-5,
                                       rtol=0)
            one = kernel.forward_one({k: v[i] for k, v in state.items()}, shared)
            torch.testing.assert_close(one, net(shared), atol=1e-5, rtol=0)


def test_the_fast_kernels_forward_one_differentiates_twice():
    _, wide, shape, classes, state, x, y = _cohort('name = "arithmetic"\np = 7', [8])
    kernel = kernel_for(wide, shape, classes)
    member = {k: v[0] for k, v in state.items()}
    head = member["head.weight"]

    def loss(w):
        return F.cross_entropy(kernel.forward_one({**member, "head.weight": w}, x[0]), y[0])

    direction = torch.randn_like(head)
    _, hvp = torch.func.jvp(torch.func.grad(loss), (head,), (direction,))
    eps = 1e-3  # against a finite difference of the gradient
    numeric = (torch.func.grad(loss)(head + eps * direction)
               - torch.func.grad(loss)(head - eps * direction)) / (2 * eps)
    torch.testing.assert_close(hvp, numeric, atol=2e-3, rtol=1e-2)
    assert hvp.abs().max() > 1e-4
