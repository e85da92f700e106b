"""Several processes making one store at once, and a zoo name that already belongs to another
spec."""

import subprocess
import sys
import time

import pytest

from dlstore.building.build import build_zoo
from dlstore.errors import SpecError
from dlstore.spec import ZooSpec
from dlstore.store.maintenance import verify
from dlstore.store.store import Store
from tests.conftest import TINY_SPEC

CREATE = """
import os, sys, time
import dlstore
from dlstore.store.writer import StoreWriter
path, gate, i = sys.argv[1], sys.argv[2], sys.argv[3]
open(f"{gate}.ready-{i}", "w").close()
while not os.path.exists(gate):  # every process has imported dlstore: all start at once
    time.sleep(0.001)
store = dlstore.Store(path, create=True)
StoreWriter(store).record_zoo({"zoo": f"z{i}", "spec": "", "spec_hash": i, "n_runs": 0,
                  "dlstore_version": "test"})
"""


def test_eight_processes_create_one_store_at_once(tmp_path):
    root = tmp_path / "store"
    gate = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CREATE, str(root), str(gate), str(i)],
                              stderr=subprocess.PIPE, text=True) for i in range(8)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < 8 and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break  # one failed to start: its error is reported below
        time.sleep(0.01)
    gate.touch()
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, errors
    store = Store(root)
    assert sorted(store.sql("SELECT zoo FROM zoos")["zoo"]) == [f"z{i}" for i in range(8)]
    assert verify(store).ok


def test_a_different_spec_under_a_built_zoo_name_is_refused(built_store, tiny_spec, tmp_path):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(built_store.root, root)
    store = Store(root)
    more_seeds = ZooSpec.from_text(TINY_SPEC.replace("seeds = 2", "seeds = 3"))
    with pytest.raises(SpecError, match="zoo 'tiny' in this store was built from another spec"):
        build_zoo(more_seeds, store, device="cpu")
    assert len(store.run_ids()) == 8
    # the same spec with other comments, metrics or build settings is the same zoo
    same = ZooSpec.from_text("# a comment\n" + TINY_SPEC + "\n[build]\ncohort_size = 3\n")
    assert build_zoo(same, store, device="cpu").runs_built == 0
    # asked for explicitly, the zoo grows: only the new seed's runs are trained
    report = build_zoo(more_seeds, store, device="cpu", grow=True)
    assert report.runs_built == 4 and report.runs_skipped == 8
    hashes = store.sql("SELECT spec_hash, count(*) AS n FROM runs GROUP BY ALL ORDER BY n")
    assert hashes["n"].to_list() == [4, 8]
    assert set(hashes["spec_hash"]) == {tiny_spec.spec_hash, more_seeds.spec_hash}
    assert set(hashes["spec_hash"]) <= set(store.sql("SELECT spec_hash FROM zoos")["spec_hash"])
