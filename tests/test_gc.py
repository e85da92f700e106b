"""gc never deletes what a build may still commit, whatever --older-than says; it removes exactly
what is stale (and says how much), adds nothing to the tables' logs, and shard bytes are a
function of their content, so identical weights deduplicate."""

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from dlstore.building.build import build_zoo
from dlstore.spec import ZooSpec
from dlstore.store.leases import TTL_SECONDS, BuildLease, live_leases
from dlstore.store.maintenance import compact, gc, verify
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter
from tests.conftest import TINY_SPEC

# one run per cohort: four cohorts, each writing shards long before the single commit at the end
SLOW_COMMIT = (TINY_SPEC.replace("train.lr = [0.05, 0.2]", "")
               + "\n[build]\ncohort_size = 1\ncommit_every = 1000\n")


def _blobs(store: Store) -> set[str]:
    return set(store.blobs.list()[0])


def _final_weights(store: Store) -> dict:
    return {run: store.load_state_dict(run) for run in sorted(store.run_ids())}


def test_gc_in_a_loop_during_a_build_loses_nothing(tmp_path):
    spec = ZooSpec.from_text(SLOW_COMMIT)
    reference = Store(tmp_path / "reference", create=True)
    build_zoo(spec, reference, device="cpu")

    store = Store(tmp_path / "s", create=True)
    stop, rounds = threading.Event(), []

    def collect() -> None:
        other = Store(tmp_path / "s")  # another process's view of the store, as `dlstore gc`
        while not stop.is_set():
            rounds.append(gc(other, older_than_hours=0))

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        report = build_zoo(spec, store, device="cpu")
    finally:
        stop.set()
        collector.join()
    assert len(rounds) >= 3 and any(r.live_builds for r in rounds)
    assert sum(len(r.shards) for r in rounds) == 0
    assert report.runs_built == 4 and report.runs_dropped == 0
    assert verify(store).ok
    assert _blobs(store) == _blobs(reference)  # the same bytes, shard for shard
    got, want = _final_weights(store), _final_weights(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[r][k], want[r][k]) for r in want for k in want[r])
    assert not live_leases(store.location)  # the build dropped its lease


def test_two_builds_of_one_spec_write_identical_shards(built_store, tiny_spec, tmp_path):
    again = Store(tmp_path / "again", create=True)
    build_zoo(tiny_spec, again, device="cpu")
    assert _blobs(again) == _blobs(built_store)
    for blob in _blobs(again):
        assert (Path(again.blobs.path(blob)).read_bytes()
                == Path(built_store.blobs.path(blob)).read_bytes())


def _orphan(store: Store, value: float) -> str:
    return store.blobs.put({"w": torch.full((2, 3), value)}, {"format": "test"})


def test_leases_decide_which_unreferenced_shards_gc_spares(built_store, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(built_store.root, root)
    store = Store(root)
    referenced = _blobs(store)
    with BuildLease(store.location, "tiny"):
        fresh = _orphan(store, 1.0)
        report = gc(Store(root), older_than_hours=0)
        assert report.live_builds == 1 and fresh in _blobs(store) and not report.shards
    # the build is over and nothing referenced its shard: it goes, and only it
    report = gc(Store(root), older_than_hours=0)
    assert report.shards == [fresh] and _blobs(store) == referenced
    # a lease whose heartbeat stopped (its process was killed) protects nothing
    dead = {"zoo": "tiny", "started": time.time() - 1000,
            "heartbeat": time.time() - 2 * TTL_SECONDS}
    store.location.write_atomic("leases/dead.json", json.dumps(dead).encode())
    orphan = _orphan(store, 2.0)
    assert gc(Store(root), older_than_hours=0).shards == [orphan]
    # storing bytes that exist claims them anew: an old orphan reused by a build is young again
    old = _orphan(store, 3.0)
    path = Path(store.blobs.path(old))
    long_ago = time.time() - 48 * 3600
    os.utime(path, (long_ago, long_ago))
    assert gc(Store(root), older_than_hours=24, dry_run=True).shards == [old]
    assert _orphan(store, 3.0) == old
    assert gc(Store(root), older_than_hours=24).shards == []


def test_gc_of_table_files_counts_exactly_and_adds_no_commits(built_store, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(built_store.root, root)
    store = Store(root)
    run = store.runs()["run_id"][0]
    for i in range(3):
        StoreWriter(store).add_metrics({"run_id": [run], "step": [0], "metric": [f"m{i}"],
                                        "tensor": [None], "value": [float(i)]})
    merged = compact(store)
    assert merged["metrics"] >= 4
    logs = {p: p.read_bytes() for p in root.glob("tables/*/_delta_log/*")}
    # compacted away seconds ago: younger than 0.01 hours, kept; --older-than is not rounded
    assert gc(Store(root), older_than_hours=0.01).table_files == 0
    dry = gc(Store(root), older_than_hours=0, dry_run=True).table_files
    assert dry == sum(merged.values())
    assert gc(Store(root), older_than_hours=0).table_files == dry
    assert gc(Store(root), older_than_hours=0).table_files == 0  # nothing left to count
    assert {p: p.read_bytes() for p in root.glob("tables/*/_delta_log/*")} == logs
    assert verify(Store(root)).ok
    assert Store(root).sql("SELECT count(*) AS n FROM metrics WHERE metric LIKE 'm_'")["n"][0] == 3


def test_verify_repair_makes_a_lost_shard_rebuildable(built_store, tiny_spec, tmp_path):
    import subprocess
    import sys

    root = tmp_path / "s"
    shutil.copytree(built_store.root, root)
    store = Store(root)
    final = store.sql("SELECT run_id, blob FROM checkpoints JOIN runs USING (run_id) "
                      "WHERE step = final_step ORDER BY run_id")
    blob = final["blob"][0]
    hit = sorted(final.filter(final["blob"] == blob)["run_id"])
    path = Path(store.blobs.path(blob))
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # corrupted in place
    plain = subprocess.run([sys.executable, "-m", "dlstore.cli", "verify", "--store", str(root)],
                           capture_output=True, text=True)
    assert plain.returncode == 1 and "corrupted" in plain.stdout
    fixed = subprocess.run([sys.executable, "-m", "dlstore.cli", "verify", "--repair",
                            "--store", str(root)], capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stdout
    assert f"repaired: {len(hit)} runs hidden" in fixed.stdout
    assert sorted(set(Store(root).run_ids()) ^ set(built_store.run_ids())) == hit
    # the next build trains exactly those runs again, and they end as before (1e-5: they now
    # share a cohort only with each other)
    report = build_zoo(tiny_spec, Store(root), device="cpu")
    assert report.runs_built == len(hit)
    rebuilt = Store(root)
    assert verify(rebuilt).ok
    for run in hit:
        got, want = rebuilt.load_state_dict(run), built_store.load_state_dict(run)
        assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)


def test_rm_is_refused_while_a_build_of_the_zoo_runs(built_store, tmp_path):
    from dlstore.errors import StoreError

    root = tmp_path / "s"
    shutil.copytree(built_store.root, root)
    store = Store(root)
    run = sorted(store.run_ids())[0]
    with BuildLease(store.location, "tiny"):
        with pytest.raises(StoreError, match="a build of zoo 'tiny' is running"):
            store.remove_runs([run])
    with BuildLease(store.location, "another-zoo"):
        assert store.remove_runs([run]) == 1


def test_gc_removes_table_files_no_log_entry_added_once_they_are_old(tmp_path):
    """A compaction that lost a race (or an append that died before its commit) leaves a data
    file that no log entry names: gc removes it once it is ORPHAN_SECONDS old, never sooner,
    even at --older-than 0 (an append in flight has such a file for a few seconds)."""
    from dlstore.store.tables import ORPHAN_SECONDS

    root = tmp_path / "s"
    store = Store(root, create=True)
    run_rows = {"run_id": ["r"], "step": [0], "metric": ["m"], "tensor": [None],
                "value": [1.0], "commit_id": ["c"]}
    StoreWriter(store).append_rows("metrics", run_rows)
    (live,) = store.tables.snapshot("metrics")[1]
    folder = Path(live).parent
    old, fresh = folder / "part-orphan-old.parquet", folder / "part-orphan-new.parquet"
    shutil.copy(live, old)
    shutil.copy(live, fresh)
    long_ago = time.time() - ORPHAN_SECONDS - 60
    os.utime(old, (long_ago, long_ago))
    os.utime(live, (long_ago, long_ago))  # the live file is old too, and stays
    assert gc(Store(root), older_than_hours=0, dry_run=True).table_files == 1
    assert gc(Store(root), older_than_hours=0).table_files == 1
    assert not old.exists() and fresh.exists() and Path(live).exists()
    assert verify(Store(root)).ok
    assert Store(root).sql("SELECT count(*) AS n FROM metrics")["n"][0] == 0  # no runs row
    assert Store(root).sql("SELECT count(*) AS n FROM _metrics")["n"][0] == 1
