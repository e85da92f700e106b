"""The recipes: signatures on rows whose truth is known, the plot commands on a tiny built zoo,
the recipe specs themselves, and (marked slow) the signatures in the zoos the recipes build."""

import textwrap
from pathlib import Path

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from dlstore.analysis.phenomena import (
    collapse_signature,
    collapse_table,
    double_descent_signature,
    double_descent_table,
    epochwise_table,
    grokking_signature,
    grokking_table,
    simplicity_signature,
    simplicity_table,
)
from dlstore.building.build import build_zoo
from dlstore.cli import app
from dlstore.datasets.base import gaussian_clone
from dlstore.errors import NotFoundError
from dlstore.metrics.backfill import backfill_checkpoint_metrics
from dlstore.spec import ZooSpec
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
RECIPES = ("double-descent", "grokking", "neural-collapse", "simplicity-bias")


# -- signatures on known rows ---------------------------------------------------------------------

def test_double_descent_signature_finds_the_peak_at_the_interpolation_threshold():
    # the narrowest networks may err more than the peak: it is a peak above the classical optimum
    table = pl.DataFrame({"width": [2, 4, 8, 16, 32, 64],
                          "train_error": [0.5, 0.3, 0.1, 0.0, 0.0, 0.0],
                          "test_error": [0.7, 0.45, 0.5, 0.6, 0.45, 0.4]})
    sig = double_descent_signature(table)
    assert sig["threshold_width"] == 16 and sig["peak_width"] == 16
    assert sig["classical_width"] == 4 and sig["classical_error"] == 0.45
    assert sig["peak_error"] == 0.6 and sig["descends_twice"]
    # a single descent: the error only falls
    single = table.with_columns(pl.Series("test_error", [0.6, 0.5, 0.45, 0.42, 0.41, 0.4]))
    assert not double_descent_signature(single)["descends_twice"]
    # a peak far from where the training set is fitted is not the interpolation peak
    far = table.with_columns(pl.Series("test_error", [0.5, 0.4, 0.45, 0.42, 0.5, 0.6]))
    assert not double_descent_signature(far)["descends_twice"]
    # a bump within seed noise of the classical optimum is no peak
    flat = table.with_columns(pl.Series("test_error", [0.59, 0.57, 0.58, 0.585, 0.56, 0.55]))
    assert not double_descent_signature(flat)["descends_twice"]
    # no width interpolates: the rise is there, the second descent is not measured
    short = table.with_columns(pl.Series("train_error", [0.5, 0.3, 0.2, 0.1, 0.08, 0.05]))
    assert double_descent_signature(short)["threshold_width"] is None
    assert not double_descent_signature(short)["descends_twice"]


def test_grokking_signature_measures_the_delay_per_weight_decay():
    steps = [0, 10, 100, 1000, 10000]
    table = pl.DataFrame({
        "weight_decay": [0.0] * 5 + [0.1] * 5, "step": steps * 2,
        "train_acc": [0.01, 0.5, 1.0, 1.0, 1.0] + [0.01, 0.4, 1.0, 1.0, 1.0],
        "test_acc": [0.01, 0.01, 0.02, 0.03, 0.05] + [0.01, 0.01, 0.02, 0.5, 0.97]})
    sig = grokking_signature(table)
    assert sig["weight_decay"].to_list() == [0.0, 0.1]
    assert sig["fit_step"].to_list() == [100, 100]
    assert sig["generalise_step"].to_list() == [None, 10000]
    assert sig["delay"].to_list() == [None, 100.0]
    assert sig["final_test_acc"].to_list() == [0.05, 0.97]


def test_collapse_signature_reads_the_terminal_phase():
    table = pl.DataFrame({
        "step": [1, 10, 100, 1000, 10000], "train_acc": [0.3, 0.9, 1.0, 1.0, 1.0],
        "test_acc": [0.3, 0.7, 0.8, 0.8, 0.8], "nc1": [5.0, 2.0, 1.0, 0.3, 0.1],
        "nc2_equinorm": [0.5] * 5, "nc2_equiangular": [0.4] * 5, "nc3": [1.0] * 5,
        "nc4": [0.2, 0.1, 0.05, 0.01, 0.0]})
    sig = collapse_signature(table)
    assert sig["zero_error_step"] == 100 and sig["nc1_at_zero_error"] == 1.0
    assert sig["nc1_last"] == 0.1 and sig["nc4_last"] == 0.0 and sig["nc1_falls"]
    rising = table.with_columns(pl.Series("nc1", [5.0, 2.0, 1.0, 0.5, 0.8]))
    assert not collapse_signature(rising)["nc1_falls"]
    unfit = table.with_columns(pl.Series("train_acc", [0.3, 0.5, 0.6, 0.7, 0.8]))
    assert collapse_signature(unfit) == {"zero_error_step": None, "last_step": 10000,
                                         "nc1_falls": False}


def test_simplicity_signature_tracks_early_and_separates_late():
    table = pl.DataFrame({"step": [0, 10, 100, 1000, 10000],
                          "test_acc": [0.1, 0.3, 0.5, 0.7, 0.8],
                          "clone_acc": [0.1, 0.29, 0.48, 0.5, 0.45]})
    table = table.with_columns((pl.col("test_acc") - pl.col("clone_acc")).alias("gap"))
    sig = simplicity_signature(table, chance=0.1)
    assert sig["halfway_step"] == 100  # 0.1 + (0.8 - 0.1) / 2 = 0.45 first reached at 100
    assert sig["early_max_gap"] == pytest.approx(0.02)
    assert sig["final_gap"] == pytest.approx(0.35)
    assert sig["tracks_early"] and sig["separates_late"]
    apart = table.with_columns(pl.Series("gap", [0.0, 0.2, 0.3, 0.3, 0.35]))
    assert not simplicity_signature(apart, chance=0.1)["tracks_early"]


# -- the plot commands on a tiny zoo --------------------------------------------------------------

TINY = textwrap.dedent("""
    name = "tiny-recipe"
    seeds = 1
    checkpoints = "log:5"
    [dataset]
    name = "gaussian_mixture"
    n_samples = 400
    [model]
    arch = "mlp"
    depth = 1
    [train]
    lr = 0.1
    batch_size = 32
    steps = 60
    [grid]
    model.width = [4, 8, 16]
    train.weight_decay = [0.0, 0.01]
    [metrics]
    statistics = false
    spectra = false
    neural_collapse = { at = "all", subsample = 200 }
    gaussian_clone = true
""")


# what the grokking figure is about: modular arithmetic, a weight-decay axis, seeds for bands
TINY_GROK = textwrap.dedent("""
    name = "tiny-grok"
    seeds = 2
    checkpoints = "log:4"
    [dataset]
    name = "modular"
    p = 7
    [model]
    arch = "mlp"
    width = 8
    depth = 1
    [train]
    optimizer = "adamw"
    lr = 0.01
    batch_size = 16
    steps = 30
    [grid]
    train.weight_decay = [0.0, 0.1]
    [metrics]
    statistics = false
    spectra = false
""")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("recipes") / "store", create=True)
    build_zoo(ZooSpec.from_text(TINY), store, device="cpu")
    build_zoo(ZooSpec.from_text(TINY_GROK), store, device="cpu")
    return store


def test_recipe_tables_read_the_store(tiny_store):
    zoo = "tiny-recipe"
    table = double_descent_table(tiny_store, zoo)
    assert table["width"].to_list() == [4, 8, 16] and table["runs"].to_list() == [2, 2, 2]
    final = tiny_store.sql("SELECT width, avg(value) AS acc FROM final WHERE metric = 'test_acc' "
                           "AND zoo = ? GROUP BY width ORDER BY width", [zoo])
    assert (1 - table["test_error"]).to_list() == pytest.approx(final["acc"].to_list())
    grok = grokking_table(tiny_store, zoo)
    assert sorted(set(grok["weight_decay"].to_list())) == [0.0, 0.01]
    assert grok["step"].min() == 0 and grok["step"].max() == 60
    collapse = collapse_table(tiny_store, zoo)
    assert collapse["runs"].to_list() == [6] * collapse.height  # 3 widths x 2 weight decays
    assert (collapse["nc1"] > 0).all()
    simple = simplicity_table(tiny_store, zoo)
    assert simple["gap"].to_list() == pytest.approx(
        (simple["test_acc"] - simple["clone_acc"]).to_list())
    # Gaussian classes: the clone is the same distribution, so the two accuracies agree
    assert simple["gap"].abs().max() < 0.1
    with pytest.raises(NotFoundError, match="no train_acc, test_acc rows for zoo 'nope'"):
        grokking_table(tiny_store, "nope")


def test_recipe_plot_commands_write_figures(tiny_store, tmp_path):
    runner = CliRunner()
    for recipe in RECIPES:
        png = tmp_path / f"{recipe}.png"
        zoo = "tiny-grok" if recipe == "grokking" else "tiny-recipe"
        result = runner.invoke(app, ["plot", recipe, "--store", str(tiny_store.root), "--zoo",
                                     zoo, "--out", str(png)])
        assert result.exit_code == 0, (recipe, result.output)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(app, ["plot", "grokking", "--store", str(tiny_store.root)])
    assert result.exit_code == 1 and "zoo 'grokking'" in str(result.exception)


def test_recipe_plots_refuse_a_zoo_lacking_what_they_are_about(tiny_store, tmp_path):
    runner = CliRunner()
    cases = {"grokking": ("tiny-recipe", "trained on gaussian_mixture; the grokking figure is "
                                         "about modular"),
             "double-descent": ("tiny-grok", "has 1 distinct width; the double-descent figure "
                                             "needs at least 3"),
             "neural-collapse": ("tiny-grok", "has no nc1"),
             "simplicity-bias": ("tiny-grok", "has no clone_acc")}
    for recipe, (zoo, message) in cases.items():
        out = tmp_path / f"{recipe}.png"
        result = runner.invoke(app, ["plot", recipe, "--store", str(tiny_store.root), "--zoo",
                                     zoo, "--out", str(out)])
        assert result.exit_code == 1, recipe
        assert isinstance(result.exception, NotFoundError) and message in str(result.exception)
        assert not out.exists()


def test_recipe_figure_goes_into_a_directory_and_as_vector(tiny_store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["plot", "grokking", "--store", str(tiny_store.root), "--zoo",
                                 "tiny-grok", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grokking.png").is_file() and not (tmp_path.parent / "grokking.png"
                                                          ).exists()
    for suffix, magic in ((".pdf", b"%PDF"), (".svg", b"<?xml")):
        path = tmp_path / f"g{suffix}"
        result = runner.invoke(app, ["plot", "grokking", "--store", str(tiny_store.root),
                                     "--zoo", "tiny-grok", "--out", str(path)])
        assert result.exit_code == 0 and path.read_bytes().startswith(magic)
    result = runner.invoke(app, ["plot", "grokking", "--store", str(tiny_store.root), "--zoo",
                                 "tiny-grok", "--out", str(tmp_path / "g.txt")])
    assert result.exit_code == 1 and ".png, .pdf, .svg" in str(result.exception)


def test_a_zoo_without_the_recipe_metrics_is_told_how_to_add_them(tmp_path):
    store = Store(tmp_path / "s", create=True)
    text = TINY.split("[grid]")[0].replace("steps = 60", "steps = 20")
    build_zoo(ZooSpec.from_text(text), store, device="cpu")
    with pytest.raises(NotFoundError, match="no clone_acc, clone_loss rows.*metrics compute"):
        simplicity_table(store, "tiny-recipe")
    # ... and `metrics compute` adds them, as the evaluator of a build would have computed them
    clone = ZooSpec.from_text(text + "[metrics]\ngaussian_clone = true\n")
    added = backfill_checkpoint_metrics(StoreWriter(store), clone.name, clone.runs, clone.metrics)
    table = simplicity_table(store, "tiny-recipe")
    assert added == table.height == 5
    run = store.runs()["run_id"][0]
    data = store.load_dataset(run)
    model = store.load_model(run)
    clone = gaussian_clone(data["x_test"], data["y_test"], store.run(run)["n_classes"], seed=0)
    with torch.no_grad():
        acc = (model(clone).argmax(1) == data["y_test"]).double().mean().item()
    assert table["clone_acc"][-1] == pytest.approx(acc, abs=1e-9)


def test_recipe_specs_parse_and_ask_for_their_metrics():
    for recipe in RECIPES:
        spec = ZooSpec.from_toml(ZOO_DIR / f"{recipe}.toml")
        assert spec.name == recipe
    collapse = ZooSpec.from_toml(ZOO_DIR / "neural-collapse.toml").metrics
    assert collapse.get("neural_collapse").at == "all"
    assert ZooSpec.from_toml(ZOO_DIR / "simplicity-bias.toml").metrics.get(
        "gaussian_clone").at == "all"
    assert len({r.train.weight_decay for r in ZooSpec.from_toml(ZOO_DIR / "grokking.toml").runs
                }) > 1


def test_cpu_grokking_transformer_recipe_is_full_batch_over_a_weight_decay_grid():
    # the README's built transformer grokking recipe: its zoo name is what `plot grokking --zoo`
    # is given, and every step sees the whole training set (481 of the 961 pairs mod 31)
    path = ZOO_DIR / "grokking-transformer-cpu.toml"
    spec = ZooSpec.from_toml(path)
    assert spec.name == path.stem
    assert len(spec.runs) == 8  # 4 weight decays x 2 seeds
    assert sorted({r.train.weight_decay for r in spec.runs}) == [0.0, 0.5, 1.0, 2.0]
    for run in spec.runs:
        n_train = run.dataset.generate().x_train.shape[0]
        assert n_train == 481 and run.train.batch_size == n_train
        assert run.train.steps_per_epoch(n_train) == 1 and run.train.total_steps(n_train) == 5000
        assert run.model.arch == "transformer" and run.model.depth == 1
        assert run.model.width // run.model.head_dim in (2, 4)


# -- the signatures in the zoos the recipes build (minutes each) ----------------------------------

def _build_recipe(recipe: str, tmp_path) -> Store:
    store = Store(tmp_path / recipe, create=True)
    build_zoo(ZooSpec.from_toml(ZOO_DIR / f"{recipe}.toml"), store, device="cpu")
    return store


@pytest.mark.slow
def test_simplicity_bias_recipe_tracks_the_clone_early_and_separates_late(tmp_path):
    sig = simplicity_signature(simplicity_table(_build_recipe("simplicity-bias", tmp_path)),
                               chance=0.1)
    # measured: within 0.009 up to step 257 (test accuracy 0.36), 0.14 apart at the end
    assert sig["tracks_early"] and sig["early_max_gap"] < 0.03
    assert sig["separates_late"] and sig["final_gap"] > 0.1
    assert sig["final_test_acc"] > 0.55


@pytest.mark.slow
def test_neural_collapse_recipe_collapses_in_the_terminal_phase(tmp_path):
    sig = collapse_signature(collapse_table(_build_recipe("neural-collapse", tmp_path)))
    # measured: train error 0 from step 500 of 6,000; NC1 2.41 -> 1.73, NC4 0.149 -> 0.080
    assert sig["zero_error_step"] is not None and sig["zero_error_step"] <= sig["last_step"] / 4
    assert sig["nc1_falls"] and sig["nc1_last"] < 0.8 * sig["nc1_at_zero_error"]
    assert sig["nc4_last"] < 0.7 * sig["nc4_at_zero_error"]
    assert sig["nc2_equinorm_last"] < sig["nc2_equinorm_at_zero_error"]
    assert sig["nc2_equiangular_last"] < sig["nc2_equiangular_at_zero_error"]
    # what did not happen: the classifier does not align further with the class means
    assert abs(sig["nc3_last"] - sig["nc3_at_zero_error"]) < 0.05


@pytest.mark.slow
def test_grokking_recipe_generalises_long_after_fitting_only_with_weight_decay(tmp_path):
    table = grokking_table(_build_recipe("grokking", tmp_path))
    sig = {r["weight_decay"]: r for r in grokking_signature(table).iter_rows(named=True)}
    # measured: fitted by step 1,351-4,215; test accuracy at 60,000 steps 0.001 / 0.37 / 0.98 /
    # 0.95 for weight decay 0 / 0.1 / 0.3 / 1, first >= 0.9 at the last checkpoint
    assert all(r["final_train_acc"] == 1.0 for r in sig.values())
    for wd in (0.3, 1.0):
        fitted = table.filter((pl.col("weight_decay") == wd)
                              & (pl.col("step") <= sig[wd]["fit_step"]))
        assert fitted["test_acc"].max() < 0.05  # nothing generalised when the train set was fit
        assert sig[wd]["final_test_acc"] > 0.9 and sig[wd]["delay"] > 10
    assert sig[0.0]["final_test_acc"] < 0.05 and sig[0.0]["generalise_step"] is None


@pytest.mark.slow
def test_double_descent_recipe_peaks_at_the_interpolation_threshold(tmp_path):
    store = _build_recipe("double-descent", tmp_path)
    sig = double_descent_signature(double_descent_table(store))
    # measured: test error 0.69 (width 2) -> 0.47 (width 32) -> 0.54 (width 256, train error
    # 0.047) -> 0.53 (512, the first width with train error 0) -> 0.50 (1024)
    assert sig["threshold_width"] in (256, 512, 1024) and sig["classical_width"] <= 64
    assert sig["descends_twice"] and sig["peak_error"] > sig["classical_error"] + 0.04
    # epoch-wise: the widest networks' test error falls, then rises as they fit the noise
    for width, part in epochwise_table(store, widths=3).group_by("width"):
        assert part.sort("step")["test_error"][-1] > part["test_error"].min() + 0.02, width
