"""Damage that must be found: by `verify`, listed by name while it goes on, and by every other
command as a one-line error naming the table and `dlstore verify` (never a traceback, never
Rust's debug dumps or panics, never silently fewer rows)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dlstore.errors import StoreError
from dlstore.store.maintenance import verify
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter


def _log(root: Path, table: str) -> list[Path]:
    return sorted((root / "tables" / table / "_delta_log").glob("*.json"))


def _data(root: Path, table: str) -> list[Path]:
    return sorted((root / "tables" / table).glob("*.parquet"))


DAMAGE = {
    "newest runs entry emptied": lambda r: _log(r, "runs")[-1].write_bytes(b""),
    "newest runs entry deleted": lambda r: _log(r, "runs")[-1].unlink(),
    "runs entry garbled": lambda r: _log(r, "runs")[-1].write_bytes(b'{"add": {"pa\x00\xff'),
    "middle metrics entry deleted": lambda r: _log(r, "metrics")[1].unlink(),
    "first checkpoints entry deleted": lambda r: _log(r, "checkpoints")[0].unlink(),
    "metrics data file deleted": lambda r: _data(r, "metrics")[0].unlink(),
    "runs data file truncated": lambda r: _data(r, "runs")[0].write_bytes(
        _data(r, "runs")[0].read_bytes()[:100]),
}
# what verify's report names for each
NAMED = {
    "newest runs entry emptied": "table runs: log entry 1 is empty",
    "newest runs entry deleted": "table runs: its log ends at version 0 but version 1",
    "runs entry garbled": "table runs: log entry 1 is not valid JSON",
    "middle metrics entry deleted": "table metrics: log entry 1 is missing",
    "first checkpoints entry deleted": "table checkpoints: log entry 0 is missing",
    "metrics data file deleted": "table metrics: data file",
    "runs data file truncated": "table runs: data file",
}


@pytest.fixture(scope="module")
def pristine(built_store, tmp_path_factory):
    """The tiny store with one more metrics commit, so that a middle entry exists."""
    root = tmp_path_factory.mktemp("pristine") / "s"
    shutil.copytree(built_store.root, root)
    store = Store(root)
    run = store.runs()["run_id"][0]
    StoreWriter(store).add_metrics({"run_id": [run], "step": [0], "metric": ["extra"],
                                    "tensor": [None], "value": [1.0]})
    assert len(_log(root, "metrics")) >= 3
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlstore.cli", *args], capture_output=True,
                          text=True)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_found(pristine, tmp_path, case):
    root = tmp_path / "s"
    shutil.copytree(pristine, root)
    DAMAGE[case](root)
    report = verify(Store(root))
    assert not report.ok
    assert any(p.startswith(NAMED[case]) for p in report.problems), report.problems
    # verify goes on past the damaged table: the shards were still checked
    assert report.shards > 0
    # every other command: one line naming what is damaged, exit 1, no traceback or panic
    result = _cli("sql", "SELECT count(*) FROM runs JOIN metrics USING (run_id) JOIN "
                  "checkpoints USING (run_id)", "--store", str(root))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "verify" in result.stderr
    for text in ("Traceback", "panicked", "ParsedLogPath", "{ "):
        assert text not in result.stdout + result.stderr


def test_verify_command_lists_problems_and_exits_1(pristine, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(pristine, root)
    DAMAGE["middle metrics entry deleted"](root)
    DAMAGE["runs data file truncated"](root)
    result = _cli("verify", "--store", str(root))
    assert result.returncode == 1
    assert "table metrics: log entry 1 is missing" in result.stdout
    assert "table runs: data file" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_an_intact_store_verifies_clean(pristine):
    assert verify(Store(pristine)).ok


def test_a_damaged_log_is_refused_before_appending(pristine, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(pristine, root)
    _log(root, "metrics")[1].unlink()
    store = Store(root)
    with pytest.raises(StoreError, match="table 'metrics' is damaged: log entry 1 is missing"):
        StoreWriter(store).add_metrics({"run_id": [store.runs()["run_id"][0]], "step": [0],
                           "metric": ["more"], "tensor": [None], "value": [2.0]})
