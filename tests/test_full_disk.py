"""A full disk is a one-line error for every writing command, never a Rust panic: writes are
refused before they would leave less than a few MiB free."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import TINY_SPEC


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", f"dlstore-{uuid.uuid4().hex[:8]}",
             str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and mount permission")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlstore.cli", *map(str, args)],
                          capture_output=True, text=True)


def _fill(mount: Path) -> None:
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    (mount / "filler").write_bytes(b"\0" * max(0, free - (1 << 20)))


@pytest.mark.slow
def test_a_full_disk_is_a_one_line_error(small_disk, tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC.replace("train.lr = [0.05, 0.2]", ""))
    store = small_disk / "s"
    assert _cli("build-zoo", spec, "--store", store, "--device", "cpu").returncode == 0
    _fill(small_disk)
    grown = tmp_path / "more.toml"
    grown.write_text(TINY_SPEC)
    for args in (["compact"], ["build-zoo", grown, "--grow", "--device", "cpu"],
                 ["metrics", "groups", "--zoo", "tiny"]):
        result = _cli(*args, "--store", store)
        assert result.returncode == 1, (args, result.stderr)
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "full" in lines[0], result.stderr
        assert "panicked" not in result.stderr and "Traceback" not in result.stderr
    # nothing was half-written: the store still verifies and answers
    (small_disk / "filler").unlink()
    assert _cli("verify", "--store", store).returncode == 0
    assert "4" in _cli("sql", "SELECT count(*) AS n FROM runs", "--store", store,
                       "--format", "csv").stdout.split()
