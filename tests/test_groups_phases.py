"""Per-tensor rows in the store, group metrics read back through the store, phases, plots."""

import itertools
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dlstore.analysis.phases import metric_table, phase_of, phase_table
from dlstore.building.build import build_zoo
from dlstore.cli import app
from dlstore.metrics.families import GroupOptions
from dlstore.metrics.groups import GROUP_METRICS, compute_group_metrics
from dlstore.metrics.similarity import linear_cka
from dlstore.metrics.spectra import SPECTRA
from dlstore.metrics.weights import STATISTICS, tensor_statistics
from dlstore.spec import PhaseOptions, ZooSpec
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter

ZOO = textwrap.dedent("""
    name = "{name}"
    seeds = {seeds}
    checkpoints = [0, 20, 40]
    [dataset]
    name = "gaussian_mixture"
    n_samples = 600
    [model]
    arch = "mlp"
    depth = 1
    {model}
    [train]
    lr = 0.05
    batch_size = 32
    steps = 40
    {train}
    [grid]
    model.width = [6, 12]
    [metrics]
    statistics = false
    spectra = "last"
    hessian = {{ subsample = 128, at = "last", iterations = 20 }}
    groups = {{ at = "all", points = 5 }}
    [phases]
    train_loss = 0.3
""")


@pytest.fixture(scope="module")
def group_store(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("groups") / "s", create=True)
    build_zoo(ZooSpec.from_text(ZOO.format(name="grp", seeds=3, model="", train="")), store,
              device="cpu")
    # two seeds whose init and data order are pinned: identical networks
    twin = ZOO.format(name="twin", seeds=2, model="init_seed = 3", train="order_seed = 4")
    build_zoo(ZooSpec.from_text(twin), store, device="cpu")
    return store


def test_per_tensor_metrics_of_a_mixed_width_cohort_use_each_members_true_shape(built_store):
    """The tiny zoo trains widths 8 and 16 in one padded cohort; every stored statistic and
    spectrum equals the one computed from the member's stored (unpadded) weights."""
    final = built_store.sql("SELECT run_id, step, metric, tensor, value FROM final "
                            "WHERE tensor IS NOT NULL")
    assert set(final["metric"]) == set(STATISTICS) | set(SPECTRA)
    assert built_store.sql("SELECT count(DISTINCT cohort_id) AS n FROM runs")["n"][0] < 8
    for run_id in final["run_id"].unique().to_list():
        state = built_store.load_state_dict(run_id)
        rows = final.filter(final["run_id"] == run_id)
        got = {(r["metric"], r["tensor"]): r["value"] for r in rows.iter_rows(named=True)}
        for name, tensor in state.items():
            for stat, value in tensor_statistics(tensor[None]).items():
                assert got[(stat, name)] == pytest.approx(value.item(), rel=1e-12, abs=1e-12)
            if tensor.dim() == 2:
                s = np.linalg.svd(tensor.double().numpy(), compute_uv=False)
                assert got[("spectral_norm", name)] == pytest.approx(s[0], rel=1e-9)
                assert got[("stable_rank", name)] == pytest.approx((s**2).sum() / s[0]**2,
                                                                   rel=1e-9)
        # every parameter tensor has statistics; biases have no spectrum
        assert {t for (m, t) in got if m == "mean"} == set(state)
        assert {t for (m, t) in got if m == "spectral_norm"} == {
            k for k, v in state.items() if v.dim() == 2}


def test_barrier_is_zero_and_cka_one_between_identical_runs(group_store):
    rows = group_store.sql("SELECT width, step, metric, value FROM group_metrics "
                           "WHERE zoo = 'twin'")
    assert set(rows["metric"]) == set(GROUP_METRICS)
    assert rows.height == 2 * 3 * len(GROUP_METRICS)  # 2 widths x 3 checkpoints
    for r in rows.iter_rows(named=True):
        want = 1.0 if r["metric"] == "cka" else 0.0
        assert r["value"] == pytest.approx(want, abs=1e-6), r


def test_group_metrics_equal_the_per_pair_computation(group_store):
    groups = group_store.sql("SELECT group_id, run_ids, step, metric, value FROM group_metrics "
                             "WHERE zoo = 'grp' AND step = 40")
    assert groups["group_id"].n_unique() == 2
    for group_id in groups["group_id"].unique().to_list():
        rows = groups.filter(groups["group_id"] == group_id)
        got = dict(zip(rows["metric"], rows["value"]))
        run_ids = rows["run_ids"][0].to_list()
        assert len(run_ids) == 3
        x = group_store.load_dataset(run_ids[0])["x_test"]
        models = [group_store.load_model(r) for r in run_ids]
        with torch.no_grad():
            feats = [m.features(x).double() for m in models]
            preds = [m(x).argmax(1) for m in models]
        pairs = list(itertools.combinations(range(3), 2))
        cka = np.mean([linear_cka(feats[i][None], feats[j][None]).item() for i, j in pairs])
        disagree = np.mean([(preds[i] != preds[j]).double().mean().item() for i, j in pairs])
        assert got["cka"] == pytest.approx(cka, rel=1e-9)
        assert got["disagreement"] == pytest.approx(disagree, abs=1e-12)
        assert got["train_loss_barrier"] >= 0 and got["test_error_barrier"] >= 0


def test_group_step_is_resumable(group_store):
    before = group_store.sql("SELECT count(*) AS n FROM _group_metrics")["n"][0]
    options = GroupOptions(at="all", points=5)
    assert compute_group_metrics(StoreWriter(group_store), "grp", options) == 0
    assert group_store.sql("SELECT count(*) AS n FROM _group_metrics")["n"][0] == before


@pytest.mark.parametrize("values, phase", [
    ((1.5, -0.2, 0.5), "I"),
    ((1.5, 0.05, 0.5), "II"),
    ((0.01, -0.2, 0.99), "III"),
    ((0.01, 0.0, 0.5), "IV-A"),
    ((0.01, 0.005, 0.95), "IV-B"),
])
def test_phase_labels_follow_the_taxonomy(values, phase):
    assert phase_of(*values) == phase


def test_a_sharp_hessian_counts_as_poorly_trained_only_with_its_threshold():
    assert phase_of(0.01, 0.0, 0.95, hessian_top_eig=50.0) == "IV-B"
    sharp = PhaseOptions(hessian_top_eig=10.0)
    assert phase_of(0.01, 0.0, 0.95, hessian_top_eig=50.0, thresholds=sharp) == "II"


def test_phase_table_uses_the_spec_thresholds(group_store):
    table = phase_table(group_store, "lr", "width", zoo="grp")
    assert table.height == 2 and table["groups"].to_list() == [1, 1]
    assert table["hessian_top_eig"].is_not_null().all()
    for row in table.iter_rows(named=True):  # [phases] train_loss = 0.3 in the spec
        want = phase_of(row["train_loss"], row["mode_connectivity"], row["cka"],
                        thresholds=PhaseOptions(train_loss=0.3))
        assert row["phase"] == want
    strict = phase_table(group_store, "lr", "width", zoo="grp",
                         thresholds=PhaseOptions(train_loss=1e-9))
    assert set(strict["phase"]) <= {"I", "II"}


def test_metric_table_of_run_and_group_metrics(group_store):
    acc = metric_table(group_store, "test_acc", "lr", "width", zoo="grp")
    assert acc["n"].to_list() == [3, 3]
    cka = metric_table(group_store, "cka", "lr", "width", zoo="twin")
    assert cka["cka"].to_list() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_plot_commands_write_figures_and_name_bad_input(group_store, tmp_path):
    runner = CliRunner()
    store = str(group_store.root)
    png = tmp_path / "phases.png"
    result = runner.invoke(app, ["plot", "phases", "--store", store, "--zoo", "grp",
                                 "--x", "lr", "--y", "width", "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = tmp_path / "alpha.png"
    result = runner.invoke(app, ["plot", "metric", "--metric", "stable_rank", "--tensor",
                                 "layers.0.weight", "--store", store, "--x", "lr", "--y",
                                 "width", "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 1000
    for args, message in ((["phases", "--x", "colour", "--y", "width", "--zoo", "grp"],
                           "not a grid axis"),
                          (["phases", "--x", "lr", "--y", "width"], "give --zoo"),
                          (["metric", "--metric", "nope", "--x", "lr", "--y", "width"],
                           "no values of 'nope'")):
        result = runner.invoke(app, ["plot", *args, "--store", store])
        assert result.exit_code == 1 and message in str(result.exception)


def test_metrics_added_to_a_built_spec_are_backfilled_as_a_build_computes_them(tmp_path):
    """A rebuild skips complete runs; `backfill_checkpoint_metrics` adds what the spec now asks
    for, equal to what a build with those metrics records, and adds nothing when rerun."""
    from dlstore.metrics.backfill import backfill_checkpoint_metrics

    base = ZOO.format(name="late", seeds=2, model="", train="")
    plain = base.replace('spectra = "last"', "spectra = false").replace(
        'hessian = { subsample = 128, at = "last", iterations = 20 }', "").replace(
        'groups = { at = "all", points = 5 }', "")
    later = plain.replace("statistics = false", 'statistics = "last"\n'
                          'neural_collapse = { subsample = 100 }')
    late = Store(tmp_path / "late", create=True)
    build_zoo(ZooSpec.from_text(plain), late, device="cpu")
    assert late.sql("SELECT count(*) AS n FROM metrics WHERE tensor IS NOT NULL")["n"][0] == 0
    assert build_zoo(ZooSpec.from_text(later), late, device="cpu").runs_built == 0
    spec = ZooSpec.from_text(later)
    args = (StoreWriter(late), spec.name, spec.runs, spec.metrics)
    assert backfill_checkpoint_metrics(*args) == 4  # 4 runs, last step
    assert backfill_checkpoint_metrics(*args) == 0
    direct = Store(tmp_path / "direct", create=True)
    build_zoo(ZooSpec.from_text(later), direct, device="cpu")
    query = ("SELECT run_id, step, metric, tensor, value FROM metrics "
             "ORDER BY run_id, step, metric, tensor")
    got, want = late.sql(query), direct.sql(query)
    assert got.height == want.height
    assert got.select("run_id", "step", "metric", "tensor").equals(
        want.select("run_id", "step", "metric", "tensor"))
    np.testing.assert_allclose(got["value"].to_numpy(), want["value"].to_numpy(), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.slow
def test_the_phases_zoo_covers_at_least_three_phases(tmp_path):
    """zoo/phases.toml on a corner of its grid (2 seeds): small training sets at a moderate
    learning rate fit (III: well trained, but seeds separated by a barrier), the full training
    set at the smallest learning rate does not (I), and the largest learning rate neither fits
    nor has a barrier (II)."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "zoo" / "phases.toml").read_text()
    text = text.replace("seeds = 3", "seeds = 2")
    text = text.replace("train.lr = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]",
                        "train.lr = [0.003, 0.03, 1.0]")
    text = text.replace("dataset.n_train = [250, 500, 1000, 2000, 4000]",
                        "dataset.n_train = [250, 4000]")
    store = Store(tmp_path / "s", create=True)
    build_zoo(ZooSpec.from_text(text), store, device="cpu")
    table = phase_table(store, "lr", "n_train", zoo="phases")
    phases = dict(zip(zip(table["lr"], table["n_train"]), table["phase"]))
    assert phases[(0.003, 4000)] == "I"
    assert phases[(0.03, 250)] == "III"
    assert phases[(1.0, 4000)] == "II"
    assert len(set(phases.values())) >= 3
