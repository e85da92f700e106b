"""The command line as researchers read it: fitted tables, complete CSV / JSON, SQL from files
and stdin, `show`, zoo management (zoos, rm, export, tag), honest fits. In-process (the
imports are paid once); the subprocess tests in test_cli.py cover the real entry point."""

import io
import json
import shutil
import sys

import numpy as np
import polars as pl
import pytest
import torch
from rich.console import Console

import dlstore
from dlstore.output import csv_text, fit_columns, print_frame
from dlstore.store.maintenance import gc
from tests import test_fit_cli


def cli(capsys, *args, stdin: str | None = None) -> tuple[int, str, str]:
    """Run `dlstore ARGS` in this process: (exit status, stdout, stderr)."""
    from dlstore.cli import main

    old = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.stdin = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def store_copy(tmp_path, built_store):
    shutil.copytree(built_store.root, tmp_path / "s")
    return str(tmp_path / "s")


# -- tables that fit ---------------------------------------------------------------------------

def _render(frame: pl.DataFrame, width: int) -> str:
    buffer = io.StringIO()
    print_frame(frame, "table", Console(file=buffer, width=width, force_terminal=True,
                                        color_system=None))
    return buffer.getvalue()


def test_a_wide_table_keeps_key_columns_whole_and_counts_what_it_hides(built_store):
    frame = built_store.sql("SELECT * FROM runs ORDER BY run_id LIMIT 2")
    for width in (80, 120, 160, 200):
        text = _render(frame, width)
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= width
        for run_id in frame["run_id"]:
            assert run_id in text  # whole: can be copied into `dlstore show`
        hidden = int(lines[-1].split("; ")[1].split(" of ")[0])
        assert f"of {len(frame.columns)} columns hidden; use --format csv or --format json" \
            in lines[-1]
        shown = lines[1].count("┃") - 1 - 1  # the … column
        assert shown + hidden == len(frame.columns)
        assert "tags" in lines[1]  # trailing columns are kept too
    # narrow enough frames are shown whole
    assert "hidden" not in _render(frame.select("run_id", "zoo", "width"), 80)


def test_fit_columns_keeps_leading_and_trailing_columns():
    columns = [f"c{i}" for i in range(10)]
    keep = fit_columns(columns, [["x" * 5] * 10], 50)
    assert keep[0] == 0 and None in keep and keep[-1] == 9
    assert fit_columns(columns, [["x"] * 10], 1000) == list(range(10))


def test_a_pipe_gets_every_column_unwrapped(capsys, built_store):
    code, out, _ = cli(capsys, "runs", "--store", str(built_store.root))
    assert code == 0
    header = out.splitlines()[1]
    assert "torch_version" in header and "config" in header and "hidden" not in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 8  # one line per run: never wrapped


def test_csv_and_json_are_complete_with_lists_as_json(capsys, built_store):
    root = str(built_store.root)
    code, out, err = cli(capsys, "sql", "-f", "csv", "SELECT * FROM runs", "--store", root)
    assert code == 0, err
    read = pl.read_csv(io.StringIO(out))
    assert read.height == 8 and read.columns == built_store.runs().columns
    assert json.loads(read["input_shape"][0]) == [10]
    code, out, _ = cli(capsys, "runs", "--format", "json", "--store", root)
    rows = json.loads(out)
    assert len(rows) == 8 and set(rows[0]) == set(built_store.runs().columns)
    assert isinstance(rows[0]["tags"], dict) and rows[0]["input_shape"] == [10]
    assert csv_text(pl.DataFrame({"a": [[1, 2], None]})).splitlines() == ['a', '"[1, 2]"', '']


# -- sql input -----------------------------------------------------------------------------------

def test_sql_from_a_file_stdin_and_with_a_leading_comment(capsys, built_store, tmp_path):
    root = str(built_store.root)
    query = "-- runs per width\nSELECT width, count(*) AS n FROM runs GROUP BY 1 ORDER BY 1"
    expected = [{"width": 8, "n": 4}, {"width": 16, "n": 4}]
    code, out, err = cli(capsys, "sql", query, "--store", root, "-f", "json")
    assert code == 0, err
    assert json.loads(out) == expected
    (tmp_path / "q.sql").write_text(query)
    code, out, _ = cli(capsys, "sql", "--file", str(tmp_path / "q.sql"), "--store", root,
                       "-f", "json")
    assert json.loads(out) == expected
    code, out, _ = cli(capsys, "sql", "-", "--store", root, "-f", "json", stdin=query)
    assert json.loads(out) == expected
    code, _, err = cli(capsys, "sql", "--file", str(tmp_path / "none.sql"), "--store", root)
    assert code == 1 and "none.sql" in err


def test_help_keeps_brackets_and_has_no_bool_metavars(capsys):
    code, out, _ = cli(capsys, "metrics", "compute", "-h")
    assert code == 0
    assert "SPEC's [metrics] asks for" in out and "{spec}" not in out
    assert "Usage: dlstore metrics compute [OPTIONS] SPEC" in out
    code, out, _ = cli(capsys, "wsl", "fit", "--help")
    assert "--pad / --no-pad" in out and "<bool>" not in out
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"dlstore {dlstore.__version__}"


def test_runs_of_an_unknown_zoo_says_so(capsys, built_store):
    code, _, err = cli(capsys, "runs", "--zoo", "nope", "--store", str(built_store.root))
    assert code == 1 and "no runs of zoo 'nope'" in err and "its zoos: tiny" in err


# -- show ----------------------------------------------------------------------------------------

def test_show_leads_with_hyperparameters_and_final_metrics(capsys, built_store):
    run_id = sorted(built_store.run_ids())[0]
    code, out, _ = cli(capsys, "show", run_id, "--store", str(built_store.root))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["run_id", run_id]
    assert len(lines) < 45
    assert any(line.split()[:1] == ["test_acc"] for line in lines)
    assert "per-tensor metrics (--tensors lists them)" in out
    _, full, _ = cli(capsys, "show", run_id, "--tensors", "--store", str(built_store.root))
    assert "layers.0.weight" in full and "layers.0.weight" not in out
    _, as_json, _ = cli(capsys, "show", run_id, "-f", "json", "--store", str(built_store.root))
    shown = json.loads(as_json)
    assert shown["run"]["config"]["model"]["width"] == shown["run"]["width"]
    assert set(shown) == {"run", "checkpoints", "metrics", "tensor_metrics"}
    assert shown["metrics"]["test_acc"] == pytest.approx(built_store.sql(
        "SELECT value FROM final WHERE run_id = ? AND metric = 'test_acc'", [run_id])["value"][0])
    _, as_csv, _ = cli(capsys, "show", run_id, "-f", "csv", "--store", str(built_store.root))
    assert pl.read_csv(io.StringIO(as_csv)).height == len(shown["metrics"]) + len(
        shown["tensor_metrics"])


# -- zoos you can manage -------------------------------------------------------------------------

def test_zoos_lists_each_zoo(capsys, built_store):
    code, out, _ = cli(capsys, "zoos", "-f", "json", "--store", str(built_store.root))
    assert code == 0
    (zoo,) = json.loads(out)
    assert zoo["zoo"] == "tiny" and zoo["runs"] == zoo["complete"] == 8
    assert zoo["checkpoints"] == 40 and zoo["size_bytes"] > 0 and zoo["spec_hash"]


def test_rm_is_a_dry_run_first_then_hides_runs_until_a_rebuild(capsys, store_copy, tiny_spec):
    store = dlstore.open(store_copy)
    victims = sorted(store.run_ids())[:2]
    code, out, _ = cli(capsys, "rm", *victims, "--store", store_copy)
    assert code == 0 and "would remove 2 runs" in out and "--yes" in out
    assert len(dlstore.open(store_copy).run_ids()) == 8
    code, out, _ = cli(capsys, "rm", *victims, "--yes", "--store", store_copy)
    assert code == 0 and "removed 2 runs" in out
    store = dlstore.open(store_copy)
    assert len(store.run_ids()) == 6
    for view in ("runs", "checkpoints", "metrics", "final", "curves", "metrics_wide"):
        n = store.sql(f"SELECT count(*) AS n FROM {view} WHERE list_contains(?, run_id)",
                      [victims])["n"][0]
        assert n == 0, view
    code, _, err = cli(capsys, "rm", "no-such-run", "--yes", "--store", store_copy)
    assert code == 1 and "no run 'no-such-run'" in err
    # a rebuild trains the removed runs again, and they show
    from dlstore.building.build import build_zoo

    counts = []
    report = build_zoo(tiny_spec, store, device="cpu",
                       runs_progress=lambda done, total: counts.append((done, total)))
    assert report.runs_built == 2 and len(store.run_ids()) == 8
    assert counts[0] == (0, 2) and counts[-1] == (2, 2)  # runs done of runs to build
    assert store.sql("SELECT count(*) AS n FROM checkpoints")["n"][0] == 40
    # the whole zoo: gone from the zoos view too
    code, _, _ = cli(capsys, "rm", "--zoo", "tiny", "--yes", "--store", store_copy)
    store = dlstore.open(store_copy)
    assert code == 0 and not store.run_ids() and store.sql("SELECT * FROM zoos").height == 0
    # gc may now free every shard: only removed runs' rows refer to them
    assert len(gc(store, older_than_hours=0, dry_run=True).shards) == len(store.blobs.list()[0])


def test_export_writes_a_checkpoint_others_can_load(capsys, built_store, tmp_path):
    from safetensors import safe_open

    run_id = sorted(built_store.run_ids())[0]
    root = str(built_store.root)
    target = tmp_path / "model.safetensors"
    code, _, err = cli(capsys, "export", run_id, "--out", str(target), "--store", root)
    assert code == 0, err
    expected = built_store.load_state_dict(run_id)
    with safe_open(str(target), "pt") as f:
        assert f.metadata()["run_id"] == run_id
        assert json.loads(f.metadata()["model"])["width"] == built_store.run(run_id)["width"]
        for name, tensor in expected.items():
            assert torch.equal(f.get_tensor(name), tensor)
    code, _, err = cli(capsys, "export", run_id, "--out", str(target), "--store", root)
    assert code == 1 and "--force" in err
    pt = tmp_path / "m.pt"
    code, _, _ = cli(capsys, "export", run_id, "--step", "0", "--out", str(pt), "--store", root)
    loaded = torch.load(pt)
    assert code == 0 and torch.equal(loaded["layers.0.weight"],
                                     built_store.load_state_dict(run_id, 0)["layers.0.weight"])
    code, _, err = cli(capsys, "export", run_id, "--out", str(tmp_path / "m.onnx"),
                       "--store", root)
    assert code == 1 and ".safetensors or .pt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "model.safetensors"]


def test_tags_show_in_runs_and_sql(capsys, store_copy):
    run_id = sorted(dlstore.open(store_copy).run_ids())[0]
    code, out, _ = cli(capsys, "tag", run_id, "split=a", "--note", "lr too high",
                       "--store", store_copy, "-f", "json")
    assert code == 0 and json.loads(out) == [{"key": "note", "value": "lr too high"},
                                             {"key": "split", "value": "a"}]
    cli(capsys, "tag", run_id, "split=b", "note=", "--store", store_copy)
    store = dlstore.open(store_copy)
    assert store.run(run_id)["tags"] == {"split": "b"}
    tagged = store.sql("SELECT run_id FROM runs WHERE tags['split'] = 'b'")["run_id"].to_list()
    assert tagged == [run_id]
    code, _, err = cli(capsys, "tag", run_id, "novalue", "--store", store_copy)
    assert code == 1 and "KEY=VALUE" in err


# -- fits that say when they mean nothing --------------------------------------------------------

# final test_loss of runs over N x D that follow a known law
law_store = test_fit_cli.law_store
LAW = test_fit_cli.QUERY


def test_fit_refuses_a_variable_without_spread(capsys, law_store, tmp_path):
    code, _, err = cli(capsys, "fit", "scaling", "--store", str(law_store), "--query",
                       LAW + " AND n_train = 1000", "--plot", str(tmp_path / "f.png"))
    assert code == 1 and "D takes 1 distinct value" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "f.png").exists()
    assert dlstore.open(law_store).sql("SELECT * FROM fits WHERE kind = 'chinchilla' AND "
                                      "query LIKE '%n_train = 1000'").height == 0


def test_fit_warns_of_a_negative_exponent_and_a_rerun_replaces_it(capsys, law_store, tmp_path):
    rising = ("SELECT n_params AS x, 10 - value AS y FROM final WHERE metric = 'test_loss' "
              "AND n_train = 100000")
    args = ["fit", "scaling", "--store", str(law_store), "--query", rising, "--x", "x", "--y", "y",
            "--bootstrap", "20", "--plot", str(tmp_path)]
    with np.errstate(all="raise"):  # nothing leaks from the fit
        code, out, err = cli(capsys, *args, "-f", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["params"]["alpha"] < 0
    assert err.startswith("warning: alpha = -") and "negative" in err
    assert result["warnings"] and "x^--" not in err + out
    assert (tmp_path / "scaling.png").is_file()
    cli(capsys, *args)
    fits = dlstore.open(law_store).sql("SELECT * FROM fits WHERE label = ?", [result["label"]])
    assert fits.height == 1 and fits["warnings"][0].to_list() == result["warnings"]
    assert dlstore.open(law_store).sql("SELECT count(*) AS n FROM _fits WHERE label = ?",
                                      [result["label"]])["n"][0] == 2


def test_fit_checks_the_plot_path_and_column_types_first(capsys, law_store, tmp_path):
    code, _, err = cli(capsys, "fit", "scaling", "--store", str(law_store), "--query", LAW,
                       "--plot", str(tmp_path / "missing" / "f.png"))
    assert code == 1 and "does not exist" in err
    code, _, err = cli(capsys, "fit", "scaling", "--store", str(law_store), "--query",
                       "SELECT zoo AS x, value AS y FROM final", "--x", "x", "--y", "y")
    assert code == 1 and "column x of the query is String, not a number" in err
    code, _, err = cli(capsys, "fit", "scaling", "--store", str(law_store), "--query", LAW,
                       "--plot", str(tmp_path / "f.txt"))
    assert code == 1 and ".png, .pdf, .svg" in err
    assert dlstore.open(law_store).sql("SELECT * FROM fits WHERE query = ? OR query LIKE "
                                      "'SELECT zoo%'", [LAW]).height == 0


def test_plot_metric_takes_any_metric_name_as_data_not_sql(capsys, built_store, tmp_path):
    root = str(built_store.root)
    for name in ('test_acc" FROM runs --', "x'; SELECT 1; --", "../../etc"):
        code, _, err = cli(capsys, "plot", "metric", "--metric", name, "--x", "lr", "--y",
                           "width", "--out", str(tmp_path), "--store", root)
        assert code == 1 and "no values of" in err and len(err.splitlines()) == 1
    code, out, _ = cli(capsys, "plot", "metric", "--metric", "test_acc", "--x", "lr", "--y",
                       "width", "--out", str(tmp_path), "--store", root, "-f", "json")
    assert code == 0 and {"lr", "width", "test_acc", "n"} <= set(json.loads(out)[0])
    assert (tmp_path / "test_acc.png").is_file()
