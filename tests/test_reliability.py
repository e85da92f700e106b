"""Verification, read-only SQL, and builds that are killed or run side by side."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import dlstore
from dlstore.building.build import build_zoo
from dlstore.errors import QueryError
from dlstore.spec import ZooSpec
from dlstore.store.maintenance import compact, gc, verify
from dlstore.store.writer import StoreWriter
from tests.conftest import TINY_SPEC
from tests.test_cli import dlstore as run_cli

# the tiny zoo, longer and with 4 seeds (16 runs), one run per cohort, committed after every
# cohort: many cohorts and commits to kill in the middle of
CRASH_SPEC = (TINY_SPEC.replace('name = "tiny"', 'name = "crash"')
              .replace("seeds = 2", "seeds = 4").replace("epochs = 3", "epochs = 200")
              + "\n[build]\ncohort_size = 1\ncommit_every = 0\n")
CRASH_RUNS = 16


def test_verify_passes_on_a_sound_store(built_store):
    report = verify(built_store)
    assert report.ok, report.problems
    assert report.checkpoints == 8 * 5 and report.shards == 2 * 5
    assert report.table_rows["runs"] == 8


def test_verify_names_corrupted_and_missing_shards(tmp_path, built_store):
    copy = tmp_path / "copy"
    shutil.copytree(built_store.root, copy)
    store = dlstore.open(copy)
    blobs = store.sql("SELECT DISTINCT blob FROM checkpoints ORDER BY blob")["blob"].to_list()
    flipped, removed = blobs[0], blobs[1]
    path = store.blobs.path(flipped)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    store.blobs.path(removed).unlink()
    report = verify(dlstore.open(copy))
    assert not report.ok
    text = "\n".join(report.problems)
    assert f"shard {flipped} is corrupted" in text and f"shard {removed} is missing" in text
    result = run_cli("verify", "--store", str(copy))
    assert result.returncode == 1 and flipped in result.stdout and "problems" in result.stdout


@pytest.mark.parametrize("query", [
    "CREATE TABLE x AS SELECT 1", "INSERT INTO runs VALUES (1)", "DROP VIEW runs",
    "COPY (SELECT 1) TO 'out.csv'", "ATTACH 'other.db'", "SELECT 1; SELECT 2", "SET threads = 1",
])
def test_sql_cannot_change_anything(built_store, query, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = built_store.sql("SELECT count(*) AS n FROM runs")["n"][0]
    with pytest.raises(QueryError):
        built_store.sql(query)
    assert built_store.sql("SELECT count(*) AS n FROM runs")["n"][0] == before
    assert list(tmp_path.iterdir()) == []


def test_pivot_is_allowed(built_store):
    wide = built_store.sql("PIVOT (SELECT run_id, metric, value FROM final) ON metric "
                           "USING first(value)")
    assert wide.height == 8 and "test_acc" in wide.columns


def _build_command(spec, store):
    return [sys.executable, "-m", "dlstore.cli", "build-zoo", str(spec), "--store", str(store),
            "--device", "cpu"]


def _final_weights(store) -> dict:
    return {run_id: store.load_state_dict(run_id)
            for run_id in store.sql("SELECT run_id FROM runs")["run_id"]}


def _assert_complete_and_equal(store, reference, n_runs):
    assert store.sql("SELECT count(*) AS n FROM runs")["n"][0] == n_runs
    query = "SELECT run_id, count(*) AS n FROM metrics WHERE tensor IS NULL GROUP BY run_id"
    counts = store.sql(query)
    assert counts.height == n_runs and set(counts["n"]) == {5 * 6}  # log:5 x 6 metrics
    # per-tensor rows too: each run has exactly the rows it has when built alone
    query = "SELECT run_id, count(*) AS n FROM metrics GROUP BY run_id ORDER BY run_id"
    assert store.sql(query).rows() == reference.sql(query).rows()
    report = verify(store)
    assert report.ok, report.problems
    got, want = _final_weights(store), _final_weights(reference)
    assert got.keys() == want.keys()
    for run_id in want:
        for name in want[run_id]:
            assert torch.equal(got[run_id][name], want[run_id][name]), (run_id, name)


@pytest.fixture(scope="module")
def crash_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-ref")
    spec = root / "crash.toml"
    spec.write_text(CRASH_SPEC)
    subprocess.run(_build_command(spec, root / "store"), check=True, capture_output=True)
    return spec, dlstore.open(root / "store")


@pytest.mark.slow
def test_killed_builds_resume_to_the_uninterrupted_result(tmp_path, crash_reference):
    spec, reference = crash_reference
    store = tmp_path / "store"
    rng = random.Random(0)
    kills = 0
    while kills < 10:  # kill -9 at random moments: start-up, training, shard writes, commits
        process = subprocess.Popen(_build_command(spec, store), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 3.0))
        if process.poll() is not None:
            break  # it finished before the kill: no work left to interrupt
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
    assert kills >= 10, "the build finished before 10 kills; give it more work"
    partial = dlstore.open(store).sql("SELECT count(*) AS n FROM runs")["n"][0]
    assert 0 < partial < CRASH_RUNS  # the kills interrupted real work, and progress was kept
    subprocess.run(_build_command(spec, store), check=True, capture_output=True)
    _assert_complete_and_equal(dlstore.open(store), reference, CRASH_RUNS)


def test_four_concurrent_builders_make_each_run_once(tmp_path):
    text = TINY_SPEC + "\n[build]\ncohort_size = 2\ncommit_every = 0\n"
    spec = tmp_path / "tiny.toml"
    spec.write_text(text)
    reference = dlstore.Store(tmp_path / "reference", create=True)
    build_zoo(ZooSpec.from_text(text), reference, device="cpu")
    store = tmp_path / "store"
    subprocess.run([sys.executable, "-c", f"import dlstore; dlstore.Store({str(store)!r}, "
                    "create=True)"], check=True)
    processes = [subprocess.Popen(_build_command(spec, store), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    _assert_complete_and_equal(dlstore.open(store), reference, 8)
    assert dlstore.open(store).sql("SELECT count(*) AS n FROM zoos")["n"][0] == 1


def test_compact_and_gc_keep_every_answer(tmp_path, built_store):
    copy = tmp_path / "copy"
    shutil.copytree(built_store.root, copy)
    store = dlstore.open(copy)
    query = "SELECT run_id, step, metric, value FROM metrics ORDER BY ALL"
    before = store.sql(query)
    # a shard nothing refers to (as a killed build leaves) and a leftover temporary file
    orphan = store.blobs.put({"w": torch.ones(2, 3)}, {"format": "test"})
    leftover = store.blobs.path(orphan).parent / ".leftover.tmp"
    leftover.write_bytes(b"partial")

    assert gc(store, older_than_hours=1).shards == []  # too young: a build may be writing it
    dry = gc(store, older_than_hours=0, dry_run=True)
    assert dry.shards == [orphan] and store.blobs.path(orphan).exists()

    for kind in ("a", "b"):  # two appends: two small files
        StoreWriter(store).record_fit({"kind": kind, "query": "SELECT 1", "params": "{}",
                                       "ci": "{}", "n": 1})
    fits = store.sql("SELECT kind FROM fits ORDER BY kind")
    removed = compact(store)
    assert removed["fits"] == 2 and len(store.tables.snapshot("fits")[1]) == 1
    assert store.sql("SELECT kind FROM fits ORDER BY kind").equals(fits)
    report = gc(store, older_than_hours=0)
    assert report.shards == [orphan] and report.temporary == 1 and report.table_files >= 1
    assert not store.blobs.path(orphan).exists() and not leftover.exists()

    reopened = dlstore.open(copy)
    assert reopened.sql(query).equals(before)
    assert verify(reopened).ok
    run_id = reopened.runs()["run_id"][0]
    torch.testing.assert_close(reopened.load_state_dict(run_id),
                               built_store.load_state_dict(run_id))


def test_different_specs_at_once_and_sql_during_a_build(tmp_path):
    """Two zoos built into one store at the same time, queried while they build."""
    store = tmp_path / "store"
    dlstore.Store(store, create=True)
    specs = []
    for name in ("left", "right"):
        spec = tmp_path / f"{name}.toml"
        spec.write_text(TINY_SPEC.replace('name = "tiny"', f'name = "{name}"')
                        + "\n[build]\ncohort_size = 1\ncommit_every = 0\n")
        specs.append(spec)
    processes = [subprocess.Popen(_build_command(spec, store), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for spec in specs]
    reader = dlstore.open(store)
    seen = []
    while any(p.poll() is None for p in processes):
        # a consistent snapshot: every visible run has all its metric rows
        counts = reader.sql("SELECT r.run_id, count(m.run_id) AS n FROM runs r LEFT JOIN "
                            "metrics m ON m.run_id = r.run_id AND m.tensor IS NULL "
                            "GROUP BY r.run_id")
        assert set(counts["n"]) <= {5 * 6}
        seen.append(counts.height)
        time.sleep(0.2)
    for process in processes:
        assert process.returncode == 0, process.stderr.read()
    final = dlstore.open(store)
    zoos = final.sql("SELECT zoo, count(*) AS n FROM runs GROUP BY zoo ORDER BY zoo")
    assert zoos.rows() == [("left", 8), ("right", 8)]
    assert verify(final).ok
    assert seen and max(seen) <= 16


def test_compact_and_gc_beside_a_running_build(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(TINY_SPEC.replace("epochs = 3", "epochs = 30")
                    + "\n[build]\ncohort_size = 1\ncommit_every = 0\n")
    store_path = tmp_path / "store"
    dlstore.Store(store_path, create=True)
    build = subprocess.Popen(_build_command(spec, store_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    store = dlstore.open(store_path)
    rounds = 0
    while build.poll() is None:
        compact(store)
        gc(store)  # default retention: shards of cohorts not yet committed are young
        rounds += 1
    assert build.returncode == 0, build.stderr.read()
    assert rounds >= 2
    final = dlstore.open(store_path)
    assert final.sql("SELECT count(*) AS n FROM runs")["n"][0] == 8
    assert verify(final).ok
