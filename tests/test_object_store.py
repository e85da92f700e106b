"""Stores on object storage: a local S3-compatible server (moto), the same zoo and answers as a
local store, maintenance, a killed build resumed, builders side by side, clear errors."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dlstore
from dlstore.building.build import build_zoo
from dlstore.errors import StoreError
from dlstore.spec import ZooSpec
from dlstore.store.maintenance import compact, gc, verify
from dlstore.store.writer import StoreWriter
from tests.conftest import TINY_SPEC

METRICS = "SELECT run_id, step, metric, value FROM metrics ORDER BY ALL"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dlstore.cli", *args], capture_output=True,
                          text=True, env=env)


def _same_weights(store, reference):
    for run_id in reference.sql("SELECT run_id FROM runs")["run_id"]:
        got, want = store.load_state_dict(run_id), reference.load_state_dict(run_id)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), run_id


@pytest.fixture(scope="module")
def s3_store(s3, tiny_spec):
    """The tiny zoo built into the S3 server. Tests must not modify it."""
    store = dlstore.Store(s3.new_uri(), create=True, storage_options=s3.options)
    report = build_zoo(tiny_spec, store, device="cpu")
    assert report.runs_built == 8
    return store


def test_a_zoo_on_s3_answers_like_the_local_one(s3, s3_store, built_store):
    reopened = dlstore.open(s3_store.root, storage_options=s3.options)
    assert reopened.sql(METRICS).equals(built_store.sql(METRICS))
    assert reopened.runs().drop("cohort_id", "commit_id", "created_at", "train_seconds").equals(
        built_store.runs().drop("cohort_id", "commit_id", "created_at", "train_seconds"))
    _same_weights(reopened, built_store)
    run_id = reopened.runs()["run_id"][0]
    data = reopened.load_dataset(run_id)
    with torch.no_grad():
        acc = (reopened.load_model(run_id)(data["x_test"]).argmax(1) == data["y_test"])
    stored = reopened.sql("SELECT value FROM final WHERE run_id = ? AND metric = 'test_acc'",
                          [run_id])["value"][0]
    assert abs(acc.double().mean().item() - stored) < 1e-6
    report = verify(reopened)
    assert report.ok and report.shards == 10 and report.checkpoints == 40
    # everything lives in the bucket: tables, shards and the marker, nothing on local disk
    bucket = s3_store.location
    keys = [f.key for f in bucket.list("")]
    assert "dlstore.json" in keys
    assert sum(k.startswith("blobs/") and k.endswith(".safetensors") for k in keys) == 10
    assert any(k.startswith("tables/metrics/_delta_log/") for k in keys)


def test_the_cli_reaches_s3_through_options_and_environment(s3, s3_store):
    query = "SELECT count(*) AS n FROM final WHERE metric = 'test_acc'"
    result = _cli("sql", query, "--store", str(s3_store.root), "--format", "csv",
                  *s3.cli_options())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["n", "8"]
    env = {**os.environ, **s3.options}
    result = _cli("verify", "--store", str(s3_store.root), env=env)
    assert result.returncode == 0, result.stderr
    assert "ok: 10 shards, 40 checkpoints" in result.stdout
    run_id = s3_store.runs()["run_id"][0]
    shown = _cli("show", run_id, "--store", str(s3_store.root), env=env)
    assert shown.returncode == 0 and "test_acc" in shown.stdout


def test_maintenance_and_corruption_on_s3(s3, built_store, tiny_spec):
    store = dlstore.Store(s3.new_uri(), create=True, storage_options=s3.options)
    build_zoo(tiny_spec, store, device="cpu")
    before = store.sql(METRICS)
    orphan = store.blobs.put({"w": torch.ones(2, 3)}, {"format": "test"})
    store.location.write_atomic("blobs/ab/.leftover.tmp", b"partial")
    assert gc(store, older_than_hours=1).shards == []  # too young: a build may be writing it
    for kind in ("a", "b"):
        StoreWriter(store).record_fit({"kind": kind, "query": "SELECT 1", "params": "{}",
                                       "ci": "{}", "n": 1})
    assert compact(store)["fits"] == 2 and len(store.tables.snapshot("fits")[1]) == 1
    report = gc(store, older_than_hours=0)
    assert report.shards == [orphan] and report.temporary == 1 and report.table_files >= 1
    blobs, temporary = store.blobs.list()
    assert orphan not in blobs and temporary == [] and len(blobs) == 10
    reopened = dlstore.open(store.root, storage_options=s3.options)
    assert reopened.sql(METRICS).equals(before) and verify(reopened).ok

    # a shard damaged in the bucket is named by verify, which hashes the stored object
    blob = sorted(blobs)[0]
    data = bytearray(store.location.read_bytes(store.blobs.key(blob)))
    data[len(data) // 2] ^= 0x01
    with store.location.fs.open_output_stream(f"{store.location.base}/{store.blobs.key(blob)}"
                                              ) as f:
        f.write(bytes(data))
    report = verify(dlstore.open(store.root, storage_options=s3.options))
    assert [p for p in report.problems if f"shard {blob} is corrupted" in p]


def test_errors_name_what_is_wrong(s3, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        dlstore.open(s3.new_uri(), storage_options=s3.options)
    with pytest.raises(StoreError, match="UNSAFE_RENAME"):
        dlstore.open(s3.new_uri(), storage_options={**s3.options,
                                                    "AWS_S3_ALLOW_UNSAFE_RENAME": "true"})
    with pytest.raises(StoreError, match="object-store URIs"):
        dlstore.open(tmp_path, storage_options=s3.options)
    with pytest.raises(StoreError) as caught:
        dlstore.Store("s3://no-such-bucket/x", create=True, storage_options=s3.options)
    assert "\n" not in str(caught.value)
    bad = _cli("sql", "SELECT 1", "--store", s3.new_uri(), "--storage-option", "AWS_REGION")
    assert bad.returncode == 1 and "KEY=VALUE" in bad.stderr and "Traceback" not in bad.stderr


def _build(spec, uri, s3):
    return [sys.executable, "-m", "dlstore.cli", "build-zoo", str(spec), "--store", uri,
            "--device", "cpu", *s3.cli_options()]


def test_two_builders_at_once_on_s3(s3, tmp_path, built_store):
    """Both train the whole zoo (one cohort) and commit it, racing: each run shows once."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC)
    uri = s3.new_uri()
    dlstore.Store(uri, create=True, storage_options=s3.options)
    builders = [subprocess.Popen(_build(spec, uri, s3), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for builder in builders:
        _, err = builder.communicate(timeout=600)
        assert builder.returncode == 0, err
    store = dlstore.open(uri, storage_options=s3.options)
    assert store.sql("SELECT count(*) AS n FROM runs")["n"][0] == 8
    query = "SELECT run_id, count(*) AS n FROM metrics GROUP BY run_id ORDER BY run_id"
    assert store.sql(query).rows() == built_store.sql(query).rows()  # each run's rows once
    assert verify(store).ok
    _same_weights(store, built_store)


@pytest.mark.slow
def test_a_killed_build_on_s3_resumes(s3, tmp_path):
    text = (TINY_SPEC.replace("epochs = 3", "epochs = 30")
            + "\n[build]\ncohort_size = 1\ncommit_every = 0\n")
    spec = tmp_path / "crash.toml"
    spec.write_text(text)
    uri = s3.new_uri()
    store = dlstore.Store(uri, create=True, storage_options=s3.options)
    builder = subprocess.Popen(_build(spec, uri, s3), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while store.sql("SELECT count(*) AS n FROM runs")["n"][0] < 2:  # killed mid-build
        assert builder.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    os.kill(builder.pid, signal.SIGKILL)
    builder.wait()
    partial = store.sql("SELECT count(*) AS n FROM runs")["n"][0]
    assert 2 <= partial < 8
    resumed = subprocess.run(_build(spec, uri, s3), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    store = dlstore.open(uri, storage_options=s3.options)
    assert store.sql("SELECT count(*) AS n FROM runs")["n"][0] == 8
    assert verify(store).ok
    reference = dlstore.Store(tmp_path / "reference", create=True)
    build_zoo(ZooSpec.from_text(text), reference, device="cpu")
    _same_weights(store, reference)



def test_report_and_serve_read_a_store_on_s3(s3, s3_store, tmp_path):
    """`dlstore report` and `dlstore serve` over object storage: the page holds the zoo's runs,
    the SQL box answers and refuses as `dlstore sql` does."""
    import json
    import threading
    import urllib.error
    import urllib.parse
    import urllib.request

    from dlstore.report.server import ReportServer

    out = tmp_path / "report.html"
    result = _cli("report", "--store", s3_store.root, "--out", str(out), *s3.cli_options())
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert all(run_id in page for run_id in s3_store.runs()["run_id"])

    server = ReportServer(dlstore.open(s3_store.root, storage_options=s3.options), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ask = server.url + "api/sql?" + urllib.parse.urlencode(
            {"q": "SELECT count(*) AS n FROM runs"})
        answer = json.loads(urllib.request.urlopen(ask, timeout=60).read())
        assert (answer["columns"], answer["rows"]) == (["n"], [[8]])
        refused = server.url + "api/sql?" + urllib.parse.urlencode({"q": "CREATE TABLE t (x INT)"})
        assert "refused" in urllib.request.urlopen(refused, timeout=60).read().decode()
    finally:
        server.shutdown()
        server.server_close()
