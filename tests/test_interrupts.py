"""Ctrl-C, SIGTERM, --dry-run and the confirmation: a build stops keeping what it finished,
and nothing is created before every spec check has passed."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

import dlstore.cli
from dlstore.errors import SpecError
from dlstore.interrupts import deferred_interrupts
from dlstore.spec import ZooSpec
from dlstore.store.store import Store
from tests.conftest import TINY_SPEC

# one run per cohort and no commit before the end unless interrupted: an interrupt after the
# first cohort must commit it itself
STOP_SPEC = textwrap.dedent("""
    name = "stop"
    seeds = 4
    checkpoints = "log:3"

    [dataset]
    name = "gaussian_mixture"
    n_samples = 600

    [model]
    arch = "mlp"
    width = 8
    depth = 1

    [train]
    batch_size = 32
    steps = 500

    [build]
    cohort_size = 1
    commit_every = 1000

    [metrics]
    statistics = false
    spectra = false
""")


def _build(spec, store):
    # one thread: two threads on shared cores made these tiny steps 15x slower
    return subprocess.Popen(
        [sys.executable, "-m", "dlstore.cli", "build-zoo", str(spec), "--store", str(store),
         "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def _shards(store) -> int:
    return len(list((store / "blobs").glob("*/*.safetensors")))


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_build_keeps_its_finished_cohorts(tmp_path, signum, status):
    spec = tmp_path / "stop.toml"
    spec.write_text(STOP_SPEC)
    store = tmp_path / "store"
    process = _build(spec, store)
    # 3 shards a cohort: a 4th means the first cohort finished and the second is training
    while _shards(store) < 4 and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    kept = Store(store).run_ids()
    assert 1 <= len(kept) < 4
    assert f"interrupted: {len(kept)} runs built by this build are kept" in err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    if signum == signal.SIGTERM:
        return  # the same path as Ctrl-C from here on
    out, err = _build(spec, store).communicate(timeout=120)
    assert f"{4 - len(kept)} runs built" in out and f"{len(kept)} already in the store" in out
    assert Store(store).run_ids() == {r.run_id for r in ZooSpec.from_text(STOP_SPEC).runs}


def test_a_commit_holds_interrupts_until_it_is_done():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # where Python would run the handler
            reached.append("end of the commit")
    assert reached == ["end of the commit"]
    with pytest.raises(KeyboardInterrupt):  # a second signal is delivered at once
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            reached.append("not reached")
    assert reached == ["end of the commit"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _cli(*args, input=None):
    return CliRunner().invoke(dlstore.cli.app, ["build-zoo", *map(str, args)], input=input)


def test_dry_run_prints_the_plan_and_changes_nothing(tmp_path, built_store):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC)
    fresh = _cli(spec, "--store", tmp_path / "new", "--dry-run", "--device", "cpu")
    assert fresh.exit_code == 0, fresh.output
    assert "8 runs (no store yet), 8 to build in" in fresh.output and "estimated" in fresh.output
    assert not (tmp_path / "new").exists()
    files = sorted((p, p.stat().st_mtime_ns) for p in built_store.root.rglob("*"))
    held = _cli(spec, "--store", built_store.root, "--dry-run", "--device", "cpu")
    assert "8 runs (8 already in the store), 0 to build" in held.output
    assert sorted((p, p.stat().st_mtime_ns) for p in built_store.root.rglob("*")) == files


@pytest.mark.parametrize("old, new, message", [
    ("n_samples = 600", "n_samples = 600\nn_train = 5000", "dataset.n_train: 5000 exceeds"),
    ("batch_size = 32", "batch_size = 1000", "train.batch_size: 1000 is larger"),
    ("depth = 1", "depth = 1000000000000", "this machine has"),
    ("epochs = 3", "epochs = 1e12", "it would never end"),
])
def test_every_spec_check_runs_before_the_store_is_created(tmp_path, old, new, message):
    spec = tmp_path / "bad.toml"
    spec.write_text(TINY_SPEC.replace(old, new))
    result = _cli(spec, "--store", tmp_path / "s", "--device", "cpu")
    assert isinstance(result.exception, SpecError) and message in str(result.exception)
    assert not (tmp_path / "s").exists()


def test_a_large_build_asks_first_at_a_terminal(tmp_path, monkeypatch):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC)
    monkeypatch.setattr(dlstore.cli, "CONFIRM_RUNS", 4)  # the tiny zoo's 8 runs count as many
    monkeypatch.setattr(dlstore.cli, "_interactive", lambda: True)
    declined = _cli(spec, "--store", tmp_path / "s", "--device", "cpu", input="n\n")
    assert "build 8 runs? [y/N]" in declined.output
    assert declined.exit_code == 1 and not (tmp_path / "s").exists()
    agreed = _cli(spec, "--store", tmp_path / "s", "--device", "cpu", "--yes")
    assert agreed.exit_code == 0 and "?" not in agreed.output and "8 runs built" in agreed.output
    monkeypatch.setattr(dlstore.cli, "_interactive", lambda: False)
    again = _cli(spec, "--store", tmp_path / "s2", "--device", "cpu")
    assert again.exit_code == 0 and "[y/N]" not in again.output
