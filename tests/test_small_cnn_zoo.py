"""The Small CNN Zoo recipe (`zoo/small-cnn-zoo.toml`): the real file validates into >= 1,000
runs of the 4,970-parameter cnn2d on mnist, varied along the axes of Unterthiner et al. 2020,
with checkpoints over training; a shrunken copy of it trains, and two builds of it give the
same run ids and the same weights bit for bit."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from dlstore.architectures.base import n_params
from dlstore.building.build import build_zoo
from dlstore.spec import ZooSpec
from dlstore.store.store import Store

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

RECIPE = Path(__file__).resolve().parent.parent / "zoo" / "small-cnn-zoo.toml"
AXES = {  # axis of the paper -> where a run config holds it
    "activation": ("model", "activation"), "optimizer": ("train", "optimizer"),
    "learning rate": ("train", "lr"), "L2": ("train", "weight_decay"),
    "initialisation": ("model", "init"), "init scale": ("model", "init_scale"),
    "dropout": ("model", "dropout"), "training fraction": ("dataset", "n_train")}


def test_the_recipe_validates_into_a_thousand_runs_varied_along_the_papers_axes():
    spec = ZooSpec.from_toml(RECIPE)
    runs = list(spec.runs)
    assert len(runs) >= 1_000
    assert {run.model.arch for run in runs} == {"cnn2d"}
    assert {run.dataset.name for run in runs} == {"mnist"}
    first = runs[0]
    shape = first.dataset.shape()
    assert n_params(first.model.model_copy(update={"dropout": 0.0}), shape.input_shape,
                    shape.n_classes) == 4_970
    for axis, (section, field) in AXES.items():
        values = {getattr(getattr(run, section), field) for run in runs}
        assert len(values) >= 2, axis
    fractions = {run.dataset.n_train for run in runs}
    assert max(fractions) == 4_000 and min(fractions) == 400
    # checkpoints over training: initialisation, during, end
    steps = first.checkpoint_steps(first.train.total_steps(first.dataset.n_train))
    assert len(steps) >= 5 and steps[0] == 0 and steps[-1] == first.train.total_steps(
        first.dataset.n_train)
    assert len({run.run_id for run in runs}) == len(runs)


def shrunken_recipe() -> ZooSpec:
    """The recipe with its grid cut to 4 runs (values of its grid) and 512 training examples:
    the same dataset, architecture, batch size, epochs and checkpoints."""
    raw = tomllib.loads(RECIPE.read_text())
    small = copy.deepcopy(raw)
    small["name"] = "small-cnn-zoo-tiny"
    small["grid"] = {"model": {"activation": ["relu"], "init_scale": [0.5, 1.5],
                               "init": ["xavier_normal"], "dropout": [0.0, 0.3]},
                     "train": {"optimizer": ["adam"], "lr": [0.05], "weight_decay": [0.001]},
                     "dataset": {"n_train": [512]}}
    return ZooSpec.from_dict(small)


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    spec = shrunken_recipe()
    stores = []
    for name in ("first", "second"):
        store = Store(tmp_path_factory.mktemp(name) / "store", create=True)
        build_zoo(spec, store, device="cpu")
        stores.append(store)
    return spec, stores


QUERY = "SELECT run_id, step FROM checkpoints ORDER BY run_id, step"


def checkpoints_per_run(spec: ZooSpec) -> int:
    run = spec.runs[0]
    return len(run.checkpoint_steps(run.train.total_steps(run.dataset.n_train)))


def test_a_shrunken_copy_trains(two_builds):
    spec, (store, _) = two_builds
    loss = store.sql("SELECT run_id, step, value FROM metrics WHERE metric = 'train_loss' "
                     "ORDER BY run_id, step").to_dicts()
    by_run: dict[str, list[float]] = {}
    for row in loss:
        by_run.setdefault(row["run_id"], []).append(row["value"])
    assert sorted(by_run) == sorted(run.run_id for run in spec.runs)
    for run_id, values in by_run.items():
        assert len(values) == checkpoints_per_run(spec) and values[-1] < values[0], run_id
    best = store.sql("SELECT max(value) AS v FROM final WHERE metric = 'test_acc'")["v"][0]
    assert best > 0.3  # of 10 classes, after 32 steps
    # the init scale is the draw times the factor: the same draw (same seed, scheme) at 1.5
    # is three times the one at 0.5, biases zero either way
    state = {}
    for run in spec.runs:
        state[(run.model.dropout, run.model.init_scale)] = store.load_model(
            run.run_id, step=0).state_dict()
    for dropout in (0.0, 0.3):
        low, high = state[(dropout, 0.5)], state[(dropout, 1.5)]
        for name, value in low.items():
            if value.dim() >= 2:
                torch.testing.assert_close(high[name], 3 * value, rtol=1e-6, atol=0)
            elif name.endswith("bias"):
                assert torch.count_nonzero(value) == 0 and torch.equal(high[name], value)


def test_two_builds_give_the_same_runs_and_weights(two_builds):
    spec, (first, second) = two_builds
    ids = sorted(run.run_id for run in spec.runs)
    for store in (first, second):
        assert sorted(store.sql("SELECT run_id FROM runs")["run_id"].to_list()) == ids
    keys = first.sql(QUERY).rows()
    assert keys == second.sql(QUERY).rows()
    assert len(keys) == checkpoints_per_run(spec) * len(ids)
    for run_id, step in keys:  # every tensor, dropout's seed and counter included
        a, b = first.load_state_dict(run_id, step), second.load_state_dict(run_id, step)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    metrics = ("SELECT run_id, step, metric, value FROM metrics WHERE tensor IS NULL "
               "AND metric IN ('train_loss', 'test_acc') ORDER BY ALL")
    assert first.sql(metrics).equals(second.sql(metrics))


def test_stats_features_span_runs_with_and_without_dropout(two_builds):
    # dropout's two int64 buffers exist only where dropout > 0: the statistics are of the
    # tensors every run holds, the convolutions' and the classifier's weights and biases
    from dlstore.analysis.wsl import WeightDataset, fit_predictor

    spec, (store, _) = two_builds
    ds = WeightDataset(store, QUERY, target="test_acc", features="stats",
                       splits={"train": 0.5, "test": 0.5})
    tensors = {name.rsplit(".", 1)[0] for name in ds.feature_names}
    assert tensors == {f"convs.{i}.{p}" for i in range(3) for p in ("weight", "bias")} | {
        "out.weight", "out.bias"}
    assert ds.features.shape == (4 * checkpoints_per_run(spec), 8 * 7)
    assert torch.isfinite(ds.features).all()
    assert fit_predictor(ds, model="linear").kendall_tau is not None


def test_weights_as_data_leave_out_integer_buffers(two_builds):
    # dropout's seed and call counter are int64: the call counter is the training step, which a
    # weight-space feature must not see; weights as data are the floating-point tensors only
    _, (store, _) = two_builds
    query = ("SELECT c.run_id, c.step FROM checkpoints c JOIN runs r USING (run_id) "
             "WHERE json_extract(r.config, '$.model.dropout')::DOUBLE > 0 ORDER BY ALL")
    run_id, step = store.sql(query).row(-1)
    state = store.load_state_dict(run_id, step)
    assert {k for k, v in state.items() if not v.is_floating_point()}  # the run has them
    flat, layout = store.weights(query)
    assert [e.name for e in layout.entries] == [k for k, v in state.items()
                                                if v.is_floating_point()]
    assert torch.equal(flat[-1], torch.cat([v.flatten() for v in state.values()
                                            if v.is_floating_point()]))
