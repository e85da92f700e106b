"""`dlstore import FORMAT PATH`: published zoos in their own layouts (Ray Tune trial folders, the
Small CNN Zoo, Hugging Face checkpoint suites, metrics-only CSVs), with fixtures written here in
exactly those layouts; a round trip through `wsl export --format unterthiner`; resuming after
kill -9; provenance; one-line errors."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dlstore
from dlstore.analysis.wsl import WeightDataset
from dlstore.analysis.wsl_export import export
from dlstore.architectures.registry import run_architecture
from dlstore.building.build import build_zoo
from dlstore.cli import main
from dlstore.errors import SpecError, UsageError
from dlstore.importers import import_zoo
from dlstore.importers.base import ImportSourceError, run_id_of
from dlstore.spec import ZooSpec
from dlstore.store.maintenance import verify


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _cli(*args) -> Result:
    """The command line in this process (a subprocess costs seconds of imports): what `dlstore
    ARGS` prints and its exit code."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


def _cli_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlstore.cli", *map(str, args)],
                          capture_output=True, text=True)


# -- the Small CNN Zoo (Unterthiner et al. 2020) ------------------------------------------------

TF_LAYOUT = [("sequential/conv2d/kernel:0", (3, 3, 1, 16)), ("sequential/conv2d/bias:0", (16,)),
             ("sequential/conv2d_1/kernel:0", (3, 3, 16, 16)),
             ("sequential/conv2d_1/bias:0", (16,)),
             ("sequential/conv2d_2/kernel:0", (3, 3, 16, 16)),
             ("sequential/conv2d_2/bias:0", (16,)),
             ("sequential/dense/kernel:0", (16, 10)), ("sequential/dense/bias:0", (10,))]
CONFIG_COLUMNS = ["config.activation", "config.b_init", "config.dataset",
                  "config.dnn_architecture", "config.dropout", "config.init_std",
                  "config.l2reg", "config.learning_rate", "config.optimizer",
                  "config.train_fraction", "config.w_init"]


def write_small_cnn_zoo(root, models=3, steps=(0, 86, 2600), gz=False, seed=0):
    """The published layout: weights.npy [n, 4970] in TensorFlow order, metrics.csv (a pandas
    index column first, modeldir, step, config.*, metrics), layout.csv."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    d = sum(int(np.prod(s)) for _, s in TF_LAYOUT)
    assert d == 4970
    weights = rng.standard_normal((models * len(steps), d)).astype(np.float32)
    np.save(root / "weights.npy", weights)
    with open(root / "layout.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["varname", "start_idx", "end_idx", "size", "shape"])
        start = 0
        for name, shape in TF_LAYOUT:
            size = int(np.prod(shape))
            w.writerow([name, start, start + size, size, str(shape)])
            start += size
    header = ["", "modeldir", "step", *CONFIG_COLUMNS, "test_accuracy", "test_loss",
              "train_accuracy", "train_loss"]
    rows = []
    for m in range(models):
        for k, step in enumerate(steps):
            i = m * len(steps) + k
            acc = "" if (m, k) == (1, 0) else f"{0.1 + 0.3 * k + 0.01 * m:.4f}"
            rows.append([i, f"{1000 + m}", step, "relu" if m % 2 == 0 else "tanh", "zeros",
                         "mnist", "cnn", 0.05 * m, 0.1, 1e-4, 0.01 * (m + 1), "adam", 0.5,
                         "he_normal", acc, f"{2.0 - 0.5 * k:.4f}", f"{0.12 + 0.3 * k:.4f}",
                         f"{1.9 - 0.5 * k:.4f}"])
    path = root / ("metrics.csv.gz" if gz else "metrics.csv")
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return weights


def test_small_cnn_zoo_imports_transposed_to_pytorch_and_loads_as_cnn2d(tmp_path):
    weights = write_small_cnn_zoo(tmp_path / "sczoo", gz=True)
    store = dlstore.open(tmp_path / "s", create=True)
    report = import_zoo(store, "unterthiner", tmp_path / "sczoo", zoo="sczoo")
    assert (report.runs, report.checkpoints, report.errors) == (3, 9, [])
    assert report.metric_rows == 9 * 4 - 1  # the empty cell is no row
    runs = store.sql("SELECT run_id, arch, width, depth, lr, weight_decay, optimizer, dataset, "
                     "n_params, final_step, config FROM runs ORDER BY run_id").to_dicts()
    assert {(r["arch"], r["width"], r["depth"], r["n_params"], r["final_step"], r["optimizer"],
             r["dataset"]) for r in runs} == {("cnn2d", 16, 3, 4970, 2600, "adam", "mnist")}
    config = json.loads(runs[0]["config"])
    assert config["model"]["arch"] == "cnn2d" and config["input_shape"] == [1, 28, 28]
    one = store.run(run_id_of("sczoo", "1001"))
    config = one["config"]  # the published config.* values, by their names
    assert (config["source"], config["learning_rate"], config["activation"], config["w_init"],
            one["lr"], one["weight_decay"]) == ("1001", 0.02, "tanh", "he_normal", 0.02, 1e-4)
    assert store.sql("SELECT DISTINCT metric FROM metrics ORDER BY 1")["metric"].to_list() == [
        "test_acc", "test_loss", "train_acc", "train_loss"]
    # row 3 (model 1001, step 0): its kernels are the TF ones transposed HWIO -> OIHW
    state = store.load_state_dict(run_id_of("sczoo", "1001"), 0)
    row = torch.from_numpy(weights[3])
    kernel = row[:144].reshape(3, 3, 1, 16)
    assert torch.equal(state["convs.0.weight"], kernel.permute(3, 2, 0, 1))
    dense = row[4970 - 170:4970 - 10].reshape(16, 10)
    assert torch.equal(state["out.weight"], dense.t())
    model = store.load_model(run_id_of("sczoo", "1001"), 0)
    assert isinstance(model.act, torch.nn.Tanh)  # config.activation of model 1001
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert store.sql("SELECT count(*) FROM metrics WHERE run_id = ? AND step = 0",
                     [run_id_of("sczoo", "1001")]).item() == 3


TINY_CNN = textwrap.dedent("""
    name = "built"
    seeds = 2
    checkpoints = [0, 3, 6]

    [dataset]
    name = "digits"

    [model]
    arch = "cnn2d"
    width = 4
    depth = 2

    [train]
    lr = 0.05
    batch_size = 256
    steps = 6
""")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store holding a tiny built cnn2d zoo (2 runs x 3 checkpoints on digits)."""
    store = dlstore.open(tmp_path_factory.mktemp("built") / "s", create=True)
    build_zoo(ZooSpec.from_text(TINY_CNN), store, device="cpu")
    return store


def test_export_then_import_round_trips_weights_bit_for_bit_and_joins(built, tmp_path):
    out = tmp_path / "export"
    export(built, "SELECT run_id, step FROM checkpoints ORDER BY run_id, step", "unterthiner",
           out, splits={"train": 0.5, "test": 0.5})
    report = import_zoo(built, "unterthiner", out, zoo="back")
    assert (report.runs, report.checkpoints, report.errors) == (2, 6, [])
    original, _ = built.weights("SELECT c.run_id, c.step FROM checkpoints c JOIN runs r "
                                "USING (run_id) WHERE r.zoo = 'built' ORDER BY c.run_id, step")
    # one SQL across the built and the imported zoo: the import keeps the source run id
    pairs = built.sql("""
        SELECT b.run_id AS built_id, i.run_id AS imported_id, b.seed, i.seed AS seed_back,
               b.lr, i.lr AS lr_back, b.width, i.width AS width_back
        FROM runs b JOIN runs i ON json_extract_string(i.config, '$.source') = b.run_id
        WHERE b.zoo = 'built' AND i.zoo = 'back' ORDER BY b.run_id""").to_dicts()
    assert len(pairs) == 2
    assert all(p["seed"] == p["seed_back"] and p["lr"] == p["lr_back"]
               and p["width"] == p["width_back"] == 4 for p in pairs)
    back, _ = built.weights(
        "SELECT c.run_id, c.step FROM checkpoints c JOIN runs r USING (run_id) "
        "WHERE r.zoo = 'back' ORDER BY json_extract_string(r.config, '$.source'), c.step")
    assert back.dtype == original.dtype and torch.equal(back, original)  # bit for bit
    metrics = built.sql("""
        SELECT b.metric, b.step, b.value = i.value AS same, count(*) AS n
        FROM metrics b JOIN runs rb ON rb.run_id = b.run_id AND rb.zoo = 'built'
        JOIN runs ri ON json_extract_string(ri.config, '$.source') = rb.run_id
        JOIN metrics i ON i.run_id = ri.run_id AND i.step = b.step AND i.metric = b.metric
        WHERE b.tensor IS NULL GROUP BY ALL""").to_dicts()
    n_built = built.sql("SELECT count(*) FROM metrics m JOIN runs r USING (run_id) "
                        "WHERE r.zoo = 'built' AND m.tensor IS NULL").item()
    n_back = built.sql("SELECT count(*) FROM metrics m JOIN runs r USING (run_id) "
                       "WHERE r.zoo = 'back'").item()
    assert metrics and all(m["same"] for m in metrics)
    assert sum(m["n"] for m in metrics) == n_built == n_back
    # and the imported networks compute what the built ones do
    x = torch.rand(5, 1, 8, 8)
    for p in pairs:
        a = built.load_model(p["built_id"], 6)
        b = built.load_model(p["imported_id"], 6)
        torch.testing.assert_close(a(x), b(x))
    # a second export of the imported zoo is the first, byte for byte
    again = tmp_path / "again"
    export(built, "SELECT c.run_id, c.step FROM checkpoints c JOIN runs r USING (run_id) "
           "WHERE r.zoo = 'back' ORDER BY json_extract_string(r.config, '$.source'), c.step",
           "unterthiner", again, splits={"train": 0.5, "test": 0.5})
    assert (again / "weights.npy").read_bytes() == (out / "weights.npy").read_bytes()


def test_weight_dataset_over_an_imported_zoo(tmp_path):
    write_small_cnn_zoo(tmp_path / "sczoo", models=4)
    store = dlstore.open(tmp_path / "s", create=True)
    import_zoo(store, "unterthiner", tmp_path / "sczoo", zoo="sczoo")
    ds = WeightDataset(store, "SELECT run_id, step FROM checkpoints ORDER BY run_id, step",
                       target="train_acc", splits={"train": 0.5, "test": 0.5})
    assert len(ds) == 12
    x, y = ds[0]
    assert x.shape == (4970,) and isinstance(float(y), float)
    train, test = ds.split("train"), ds.split("test")
    assert len(train) + len(test) == 12
    assert not set(ds.frame["run_id"][train.indices]) & set(ds.frame["run_id"][test.indices])


def test_resumed_after_kill_9_equals_an_uninterrupted_import(tmp_path):
    write_small_cnn_zoo(tmp_path / "sczoo", models=6)
    killed = tmp_path / "killed"
    # killed in the middle of the second batch's commit: its shards, checkpoint and metric
    # rows written, its runs rows not
    script = textwrap.dedent(f"""
        import os, signal
        import dlstore
        from dlstore.importers import import_zoo
        from dlstore.store.tables import Tables
        append, runs_appends = Tables.append, []
        def dying_append(self, name, rows):
            if name == "runs":
                runs_appends.append(1)
                if len(runs_appends) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            return append(self, name, rows)
        Tables.append = dying_append
        store = dlstore.open({str(killed)!r}, create=True)
        import_zoo(store, "unterthiner", {str(tmp_path / "sczoo")!r}, zoo="z",
                   batch_bytes=130_000)  # two runs (59,640 bytes each) a batch
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    store = dlstore.open(killed)
    assert store.sql("SELECT count(*) FROM runs").item() == 2  # the cut-short state
    assert store.sql("SELECT count(*) FROM _checkpoints").item() == 12  # 6 of them invisible
    report = import_zoo(store, "unterthiner", tmp_path / "sczoo", zoo="z", batch_bytes=1)
    assert (report.skipped, report.runs) == (2, 4)
    whole = dlstore.open(tmp_path / "whole", create=True)
    import_zoo(whole, "unterthiner", tmp_path / "sczoo", zoo="z")
    for query in ("SELECT run_id, status, config, final_step, n_params FROM runs ORDER BY 1",
                  "SELECT run_id, step, epoch, dtype, n_bytes FROM checkpoints ORDER BY 1, 2",
                  "SELECT run_id, step, metric, value FROM metrics ORDER BY 1, 2, 3",
                  "SELECT zoo, spec, n_runs, source_format, n_checkpoints, n_metric_rows "
                  "FROM zoos"):
        assert store.sql(query).rows() == whole.sql(query).rows(), query
    keys = "SELECT run_id, step FROM checkpoints ORDER BY run_id, step"
    assert torch.equal(store.weights(keys)[0], whole.weights(keys)[0])
    # in one batch, runs of one network share a shard per step (3 steps x 2 activations); the
    # resumed runs, each larger than its batch, were written a checkpoint per shard
    members = "SELECT count(*) AS n FROM checkpoints GROUP BY blob ORDER BY n"
    assert whole.sql(members)["n"].to_list() == [3] * 6
    assert store.sql(members)["n"].to_list() == [1] * 18
    assert not verify(store).problems


def test_a_second_import_adds_nothing_and_the_zoos_view_says_where_from(tmp_path):
    write_small_cnn_zoo(tmp_path / "sczoo")
    store_path = tmp_path / "s"
    first = _cli("import", "unterthiner", tmp_path / "sczoo", "--zoo", "sczoo", "--store",
                 store_path)
    assert first.returncode == 0, first.stderr
    assert "3 runs imported (0 already complete, 0 left out): 9 checkpoints" in first.stdout
    store = dlstore.open(store_path)
    versions = {t: store.tables.snapshot(t)[0] for t in ("runs", "checkpoints", "metrics",
                                                          "zoos")}
    second = _cli("import", "unterthiner", tmp_path / "sczoo", "--zoo", "sczoo", "--store",
                  store_path)
    assert second.returncode == 0, second.stderr
    assert "0 runs imported (3 already complete, 0 left out)" in second.stdout
    store = dlstore.open(store_path)
    assert versions == {t: store.tables.snapshot(t)[0] for t in versions}  # nothing written
    zoo = store.sql("SELECT * FROM zoos").to_dicts()
    assert len(zoo) == 1
    assert (zoo[0]["source_format"], zoo[0]["source_path"], zoo[0]["n_runs"],
            zoo[0]["n_checkpoints"], zoo[0]["n_metric_rows"]) == (
        "unterthiner", str((tmp_path / "sczoo").resolve()), 3, 9, 35)
    listing = _cli("zoos", "--store", store_path, "--format", "json")
    row = json.loads(listing.stdout)[0]
    assert (row["source"], row["runs"], row["checkpoints"], row["metric_rows"]) == (
        "unterthiner", 3, 9, 35)
    assert not verify(store).problems


@pytest.mark.parametrize("damage, message", [
    ("layout", "layout.csv line 3: sequential/conv2d/bias:0 has shape [16] but columns "
               "144:161"),
    ("rows", "has 8 rows and"),
    ("missing", "layout.csv is missing"),
    ("short", "layout.csv covers 4960 columns and weights.npy has 4970"),
])
def test_a_bad_small_cnn_zoo_is_one_line_and_writes_nothing(tmp_path, damage, message):
    root = tmp_path / "sczoo"
    write_small_cnn_zoo(root)
    if damage == "layout":
        text = (root / "layout.csv").read_text().replace("144,160,16", "144,161,17")
        (root / "layout.csv").write_text(text)
    elif damage == "rows":
        lines = (root / "metrics.csv").read_text()
        (root / "metrics.csv").write_text("\n".join(lines.splitlines()[:-1]) + "\n")
    elif damage == "short":  # the classifier's bias left out of the layout
        lines = (root / "layout.csv").read_text().splitlines()
        (root / "layout.csv").write_text("\n".join(lines[:-1]) + "\n")
    else:
        (root / "layout.csv").unlink()
    run = _cli_process if damage == "layout" else _cli  # once as a real process
    result = run("import", "unterthiner", root, "--zoo", "z", "--store", tmp_path / "s")
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()  # refused before a store is made


# -- Ray Tune trial directories (the Model Zoos, Schürholt et al. 2022) --------------------------

def _imported_arch(**model):
    return run_architecture({"run_id": "r", "config": {"model": model}})


def _modelzoo_params(seed, dropout=0.0):
    return {"model::type": "CNN", "model::channels_in": 1, "model::nlin": "tanh",
            "model::dropout": dropout, "model::init_type": "kaiming_uniform",
            "model::use_bias": True, "optim::optimizer": "adam", "optim::lr": 3e-4,
            "optim::wd": 1e-3, "training::batchsize": 32, "training::epochs_train": 2,
            "seed": seed, "dataset::dump": "/data/dataset_mnist.pt", "cuda": False}


def write_trial(root, name, seed, epochs=2, dropout=0.0, prefix=""):
    trial = root / name
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps(_modelzoo_params(seed, dropout)))
    torch.manual_seed(seed)
    net = _imported_arch(arch="modelzoo_cnn", nlin="tanh", dropout=dropout).build((1, 28, 28), 10)
    states = []
    with open(trial / "result.json", "w") as f:
        for epoch in range(epochs + 1):  # epoch 0 is the initialisation
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.01 * epoch)
            state = {prefix + k: v.clone() for k, v in net.state_dict().items()}
            states.append(state)
            folder = trial / f"checkpoint_{epoch:06d}"
            folder.mkdir()
            torch.save(state, folder / "checkpoints")
            torch.save({"state": {}, "param_groups": []}, folder / "optimizer")
            f.write(json.dumps({
                "train_loss": 2.3 - 0.5 * epoch, "train_acc": 0.1 + 0.2 * epoch,
                "test_loss": 2.31 - 0.5 * epoch, "test_acc": 0.11 + 0.2 * epoch,
                # their trainable starts at iteration -1: 0 is the initialisation's evaluation
                "training_iteration": epoch, "trial_id": name[-5:],
                "done": epoch == epochs, "time_this_iter_s": 1.5, "timestamp": 1650000000,
                "pid": 123, "hostname": "node", "date": "2022-04-01_10-00-00",
                "config": _modelzoo_params(seed, dropout)}) + "\n")
    return states


def test_ray_tune_trials_import_and_load_as_the_model_zoo_cnn(tmp_path):
    root = tmp_path / "tune"
    states = write_trial(root, "NN_tune_trainable_a1b2c_00000_0_seed=1", 1)
    write_trial(root, "NN_tune_trainable_a1b2c_00001_1_seed=2", 2, dropout=0.1,
                prefix="module.")
    store = dlstore.open(tmp_path / "s", create=True)
    report = import_zoo(store, "raytune", root, zoo="mz")
    assert (report.runs, report.checkpoints, report.metric_rows, report.errors) == (
        2, 6, 24, [])
    runs = store.sql("SELECT run_id, arch, lr, weight_decay, batch_size, optimizer, seed, epochs,"
                     " dataset, final_step, n_params FROM runs ORDER BY seed").to_dicts()
    assert [(r["arch"], r["lr"], r["weight_decay"], r["batch_size"], r["optimizer"], r["seed"],
             r["epochs"], r["dataset"], r["final_step"], r["n_params"]) for r in runs] == [
        ("modelzoo_cnn", 3e-4, 1e-3, 32, "adam", 1, 2, "dataset_mnist", 2, 2464),
        ("modelzoo_cnn", 3e-4, 1e-3, 32, "adam", 2, 2, "dataset_mnist", 2, 2464)]
    assert store.sql("SELECT DISTINCT metric FROM metrics ORDER BY 1")["metric"].to_list() == [
        "test_acc", "test_loss", "train_acc", "train_loss"]  # Ray's bookkeeping left out
    assert store.sql("SELECT step, epoch FROM checkpoints WHERE run_id = ? ORDER BY step",
                     [runs[0]["run_id"]]).rows() == [(0, 0.0), (1, 1.0), (2, 2.0)]
    model = store.load_model(runs[0]["run_id"], 0)  # the initialisation
    assert all(torch.equal(model.state_dict()[k], v) for k, v in states[0].items())
    x = torch.rand(3, 1, 28, 28)
    ref = _imported_arch(arch="modelzoo_cnn", nlin="tanh").build((1, 28, 28), 10)
    ref.load_state_dict(states[2])
    # the weights are equal bit for bit (above); outputs within the kernels' rounding
    torch.testing.assert_close(store.load_model(runs[0]["run_id"])(x), ref.eval()(x))
    # the dropout variant's names (module. prefix dropped) are the published indices
    assert "module_list.4.weight" in store.load_state_dict(runs[1]["run_id"])
    assert store.load_model(runs[1]["run_id"])(x).shape == (3, 10)


def test_bad_trials_are_one_line_each_and_the_rest_imports(tmp_path):
    root = tmp_path / "tune"
    write_trial(root, "good", 1)
    empty = root / "no_checkpoints"
    empty.mkdir()
    (empty / "params.json").write_text(json.dumps(_modelzoo_params(3)))
    (empty / "result.json").write_text('{"epoch": 0, "test_acc": 0.1}\n')
    evil = root / "evil_pickle"
    evil.mkdir()
    (evil / "params.json").write_text(json.dumps(_modelzoo_params(4)))
    (evil / "checkpoint_000000").mkdir()
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (evil / "checkpoint_000000" / "checkpoints").write_bytes(pickle.dumps({"w": Boom()}))
    bad_json = root / "bad_params"
    bad_json.mkdir()
    (bad_json / "params.json").write_text("{not json")
    result = _cli("import", "raytune", root, "--zoo", "mz", "--store", tmp_path / "s")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("import")]
    assert len(lines) == 3 and "Traceback" not in result.stderr
    assert any("evil_pickle/checkpoint_000000/checkpoints cannot be read as a checkpoint" in
               line for line in lines)
    assert any("no_checkpoints has no checkpoint_NNNNNN/checkpoints" in line for line in lines)
    assert any("bad_params/params.json is not a JSON object" in line for line in lines)
    assert not (tmp_path / "pwned").exists()
    assert "1 runs imported (0 already complete, 3 left out)" in result.stdout
    store = dlstore.open(tmp_path / "s")
    assert store.sql("SELECT count(*) FROM runs").item() == 1
    assert not verify(store).problems


# -- Hugging Face checkpoint suites --------------------------------------------------------------

def test_hf_revisions_import_one_run_per_model_and_load_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=32,
                                        max_position_embeddings=32, tie_word_embeddings=False)
    root = tmp_path / "suite"
    models = {}
    for name, seed in (("pythia-tiny", 0), ("pythia-tiny-seed1", 1)):
        torch.manual_seed(seed)
        model = transformers.GPTNeoXForCausalLM(config)
        models[name] = {}
        for step in (0, 1000, 2000):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.9)
            folder = root / name / f"step{step}"
            model.save_pretrained(folder)
            if step == 1000:  # older revisions ship pytorch_model.bin
                torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
                (folder / "model.safetensors").unlink()
            models[name][step] = {k: v.clone() for k, v in model.state_dict().items()}
    assert (root / "pythia-tiny" / "step1000" / "pytorch_model.bin").is_file()
    store = dlstore.open(tmp_path / "s", create=True)
    report = import_zoo(store, "hf", root, zoo="pythia")
    assert (report.runs, report.checkpoints, report.errors) == (2, 6, [])
    runs = store.sql("SELECT run_id, arch, width, depth, final_step, n_params, "
                     "json_extract_string(config, '$.source') AS source FROM runs "
                     "ORDER BY source").to_dicts()
    assert [(r["arch"], r["width"], r["depth"], r["final_step"], r["source"]) for r in runs] == [
        ("hf", 16, 2, 2000, "pythia-tiny"), ("hf", 16, 2, 2000, "pythia-tiny-seed1")]
    assert store.sql("SELECT step FROM checkpoints WHERE run_id = ? ORDER BY step",
                     [runs[0]["run_id"]])["step"].to_list() == [0, 1000, 2000]
    loaded = store.load_model(runs[0]["run_id"], 1000)
    assert type(loaded).__name__ == "GPTNeoXForCausalLM"
    reference = models["pythia-tiny"][1000]
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())
    # the store keeps the checkpoint's own names (the hub's `embed_out`)
    assert "embed_out.weight" in store.load_state_dict(runs[0]["run_id"], 1000)
    tokens = torch.tensor([[1, 2, 3, 4]])
    original = transformers.GPTNeoXForCausalLM(config)
    original.load_state_dict(reference)
    torch.testing.assert_close(loaded(tokens).logits, original.eval()(tokens).logits)


def test_hf_sharded_revisions_are_joined(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=32,
                                        max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config)
    model.save_pretrained(tmp_path / "tiny" / "step512", max_shard_size="10KB")
    assert len(list((tmp_path / "tiny" / "step512").glob("model-*-of-*.safetensors"))) > 1
    store = dlstore.open(tmp_path / "s", create=True)
    report = import_zoo(store, "hf", tmp_path / "tiny", zoo="one")
    assert (report.runs, report.checkpoints, report.errors) == (1, 1, [])
    (run_id,) = store.run_ids()
    loaded = store.load_model(run_id, 512)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_spec_cannot_train_the_imported_networks():
    with pytest.raises(SpecError, match="'modelzoo_cnn' is the network of imported zoos"):
        ZooSpec.from_text('name = "x"\n[dataset]\nname = "digits"\n[model]\n'
                          'arch = "modelzoo_cnn"\n[train]\nsteps = 2\nbatch_size = 8\n')


def test_hf_load_model_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    arch = _imported_arch(arch="hf", config={"model_type": "gpt_neox"})
    with pytest.raises(UsageError, match=r"needs `transformers` \(pip install 'dlstore\[hf\]'\)"):
        arch.build((32,), 64)


# -- metrics-only CSV summaries ------------------------------------------------------------------

def test_csv_summaries_import_metrics_only_runs_with_mapped_columns(tmp_path):
    path = tmp_path / "cifar10_resnet18_summary.csv"
    header = ("model,trial_id,model_width,seed,lr,wd,batchsize,init_type,epoch,train_loss,"
              "train_acc,test_loss,test_acc,representation_similarity,log_hessian_trace_train")
    lines = [header]
    for epoch in range(3):  # rows ordered by epoch, models interleaved, as published
        for m, width in enumerate((2, 4)):
            hessian = "" if epoch < 2 else f"{3.5 + m}"
            lines.append(f'"NN_tune_trainable_0ada0_0000{m}_{m}_model_width={width},seed=0",'
                         f"0ada0_0000{m},{width},0,0.1,0.0005,{1024 // (m + 1)},kaiming_uniform,"
                         f"{epoch},{2.3 - epoch * 0.3:.3f},{0.1 + epoch * 0.1:.3f},"
                         f"{2.31 - epoch * 0.3:.3f},{0.1 + epoch * 0.09:.3f},,{hessian}")
    path.write_text("\n".join(lines) + "\n")
    store_path = tmp_path / "s"
    result = _cli("import", "csv", path, "--zoo", "ptmz", "--map", "width=model_width",
                  "--store", store_path)
    assert result.returncode == 0, result.stderr
    store = dlstore.open(store_path)
    runs = store.sql("SELECT run_id, width, seed, lr, weight_decay, batch_size, final_step, "
                     "json_extract_string(config, '$.init_type') AS init, "
                     "json_extract_string(config, '$.trial_id') AS trial FROM runs "
                     "ORDER BY width").to_dicts()
    assert [(r["width"], r["seed"], r["lr"], r["weight_decay"], r["batch_size"], r["final_step"],
             r["init"], r["trial"]) for r in runs] == [
        (2, 0, 0.1, 0.0005, 1024, 2, "kaiming_uniform", "0ada0_00000"),
        (4, 0, 0.1, 0.0005, 512, 2, "kaiming_uniform", "0ada0_00001")]
    assert store.sql("SELECT count(*) FROM checkpoints").item() == 0
    # empty cells are missing values, never zeros
    assert store.sql("SELECT count(*) FROM metrics WHERE metric = 'representation_similarity'"
                     ).item() == 0
    assert store.sql("SELECT step, value FROM metrics WHERE run_id = ? AND metric = "
                     "'log_hessian_trace_train'", [runs[1]["run_id"]]).rows() == [(2, 4.5)]
    assert store.sql("SELECT count(*) FROM metrics").item() == 2 * 3 * 4 + 2
    curves = store.sql("SELECT width, step, value FROM curves WHERE metric = 'test_acc' "
                       "ORDER BY width, step").rows()
    assert [c[:2] for c in curves] == [(2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2)]
    zoo = store.sql("SELECT source_format, n_runs, n_checkpoints, n_metric_rows FROM zoos").row(0)
    assert zoo == ("csv", 2, 0, 26)
    again = _cli("import", "csv", path, "--zoo", "ptmz", "--map", "width=model_width",
                 "--store", store_path)
    assert "0 runs imported (2 already complete" in again.stdout
    # a directory of summaries: each file's models are its own runs
    folder = tmp_path / "summary_metrics"
    folder.mkdir()
    for name in ("cifar10_resnet18_summary.csv", "svhn_resnet18_summary.csv"):
        (folder / name).write_text(path.read_text())
    report = import_zoo(store, "csv", folder, zoo="ptmz-all", mapping={"width": "model_width"})
    assert (report.runs, report.metric_rows, report.errors) == (4, 52, [])
    sources = store.sql("SELECT json_extract_string(config, '$.source') AS s, count(*) AS n "
                        "FROM runs WHERE zoo = 'ptmz-all' GROUP BY 1").rows()
    assert sorted(n for _, n in sources) == [2, 2]  # one model name in two files: two runs


def test_csv_and_format_errors_are_one_line(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("name,epoch,loss\na,0,1.0\n")
    for args, message in [
        (("csv", path), "expected a `model` column"),
        (("csv", tmp_path / "none.csv"), "does not exist"),
        (("parquet", tmp_path), "unknown format 'parquet'"),
        (("csv", path, "--map", "width"), "--map 'width': give KEY=VALUE"),
        (("raytune", tmp_path), "holds no trial directory"),
        (("hf", tmp_path), "holds no revision folder"),
    ]:
        result = _cli("import", *args, "--zoo", "z", "--store", tmp_path / "store")
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "store").exists()
    with pytest.raises(ImportSourceError, match="--map applies to the csv format only"):
        import_zoo(dlstore.open(tmp_path / "x", create=True), "raytune", tmp_path, zoo="z",
                   mapping={"width": "w"})
