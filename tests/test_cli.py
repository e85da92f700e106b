"""The command line as a user runs it: a subprocess, exit codes, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TINY_SPEC


def dlstore(*args, cwd=None):
    env = {**os.environ, "DLSTORE_STORE": ""}
    env.pop("DLSTORE_STORE")
    return subprocess.run([sys.executable, "-m", "dlstore.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    spec = root / "tiny.toml"
    spec.write_text(TINY_SPEC)
    store = root / "store"
    done = dlstore("build-zoo", str(spec), "--store", str(store), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "8 runs built" in done.stdout
    return spec, store


def test_build_again_skips_everything(cli_store):
    spec, store = cli_store
    again = dlstore("build-zoo", str(spec), "--store", str(store))
    assert again.returncode == 0
    assert "nothing to build, all 8 runs are in the store" in again.stdout


def test_sql_formats(cli_store):
    _, store = cli_store
    query = "SELECT width, count(*) AS n FROM runs GROUP BY width ORDER BY width"
    as_json = dlstore("sql", query, "--store", str(store), "--format", "json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == [{"width": 8, "n": 4}, {"width": 16, "n": 4}]
    as_csv = dlstore("sql", query, "--store", str(store), "--format", "csv")
    assert as_csv.stdout.splitlines() == ["width,n", "8,4", "16,4"]
    table = dlstore("sql", query, "--store", str(store))
    assert "width" in table.stdout and "2 rows" in table.stdout


def test_runs_and_show(cli_store):
    _, store = cli_store
    listing = dlstore("runs", "--store", str(store), "--format", "json")
    runs = json.loads(listing.stdout)
    assert len(runs) == 8
    shown = dlstore("show", runs[0]["run_id"], "--store", str(store))
    assert shown.returncode == 0
    assert runs[0]["run_id"] in shown.stdout and "test_acc" in shown.stdout


@pytest.mark.parametrize("args, message", [
    (["sql", "SELEC 1"], "syntax"),
    (["show", "no-such-run"], "no run 'no-such-run'"),
    (["sql", "SELECT 1", "--store", "/nonexistent/store"], "does not exist"),
    (["plot", "metric", "--metric", "test_acc", "--x", "lr", "--y", "width", "--out",
      "/nonexistent/dir/m.png"], "cannot write the figure to /nonexistent/dir/m.png"),
])
def test_errors_are_one_line_without_traceback(cli_store, args, message):
    _, store = cli_store
    if "--store" not in args:
        args = [*args, "--store", str(store)]
    result = dlstore(*args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_spec_leaves_no_store(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text(TINY_SPEC.replace('arch = "mlp"', 'arch = "mlp"\nwidht = 3'))
    result = dlstore("build-zoo", str(spec), "--store", str(tmp_path / "s"))
    assert result.returncode == 1
    assert "model.widht" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists()
