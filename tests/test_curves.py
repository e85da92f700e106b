"""Mode connectivity along trained Bezier curves: the bend's training against a plain reference
loop, curves with known answers (a constant curve, permuted copies), BatchNorm statistics along
the curve, the `[metrics] curve` group metrics in a store and the phases that use them."""

import functools
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from typer.testing import CliRunner

from dlstore.analysis.phases import phase_table
from dlstore.architectures.base import init_state
from dlstore.architectures.kernels import buffer_names
from dlstore.architectures.registry import parse_arch_options
from dlstore.building.build import build_zoo
from dlstore.cli import app
from dlstore.datasets.base import run_data
from dlstore.datasets.registry import parse_dataset_options
from dlstore.errors import SpecError
from dlstore.metrics.connectivity import interpolation_barrier
from dlstore.metrics.curve_groups import compute_curve_metrics, curve_metrics_of
from dlstore.metrics.curves import (
    CURVE_METRICS,
    CurveSampler,
    NormStatistics,
    curve_metrics,
    curve_points,
    garipov_lr_factor,
    train_bends,
)
from dlstore.metrics.groups import find_groups
from dlstore.spec import ZooSpec
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small networks on a shared machine: one thread is several times faster than two that
    contend with other jobs' threads (measured 0.2 s against 10 s for 100 steps of an MLP)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_bend(arch, shape, n_classes, a, b, x, y, seed, steps, lr, momentum, wd, batch):
    """One pair's bend trained the plain way: a module, autograd through the Bezier point,
    Garipov et al.'s regulariser in the loss, torch.optim.SGD with their schedule."""
    module = arch.build(shape, n_classes).train()
    buffers = buffer_names(module)
    bend = {k: ((a[k] + b[k]) / 2).clone().requires_grad_(True) for k in a if k not in buffers}
    optimizer = torch.optim.SGD(list(bend.values()), lr=lr, momentum=momentum)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda s: garipov_lr_factor(s, steps))
    sampler = CurveSampler([seed], [x.shape[0]], batch)
    current = {k: a[k].clone() for k in buffers}  # the module's forwards update them in place
    for _ in range(steps):
        t, idx = sampler.draw()
        t, idx = t[0], idx[0]
        point = {k: (1 - t) ** 2 * a[k] + 2 * t * (1 - t) * c + t ** 2 * b[k]
                 for k, c in bend.items()}
        state = {**point, **current}
        loss = (F.cross_entropy(functional_call(module, state, (x[idx],)), y[idx])
                + 0.5 * wd * sum((p ** 2).sum() for p in point.values()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return {k: v.detach() for k, v in bend.items()}


def _setup(arch_options, dataset):
    data = run_data(parse_dataset_options(dataset), 0)
    arch = parse_arch_options(arch_options)
    kernel = arch.cohort_kernel(data.input_shape, data.n_classes)
    return data, arch, kernel


def _stack(states):
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def test_garipov_schedule():
    assert [garipov_lr_factor(s, 100) for s in (0, 50, 70, 90, 95)] == pytest.approx(
        [1.0, 1.0, 1.0 - 0.2 / 0.4 * 0.99, 1.0 - 0.99, 0.01])


@pytest.mark.parametrize("arch_options,dataset,steps", [
    ({"arch": "mlp", "width": 16, "depth": 2}, {"name": "gaussian_mixture", "n_samples": 400},
     40),
    # BatchNorm: the generic vmap kernel with buffers
    ({"arch": "resnet", "width": 4, "stages": 1}, {"name": "digits"}, 6),
    # dropout: its seed and counter buffers advance with the training forwards
    ({"arch": "cnn2d", "width": 4, "dropout": 0.5}, {"name": "digits"}, 6),
])
def test_bend_training_equals_a_plain_reference_loop(arch_options, dataset, steps):
    """Three pairs trained as one stack; the first and the last each end where the plain loop
    trained alone with the same seed ends (1e-5), whatever their position in the stack."""
    data, arch, kernel = _setup(arch_options, dataset)
    states = [init_state(arch, data.input_shape, data.n_classes, s) for s in range(6)]
    a, b = _stack(states[0::2]), _stack(states[1::2])
    seeds = [11, 12, 13]
    n = data.x_train.shape[0]
    options = dict(steps=steps, lr=0.05, momentum=0.9, weight_decay=1e-3)
    sampler = CurveSampler(seeds, [n] * 3, 16)
    bends = train_bends(kernel, a, b, data.x_train, data.y_train.expand(3, -1), sampler,
                        **options)
    for i in (0, 2):
        want = reference_bend(arch, data.input_shape, data.n_classes, states[2 * i],
                              states[2 * i + 1], data.x_train, data.y_train, seeds[i], steps,
                              options["lr"], options["momentum"], options["weight_decay"], 16)
        for k, v in want.items():
            torch.testing.assert_close(bends[k][i], v, atol=1e-5, rtol=0)
        moved = sum(float((want[k] - (states[2 * i][k] + states[2 * i + 1][k]) / 2).abs().max())
                    for k in want)
        assert moved > 1e-3  # the bend trained away from the straight line's midpoint


def _trained_mlp(data, arch, steps=300, seed=0):
    module = arch.build(data.input_shape, data.n_classes)
    module.load_state_dict(init_state(arch, data.input_shape, data.n_classes, seed))
    optimizer = torch.optim.Adam(module.parameters(), 5e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(data.x_train.shape[0], (128,), generator=g)
        loss = F.cross_entropy(module(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach()[None] for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def digits_mlp():
    data, arch, kernel = _setup({"arch": "mlp", "width": 32, "depth": 2}, {"name": "digits"})
    return data, arch, kernel, _trained_mlp(data, arch)


def _curve(kernel, norms, data, a, b, steps, lr=0.05, seed=5):
    n = data.x_train.shape[0]
    y = data.y_train[None]
    bend = train_bends(kernel, a, b, data.x_train, y, CurveSampler([seed], [n], 128), steps,
                       lr, 0.9, 1e-4)
    return curve_metrics(kernel, norms, a, bend, b, data.x_train, y, torch.tensor([n]),
                         data.x_test, data.y_test, 11)


def test_two_copies_of_one_network_give_a_constant_curve(digits_mlp):
    """a = b: the untrained curve is the network itself at every t (barriers exactly 0, mc 0);
    trained, the curve of a well-trained network rises above it nowhere."""
    data, arch, kernel, a = digits_mlp
    norms = NormStatistics(arch, data.input_shape, data.n_classes)
    still = _curve(kernel, norms, data, a, a, steps=0)
    for name in CURVE_METRICS:  # (1 - t)^2 a + 2 t (1 - t) a + t^2 a is a up to rounding
        assert abs(float(still[name])) < 1e-6
    assert float(still["train_loss_path"].max() - still["train_loss_path"].min()) < 1e-6
    trained = _curve(kernel, norms, data, a, a, steps=100)
    assert float(trained["curve_train_loss_barrier"]) < 0.01
    assert float(trained["curve_train_error_barrier"]) < 2 / data.x_train.shape[0]
    # no barrier: mc >= 0 up to an example (positive where the curve improved on its ends)
    assert float(trained["curve_mode_connectivity"]) > -2 / data.x_train.shape[0]


def _permuted(arch, a, seed=1):
    """`a` with the hidden units of every layer permuted: the same function elsewhere in weight
    space."""
    b = {k: v.clone() for k, v in a.items()}
    g = torch.Generator().manual_seed(seed)
    for rows, following in arch.permutation_symmetries({k: tuple(v.shape[1:])
                                                        for k, v in a.items()}):
        perm = torch.randperm(b[rows[0]].shape[1], generator=g)
        for k in rows:
            b[k] = b[k][:, perm]
        b[following] = b[following][:, :, perm]
    return b


def test_a_trained_curve_removes_most_of_the_barrier_between_permuted_copies(digits_mlp):
    """Permuted copies compute the same function, so a low-loss path between them exists; the
    straight line between them crosses a ridge, the trained curve goes around most of it."""
    data, arch, kernel, a = digits_mlp
    norms = NormStatistics(arch, data.input_shape, data.n_classes)
    b = _permuted(arch, a)
    torch.testing.assert_close(kernel.forward_shared(a, data.x_test),
                               kernel.forward_shared(b, data.x_test), atol=1e-4, rtol=0)
    line = interpolation_barrier(kernel.forward_shared, a, b, data.x_train, data.y_train)
    assert float(line["loss_barrier"]) > 0.3 and float(line["error_barrier"]) > 0.05
    curve = _curve(kernel, norms, data, a, b, steps=250)
    assert float(curve["curve_train_loss_barrier"]) < 0.25 * float(line["loss_barrier"])
    assert float(curve["curve_train_error_barrier"]) < 0.25 * float(line["error_barrier"])
    # the untrained curve is the straight line
    untrained = _curve(kernel, norms, data, a, b, steps=0)
    torch.testing.assert_close(untrained["train_loss_path"], line["loss_path"], atol=1e-5,
                               rtol=0)


def test_batchnorm_statistics_are_recomputed_at_each_point():
    """Recomputed over uneven chunks, the first BatchNorm's running mean at a point is the mean
    of its inputs over all the examples and its variance the size-weighted mean of the chunks'
    unbiased variances (Garipov et al.'s update_bn); over one chunk every BatchNorm's are the
    batch statistics of a train-mode forward of that point's network."""
    data, arch, _ = _setup({"arch": "resnet", "width": 4, "stages": 2}, {"name": "digits"})
    norms = NormStatistics(arch, data.input_shape, data.n_classes)
    assert norms.names and len(norms.names) % 3 == 0
    states = [init_state(arch, data.input_shape, data.n_classes, s) for s in range(3)]
    a, bend, b = (_stack([s]) for s in states)
    ts = torch.tensor([0.0, 0.3, 1.0])
    points = curve_points(a, {k: v for k, v in bend.items() if k not in norms.buffers}, b, ts)
    x = data.x_train[:200]
    for chunk in (37, 200):
        recomputed = norms.recompute(points, x, chunk=chunk)
        for q in range(3):
            module = arch.build(data.input_shape, data.n_classes).train()
            module.load_state_dict({k: v[q] for k, v in points.items()})
            seen: dict[str, torch.Tensor] = {}

            def keep(module, inputs, output, name, seen=seen):
                seen.setdefault(name, inputs[0])

            hooks = [m.register_forward_hook(functools.partial(keep, name=name))
                     for name, m in module.named_modules()
                     if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            with torch.no_grad():
                module(x)
            for h in hooks:
                h.remove()
            names = list(seen) if chunk == 200 else list(seen)[:1]
            for name in names:
                inputs = seen[name]
                torch.testing.assert_close(recomputed[f"{name}.running_mean"][q],
                                           inputs.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
                # the variance: each chunk's unbiased batch variance, weighted by its size
                var = sum(part.var((0, 2, 3)) * part.shape[0] for part in inputs.split(chunk))
                torch.testing.assert_close(recomputed[f"{name}.running_var"][q],
                                           var / inputs.shape[0], atol=1e-5, rtol=1e-4)


ZOO = textwrap.dedent("""
    name = "curvy"
    seeds = 3
    checkpoints = [0, 60]
    [dataset]
    name = "gaussian_mixture"
    n_samples = 600
    [model]
    arch = "mlp"
    width = 8
    depth = 1
    [train]
    batch_size = 32
    steps = 60
    [grid]
    train.lr = [0.02, 0.1]
    dataset.n_train = [200, 400]
    [metrics]
    statistics = false
    spectra = false
    groups = { points = 5 }
    curve = { points = 5, steps = 40, pairs = 2, lr = 0.05 }
""")


@pytest.fixture(scope="module")
def curve_store(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("curves") / "s", create=True)
    report = build_zoo(ZooSpec.from_text(ZOO), store, device="cpu")
    assert report.curve_steps == 4
    return store


def test_curve_metrics_of_a_zoo_are_recorded_per_group_and_resumable(curve_store):
    rows = curve_store.sql("SELECT group_id, step, metric, value FROM group_metrics "
                           "WHERE metric LIKE 'curve_%'")
    assert set(rows["metric"]) == set(CURVE_METRICS)
    assert rows.height == 4 * len(CURVE_METRICS) and set(rows["step"]) == {60}
    assert all(v == v for v in rows["value"])  # no NaN
    assert compute_curve_metrics(StoreWriter(curve_store), "curvy",
                                 ZooSpec.from_text(ZOO).metrics.curve) == 0


def test_groups_trained_together_equal_each_group_alone(curve_store):
    """The four groups (two lr, two training-set sizes) train their bends in one stack; each
    alone gets the same values."""
    options = ZooSpec.from_text(ZOO).metrics.curve
    groups = find_groups(curve_store, "curvy")
    cpu = torch.device("cpu")
    together = curve_metrics_of(curve_store, [(g, 60) for g in groups], options, cpu)
    for group, values in zip(groups, together):
        alone, = curve_metrics_of(curve_store, [(group, 60)], options, cpu)
        assert alone == pytest.approx(values, abs=1e-6)


def test_phase_table_uses_curve_mc_when_the_zoo_has_it(curve_store):
    table = phase_table(curve_store, "lr", "n_train", zoo="curvy")
    assert set(table["mc_metric"]) == {"curve_mode_connectivity"}
    curve = curve_store.sql("SELECT lr, n_train, avg(value) AS mc FROM group_metrics "
                            "WHERE metric = 'curve_mode_connectivity' GROUP BY ALL ORDER BY ALL")
    assert table["mode_connectivity"].to_list() == pytest.approx(curve["mc"].to_list())
    line = phase_table(curve_store, "lr", "n_train", zoo="curvy", mc="line")
    assert set(line["mc_metric"]) == {"mode_connectivity"}


def test_plot_phases_says_which_mode_connectivity_it_used(curve_store, tmp_path):
    runner = CliRunner()
    store = str(curve_store.root)
    args = ["plot", "phases", "--store", store, "--zoo", "curvy", "--x", "lr", "--y", "n_train"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "mode connectivity: curve_mode_connectivity" in result.output
    result = runner.invoke(app, [*args, "--mc", "line", "--out", str(tmp_path / "l.png")])
    assert "mode connectivity: mode_connectivity" in result.output
    result = runner.invoke(app, [*args, "--mc", "bend"])
    assert result.exit_code == 1 and "mc must be auto, line or curve" in str(result.exception)


def test_bad_curve_options_are_refused_in_one_line():
    with pytest.raises(SpecError, match="metrics.curve"):
        ZooSpec.from_text(ZOO.replace("lr = 0.05 }", "lr = -1 }"))
    with pytest.raises(SpecError, match="metrics.curve"):
        ZooSpec.from_text(ZOO.replace("pairs = 2,", "pair = 2,"))


@pytest.mark.slow
def test_the_phases_curve_zoo_shows_phase_iv_where_the_line_shows_iii(tmp_path):
    """zoo/phases-curve.toml on a corner of its grid (2 seeds): a small training set at a
    moderate learning rate fits and its seeds are joined by a trained curve (IV), though the
    straight line between them has a barrier (III); the full training set keeps a barrier along
    the curve too (III); the largest learning rate fits nothing (II)."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "zoo" / "phases-curve.toml").read_text()
    text = text.replace("seeds = 3", "seeds = 2")
    text = text.replace("train.lr = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]", "train.lr = [0.03, 1.0]")
    text = text.replace("dataset.n_train = [250, 500, 1000, 2000, 4000]",
                        "dataset.n_train = [250, 4000]")
    store = Store(tmp_path / "s", create=True)
    build_zoo(ZooSpec.from_text(text), store, device="cpu")
    curve = phase_table(store, "lr", "n_train", zoo="phases-curve")
    line = phase_table(store, "lr", "n_train", zoo="phases-curve", mc="line")
    phases = dict(zip(zip(curve["lr"], curve["n_train"]), curve["phase"]))
    assert phases[(0.03, 250)] in ("IV-A", "IV-B")
    assert dict(zip(zip(line["lr"], line["n_train"]), line["phase"]))[(0.03, 250)] == "III"
    assert phases[(0.03, 4000)] == "III"
    assert phases[(1.0, 4000)] == "II"
