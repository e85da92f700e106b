"""`dlstore wsl fit` and `dlstore wsl export`: fits table, figure, exported files, errors."""

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

import dlstore
from dlstore.analysis.wsl import WeightSpaceError, canonical_flat
from dlstore.analysis.wsl_export import export
from dlstore.layout import Layout
from tests.test_cli import dlstore as run_cli

ALL = "SELECT run_id, step FROM checkpoints ORDER BY run_id, step"
WIDE = ("SELECT run_id, step FROM checkpoints JOIN runs USING (run_id) WHERE width = 16 "
        "ORDER BY run_id, step")


def run_in_process(capsys, *args) -> tuple[int, str, str]:
    """The CLI's entry point called in this process (imports already paid for): exit status,
    stdout, stderr."""
    from tests.test_cli_output import cli

    return cli(capsys, *args)


@pytest.fixture(scope="module")
def store_copy(tmp_path_factory, built_store):
    """A copy of the tiny store that `wsl fit` may add fits rows to."""
    root = tmp_path_factory.mktemp("wsl") / "store"
    shutil.copytree(built_store.root, root)
    return root


def test_cli_choices_are_the_library_names():
    from dlstore import cli
    from dlstore.analysis import wsl, wsl_export

    for choices, names in ((cli.WslFeatures, wsl.FEATURES), (cli.WslModel, wsl.MODELS),
                           (cli.WslTask, wsl.TASKS), (cli.WslFormat, wsl_export.FORMATS)):
        assert tuple(c.value for c in choices) == names


def test_fit_prints_saves_and_plots(store_copy, tmp_path):
    plot = tmp_path / "wsl.png"
    result = run_cli("wsl", "fit", "--store", str(store_copy), "--query", ALL, "--target",
                     "test_acc", "--features", "stats", "--model", "linear", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert "Kendall tau" in result.stdout and "held-out runs" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fits = dlstore.open(store_copy).sql("SELECT * FROM fits WHERE kind = 'wsl'")
    assert fits.height == 1 and fits["query"][0] == ALL and fits["n"][0] == 40
    params = json.loads(fits["params"][0])
    assert params["model"] == "linear" and params["features"] == "stats"
    assert params["target"] == "test_acc" and params["task"] == "regression"
    assert f"Kendall tau {params['kendall_tau']:.4f}, R^2 {params['r2']:.4f}" in result.stdout
    assert params["n_train"] + params["n_test"] == 40


def test_fit_classification_and_padded_flat_features(store_copy, tmp_path, capsys):
    code, out, err = run_in_process(
        capsys, "wsl", "fit", "--store", str(store_copy), "--query", ALL, "--target", "lr",
        "--task", "classification", "--features", "flat", "--pad", "--model", "gbm",
        "--plot", str(tmp_path / "lr.png"))
    assert code == 0, err
    assert "accuracy" in out and "over 2 classes" in out
    assert (tmp_path / "lr.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--query", "SELECT run_id FROM runs"], "must return run_id and step"),
    (["--query", ALL, "--target", "nope"], "unknown target 'nope'"),
    (["--query", ALL, "--features", "flat"], "mixes 2 weight layouts"),
    (["--query", ALL, "--split", "0.5,0.5"], "--split takes three fractions"),
    (["--query", ALL, "--split", "1,0,0"], "needs runs in a train and a test split"),
    (["--query", ALL, "--plot", "/nonexistent/dir/x.png"], "does not exist"),
])
def test_fit_errors_are_one_line(store_copy, tmp_path, capsys, args, message):
    code, _, err = run_in_process(capsys, "wsl", "fit", "--store", str(store_copy), "--plot",
                                  str(tmp_path / "x.png"), *args)
    assert code == 1
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_unterthiner_export_matches_the_pull(built_store, tmp_path):
    out = tmp_path / "zoo"
    report = export(built_store, WIDE, "unterthiner", out, seed=2)
    weights, layout = built_store.weights(WIDE)
    assert np.array_equal(np.load(out / "weights.npy"), weights.numpy())
    # layout.csv maps columns of weights.npy back to every tensor
    table = pl.read_csv(out / "layout.csv")
    assert table.columns == ["varname", "start_idx", "end_idx", "shape"]
    run_id, step = built_store.sql(WIDE).row(3)
    state = built_store.load_state_dict(run_id, step)
    row = np.load(out / "weights.npy")[3]
    for name, start, end, shape in table.iter_rows():
        value = row[start:end].reshape(eval(shape))  # shape is a Python tuple literal
        assert np.array_equal(value, state[name].numpy())
    # metrics.csv: one row per weights row, same order, with the metrics at that step
    metrics = pl.read_csv(out / "metrics.csv")
    assert metrics.select("run_id", "step").equals(built_store.sql(WIDE))
    stored = built_store.sql("SELECT value FROM metrics WHERE run_id = ? AND step = ? "
                             "AND metric = 'test_acc'", [run_id, step])["value"][0]
    assert metrics["test_acc"][3] == pytest.approx(stored)
    assert np.allclose(metrics["generalization_gap"],
                       metrics["train_acc"] - metrics["test_acc"])
    assert {"lr", "width", "epoch"} <= set(metrics.columns)
    # split files: whole runs per split, rows partitioned, as report says
    splits = pl.read_csv(out / "splits.csv")
    assert splits["row"].to_list() == list(range(20))
    assert splits.group_by("run_id").agg(pl.col("split").n_unique())["split"].max() == 1
    listed = json.loads((out / "splits.json").read_text())
    assert sorted(sum(listed.values(), [])) == list(range(20))
    assert {k: len(v) for k, v in listed.items()} == report.split_sizes
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == "unterthiner" and meta["rows"] == 20 and meta["query"] == WIDE
    assert Layout.from_json(json.dumps(meta["layout"])) == layout


def test_layer_list_exports(built_store, tmp_path):
    weights, layout = built_store.weights(WIDE)
    state = layout.unflatten(weights)
    export(built_store, WIDE, "nfn", tmp_path / "nfn")
    export(built_store, WIDE, "dwsnets", tmp_path / "dws")
    for i in range(2):
        w, b = state[f"layers.{i}.weight"].numpy(), state[f"layers.{i}.bias"].numpy()
        assert np.array_equal(np.load(tmp_path / "nfn" / f"weight_{i}.npy"), w[:, None])
        assert np.array_equal(np.load(tmp_path / "nfn" / f"bias_{i}.npy"), b[:, None])
        dws = np.load(tmp_path / "dws" / f"weight_{i}.npy")
        assert dws.shape == (20, w.shape[2], w.shape[1], 1)
        assert np.array_equal(dws[..., 0], w.transpose(0, 2, 1))
        assert np.array_equal(np.load(tmp_path / "dws" / f"bias_{i}.npy"), b[..., None])


def test_canonical_and_padded_exports(built_store, tmp_path):
    export(built_store, WIDE, "unterthiner", tmp_path / "c", canonical=True, batch_size=6)
    weights, layout = built_store.weights(WIDE)
    exported = torch.from_numpy(np.load(tmp_path / "c" / "weights.npy"))
    assert torch.equal(exported, canonical_flat(weights, layout))
    export(built_store, ALL, "unterthiner", tmp_path / "p", pad=True)
    union = Layout.union(built_store.weight_layouts(ALL)[0])
    padded, _ = built_store.weights(ALL, layout=union)
    assert np.array_equal(np.load(tmp_path / "p" / "weights.npy"), padded.numpy())


def test_export_refuses_bad_targets_and_leaves_nothing(built_store, tmp_path):
    with pytest.raises(WeightSpaceError, match="inside the store"):
        export(built_store, WIDE, "nfn", built_store.root / "export")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    with pytest.raises(WeightSpaceError, match="not an empty directory"):
        export(built_store, WIDE, "nfn", taken)
    with pytest.raises(WeightSpaceError, match="unknown export format"):
        export(built_store, WIDE, "tfrecord", tmp_path / "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert not (built_store.root / "export").exists()


def test_export_cli(built_store, tmp_path):
    out = tmp_path / "out"
    result = run_cli("wsl", "export", "--store", str(built_store.root), "--query", WIDE,
                     "--format", "dwsnets", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "20 checkpoints of 4 runs" in result.stdout
    assert (out / "weight_1.npy").is_file() and (out / "splits.csv").is_file()



def test_export_cli_errors_are_one_line(built_store, tmp_path, capsys):
    code, _, err = run_in_process(capsys, "wsl", "export", "--store", str(built_store.root),
                                  "--query", ALL, "--out", str(tmp_path / "mixed"))
    assert code == 1 and "--pad" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mixed").exists()
