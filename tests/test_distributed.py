"""Distributed builds: cohorts as Ray tasks, and --shard I/N splits, give the local build."""

import subprocess
import sys

import pytest
import torch

import dlstore
from dlstore.building.build import build_zoo
from dlstore.cli import _parse_shard
from dlstore.errors import SpecError, UsageError
from dlstore.experiments.base import shard_runs
from dlstore.store.maintenance import verify
from tests.conftest import TINY_SPEC


def _assert_same_build(store, reference, exact=True):
    """Same runs, metrics and weights: bit for bit when the cohorts are the same, else to the
    cohort trainer's tolerance (a member's weights do not depend on its cohort, up to float
    rounding)."""
    assert set(store.run_ids()) == set(reference.run_ids())
    query = "SELECT run_id, step, metric, value FROM metrics ORDER BY ALL"
    got, want = store.sql(query), reference.sql(query)
    if exact:
        assert got.equals(want)
    else:
        assert got.drop("value").equals(want.drop("value"))
        torch.testing.assert_close(got["value"].to_torch(), want["value"].to_torch(),
                                   atol=1e-5, rtol=1e-5)
    for run_id in reference.run_ids():
        got, want = store.load_state_dict(run_id), reference.load_state_dict(run_id)
        assert got.keys() == want.keys()
        for k in want:
            if exact:
                assert torch.equal(got[k], want[k]), (run_id, k)
            else:
                torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)
    report = verify(store)
    assert report.ok, report.problems


@pytest.fixture(scope="module")
def ray_instance():
    try:
        import ray
    except ImportError as e:
        pytest.skip(f"ray cannot be imported ({e}); pip install 'dlstore[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_a_ray_build_equals_the_local_build(ray_instance, s3, tiny_spec, built_store):
    """Each cohort a Ray task writing to object storage: same run ids, metrics and weights bit
    for bit as the local build, verify clean."""
    store = dlstore.Store(s3.new_uri(), create=True, storage_options=s3.options)
    seen = []
    report = build_zoo(tiny_spec, store, device="cpu", backend="ray",
                       progress=lambda done, total: seen.append((done, total)))
    assert report.runs_built == 8 and report.cohorts == 1
    assert seen and seen[-1][0] == seen[-1][1]
    _assert_same_build(store, built_store)
    again = build_zoo(tiny_spec, store, device="cpu", backend="ray")
    assert again.runs_built == 0 and again.runs_skipped == 8


def test_shards_split_the_plan_and_together_equal_the_whole(tmp_path, tiny_spec, built_store):
    runs = tiny_spec.runs
    parts = [shard_runs(runs, i, 3) for i in range(3)]
    assert [r.run_id for part in parts for r in part] == [r.run_id for r in runs]
    assert [len(p) for p in parts] == [3, 3, 2]
    store = dlstore.Store(tmp_path / "sharded", create=True)
    built = [build_zoo(tiny_spec, store, device="cpu", shard=(i, 2)).runs_built
             for i in range(2)]
    assert built == [4, 4]
    _assert_same_build(store, built_store, exact=False)  # cohorts of 4, not one of 8
    assert store.sql("SELECT count(*) AS n FROM zoos")["n"][0] == 1
    with pytest.raises(SpecError, match="0 <= I < N"):
        shard_runs(runs, 2, 2)


def test_ray_backend_without_ray_says_how_to_install_it(tmp_path):
    spec = tmp_path / "x.toml"
    spec.write_text(TINY_SPEC)
    code = ("import sys; sys.modules['ray'] = None; from dlstore.cli import main; "
            f"sys.argv = ['dlstore', 'build-zoo', {str(spec)!r}, '--store', "
            f"{str(tmp_path / 's')!r}, '--backend', 'ray']; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --backend ray needs Ray: pip install 'dlstore[ray]'")
    assert "Traceback" not in result.stderr


def test_bad_shard_and_backend_options_are_one_line_errors(tmp_path):
    for text in ("3/2", "a", "1/0", "-1/2", "1"):
        with pytest.raises(UsageError, match="give I/N with 0 <= I < N"):
            _parse_shard(text)
    assert _parse_shard("1/2") == (1, 2)
    spec = tmp_path / "x.toml"
    spec.write_text(TINY_SPEC)
    result = subprocess.run([sys.executable, "-m", "dlstore.cli", "build-zoo", str(spec),
                             "--store", str(tmp_path / "s"), "--address", "auto"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: --address names a Ray cluster: give it with --backend ray")
    assert not (tmp_path / "s").exists()
