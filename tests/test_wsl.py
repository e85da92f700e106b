"""Weight-space learning: permutation symmetry, features, targets, splits by run, baselines."""

import numpy as np
import polars as pl
import pytest
import torch
from torch.func import functional_call

from dlstore.analysis.wsl import (
    WeightDataset,
    WeightSpaceError,
    canonical_flat,
    canonicalize,
    fit_predictor,
    hidden_layers,
    random_permutation,
    split_runs,
    stats_features,
)
from dlstore.architectures.cnn1d import CNN1dOptions
from dlstore.architectures.mlp import MLPOptions
from dlstore.errors import NotFoundError, QueryError
from dlstore.layout import Layout

ALL = "SELECT run_id, step FROM checkpoints ORDER BY run_id, step"
WIDE = ("SELECT run_id, step FROM checkpoints JOIN runs USING (run_id) WHERE width = 16 "
        "ORDER BY run_id, step")

NETWORKS = {
    "mlp": (MLPOptions(arch="mlp", width=6, depth=3), (12,), 5),
    "cnn1d": (CNN1dOptions(arch="cnn1d", width=5, depth=2, kernel=3), (16,), 4),
}


def population(name: str, n: int = 4):
    """n random networks of one architecture, stacked [n, ...], with their layout and inputs."""
    options, shape, classes = NETWORKS[name]
    torch.manual_seed(0)
    module = options.build(shape, classes)
    members = [options.build(shape, classes).state_dict() for _ in range(n)]
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    return module, stacked, Layout.from_state_dict(members[0]), torch.randn(9, *shape)


def outputs(module, stacked, x):
    n = next(iter(stacked.values())).shape[0]
    return torch.stack([functional_call(module, {k: v[i] for k, v in stacked.items()}, (x,))
                        for i in range(n)])


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_hidden_unit_permutation_keeps_function_stats_and_canonical_form(name):
    module, params, layout, x = population(name)
    layers = hidden_layers(layout)
    assert len(layers) == (3 if name == "mlp" else 2)
    permuted = random_permutation(params, layers, torch.Generator().manual_seed(1))
    flat, flat_permuted = layout.flatten(params), layout.flatten(permuted)
    # the function is unchanged, the flat weights are not
    assert torch.allclose(outputs(module, permuted, x), outputs(module, params, x), atol=1e-5)
    assert (flat != flat_permuted).any(1).all()
    # statistics of a tensor do not depend on the order of its entries
    stats, names = stats_features(flat, layout)
    assert stats.shape == (4, 7 * len(layout.entries)) and names[0].endswith(".mean")
    assert torch.allclose(stats_features(flat_permuted, layout)[0], stats, rtol=0, atol=1e-12)
    # every permutation of hidden units has the same canonical form, bit for bit
    canonical = canonical_flat(flat, layout)
    assert torch.equal(canonical_flat(flat_permuted, layout), canonical)
    assert torch.allclose(outputs(module, layout.unflatten(canonical), x),
                          outputs(module, params, x), atol=1e-5)
    # and it is sorted: first layer's units by descending norm of incoming weights and bias
    first = layers[0]
    rows = torch.cat([layout.unflatten(canonical)[n].reshape(4, first.units, -1)
                      for n in first.incoming], 2)
    norms = rows.norm(dim=2)
    assert (norms[:, :-1] >= norms[:, 1:]).all()


def test_canonicalize_leaves_a_canonical_population_unchanged():
    _, params, layout, _ = population("mlp")
    layers = hidden_layers(layout)
    once = canonicalize(params, layers)
    twice = canonicalize(once, layers)
    assert all(torch.equal(once[k], twice[k]) for k in params)


def test_permutation_symmetries_are_known_only_for_registered_families():
    with pytest.raises(WeightSpaceError, match="mlp and cnn1d"):
        hidden_layers(Layout.from_shapes([("encoder.weight", (3, 4)), ("encoder.bias", (3,)),
                                          ("head.weight", (2, 3)), ("head.bias", (2,))]))


def test_splits_hold_whole_runs_and_follow_the_seed():
    runs = [f"r{i}" for i in range(50)]
    split = split_runs(runs, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    assert set(split) == set(runs)
    counts = {name: sum(v == name for v in split.values()) for name in ("train", "val", "test")}
    assert counts == {"train": 35, "val": 5, "test": 10}
    assert split == split_runs(list(reversed(runs)), {"train": 0.7, "val": 0.1, "test": 0.2}, 3)
    assert split != split_runs(runs, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=4)
    # a split with a positive share gets a run even when rounding gives it none
    few = split_runs(["a", "b", "c"], {"train": 0.9, "val": 0.05, "test": 0.05}, seed=0)
    assert sorted(few.values()) == ["test", "train", "val"]
    with pytest.raises(WeightSpaceError, match="whole runs"):
        split_runs(["a"], {"train": 0.5, "test": 0.5}, seed=0)
    with pytest.raises(WeightSpaceError, match="non-negative"):
        split_runs(runs, {"train": -1.0, "test": 2.0}, seed=0)


def test_dataset_from_the_store(built_store):
    ds = WeightDataset(built_store, ALL, target="test_acc", features="stats", seed=1)
    frame = built_store.sql(ALL)
    assert len(ds) == frame.height == 40 and ds.features.shape == (40, 4 * 7)
    assert ds.frame.select("run_id", "step").equals(frame)
    # targets are the metric at the row's own step
    metric = built_store.sql("SELECT run_id, step, value FROM metrics WHERE metric = 'test_acc'")
    expected = frame.join(metric, on=["run_id", "step"], how="left")["value"].to_numpy()
    assert np.allclose(ds.targets.numpy(), expected) and ds.task == "regression"
    # no run in two splits, every row in one
    split = ds.split_frame()
    assert split.group_by("run_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert sorted(np.concatenate([ds.rows(s) for s in ("train", "val", "test")])) == list(
        range(40))
    x, y = ds.split("test")[0]
    assert x.shape == (28,) and x.dtype == torch.float32 and y.dtype == torch.float32
    # stats of runs of two widths are the per-tensor statistics at each run's true shape
    run_id, step = frame.row(0)
    state = built_store.load_state_dict(run_id, step)
    layout = Layout.from_shapes((k, state[k].shape) for k in
                                ["layers.0.weight", "layers.0.bias", "layers.1.weight",
                                 "layers.1.bias"])
    own = stats_features(layout.flatten(state)[None], layout)[0][0]
    assert torch.allclose(ds.features[0], own.float())


def test_targets_from_runs_columns_query_columns_and_the_gap(built_store):
    lr = WeightDataset(built_store, ALL, target="lr", features="stats", task="classification")
    assert lr.task == "classification" and lr.classes == [0.05, 0.2]
    runs = built_store.sql("SELECT run_id, lr FROM runs")
    expected = built_store.sql(ALL).join(runs, on="run_id", how="left")["lr"].to_list()
    assert [lr.classes[i] for i in lr.targets.tolist()] == expected
    named = WeightDataset(built_store, "SELECT run_id, step, IF(width = 8, 'narrow', 'wide') AS "
                          "size FROM checkpoints JOIN runs USING (run_id)", target="size",
                          features="stats")
    assert named.task == "classification" and named.classes == ["narrow", "wide"]
    gap = WeightDataset(built_store, ALL, target="generalization_gap", features="stats")
    wide = built_store.sql("SELECT run_id, step, train_acc - test_acc AS gap FROM metrics_wide")
    expected = built_store.sql(ALL).join(wide, on=["run_id", "step"], how="left")["gap"]
    assert np.allclose(gap.targets.numpy(), expected.to_numpy())
    step = WeightDataset(built_store, ALL, target="step", features="stats")
    assert step.targets.tolist() == built_store.sql(ALL)["step"].cast(float).to_list()


def test_bad_dataset_requests_are_clear_errors(built_store):
    with pytest.raises(NotFoundError, match="unknown target 'accuracy'.*test_acc"):
        WeightDataset(built_store, ALL, target="accuracy", features="stats")
    with pytest.raises(QueryError, match="missing for 40 of 40 rows"):
        WeightDataset(built_store, "SELECT run_id, step, NULL::DOUBLE AS t FROM checkpoints",
                      target="t", features="stats")
    with pytest.raises(WeightSpaceError, match="unknown features"):
        WeightDataset(built_store, ALL, features="pixels")
    with pytest.raises(QueryError, match="run_id and step"):
        WeightDataset(built_store, "SELECT run_id FROM runs", features="stats")
    with pytest.raises(WeightSpaceError, match="regression needs numbers"):
        WeightDataset(built_store, ALL, target="status", features="stats", task="regression")


def test_flat_and_canonical_features_and_augmentation(built_store):
    flat = WeightDataset(built_store, WIDE, features="flat")
    canonical = WeightDataset(built_store, WIDE, features="canonical")
    weights, layout = built_store.weights(WIDE)
    assert torch.equal(flat.features, weights) and flat.layout == layout
    assert torch.equal(canonical.features, canonical_flat(weights, layout))
    train = flat.split("train", augment=True, generator=torch.Generator().manual_seed(0))
    row = int(train.indices[0])
    augmented, target = train[0]
    assert target == flat.targets[row]
    assert not torch.equal(augmented, flat.features[row])
    assert torch.equal(canonical_flat(augmented[None], layout)[0], canonical.features[row])
    with pytest.raises(WeightSpaceError, match="invariant"):
        canonical.split("train", augment=True)


def synthetic(n_runs: int, seed: int, shuffle: bool = False):
    """Stats features of random MLP weights whose per-run scale varies, and a target that is a
    known linear function of those features (shuffled across rows if asked)."""
    rng = np.random.default_rng(seed)
    layout = Layout.from_shapes([("layers.0.weight", (8, 5)), ("layers.0.bias", (8,)),
                                 ("layers.1.weight", (3, 8)), ("layers.1.bias", (3,))])
    scale = torch.as_tensor(rng.uniform(0.2, 2.0, (n_runs * 2, 1)))
    shift = torch.as_tensor(rng.normal(0, 0.5, (n_runs * 2, 1)))
    flat = torch.as_tensor(rng.normal(size=(n_runs * 2, layout.size))) * scale + shift
    x, _ = stats_features(flat, layout)
    x = x.numpy()
    weights = rng.normal(size=x.shape[1])
    y = (x - x.mean(0)) / x.std(0) @ weights
    if shuffle:
        y = rng.permutation(y)
    run_ids = [f"r{i // 2}" for i in range(n_runs * 2)]  # two checkpoints per run
    return WeightDataset.from_arrays(x, y, run_ids, steps=[i % 2 for i in range(n_runs * 2)],
                                     target="y", seed=seed)


@pytest.mark.parametrize("model, tau", [("linear", 0.95), ("gbm", 0.6), ("mlp", 0.6)])
def test_predictors_recover_a_known_signal_and_not_a_shuffled_one(model, tau):
    result = fit_predictor(synthetic(150, seed=0), model=model)
    assert result.kendall_tau > tau and result.r2 > (0.98 if model == "linear" else 0.5)
    assert result.n_test_runs == 30 and result.n_train_runs == 120
    assert result.predictions.height == result.n_test == 60
    assert set(result.predictions["run_id"]).isdisjoint(
        set(result.predictions["run_id"].to_list()) - {f"r{i}" for i in range(150)})
    noise = fit_predictor(synthetic(150, seed=0, shuffle=True), model=model)
    assert abs(noise.kendall_tau) < 0.2


def test_classification_reports_accuracy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    labels = np.where(x[:, 2] > 0, "up", "down")
    ds = WeightDataset.from_arrays(x, labels, [f"r{i}" for i in range(400)], target="side")
    result = fit_predictor(ds, model="linear")
    assert result.task == "classification" and result.kendall_tau is None
    assert result.accuracy > 0.95 and result.classes == ["down", "up"]
    assert set(result.predictions["predicted"]) <= {"down", "up"}
    with pytest.raises(WeightSpaceError, match="unknown model"):
        fit_predictor(ds, model="svm")
