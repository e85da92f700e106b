"""Property-based: whatever a user gives, the answer is a result or a one-line DlstoreError."""

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tomllib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlstore
from dlstore.errors import CorruptBlobError, DlstoreError, SpecError
from dlstore.spec import ZooSpec
from tests.conftest import TINY_SPEC

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)
FIELDS = {
    "": ["name", "seeds", "checkpoints", "grid", "build", "colour"],
    "dataset": ["name", "n_train", "label_noise", "noise_seed", "num_samples", "p", "dim"],
    "model": ["arch", "width", "depth", "activation", "kernel", "init_seed"],
    "train": ["optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs", "steps",
              "schedule", "betas"],
}


def _one_line(error: Exception) -> None:
    assert str(error) and "\n" not in str(error)


@SETTINGS
@given(section=st.sampled_from(sorted(FIELDS)), data=st.data(), value=values)
def test_any_field_value_gives_a_spec_or_a_spec_error(section, data, value):
    raw = tomllib.loads(TINY_SPEC)
    key = data.draw(st.sampled_from(FIELDS[section]))
    (raw if section == "" else raw[section])[key] = value
    try:
        spec = ZooSpec.from_dict(raw)
    except SpecError as e:
        _one_line(e)
    else:
        assert spec.runs and all(r.run_id.startswith(spec.name) for r in spec.runs)


@SETTINGS
@given(text=st.text(max_size=200))
def test_any_text_gives_a_spec_or_a_spec_error(text):
    try:
        ZooSpec.from_text(text)
    except SpecError as e:
        _one_line(e)


@SETTINGS
@given(grid=st.dictionaries(st.text(max_size=20), values, max_size=3))
def test_any_grid_gives_a_spec_or_a_spec_error(grid):
    raw = tomllib.loads(TINY_SPEC)
    raw["grid"] = grid
    try:
        ZooSpec.from_dict(raw)
    except SpecError as e:
        _one_line(e)


TICKET_FIELDS = {
    "tickets": ["levels", "prune_fraction", "output_prune_fraction", "scope", "rewind_steps",
                "controls", "stability", "colour"],
    "transfer": ["targets", "levels", "rewind_steps", "seeds", "controls", "find_on_target",
                 "all_pairs", "colour"],
}


@SETTINGS
@given(section=st.sampled_from(sorted(TICKET_FIELDS)), data=st.data(), value=values,
       target=st.dictionaries(st.sampled_from(["seed_offset", "train", "dataset", "model", "x"]),
                              values, max_size=2))
def test_any_tickets_or_transfer_value_gives_a_spec_or_a_spec_error(section, data, value, target):
    raw = tomllib.loads(TINY_SPEC)
    raw["tickets"] = {"levels": 2, "rewind_steps": [0, 3]}
    raw["transfer"] = {"targets": {"t": target}}
    raw[section][data.draw(st.sampled_from(TICKET_FIELDS[section]))] = value
    try:
        spec = ZooSpec.from_dict(raw)
    except SpecError as e:
        _one_line(e)
    else:
        assert spec.tickets is not None and spec.transfer is not None


@pytest.fixture(scope="module")
def shard_copy(tmp_path_factory, built_store):
    root = tmp_path_factory.mktemp("bad") / "store"
    shutil.copytree(built_store.root, root)
    store = dlstore.open(root)
    row = store.checkpoint(store.runs()["run_id"][0])
    return store, row, store.blobs.path(row["blob"]).read_bytes()


# each example opens the store twice (a fresh process's view): fewer examples than the others
@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_any_damaged_shard_is_refused(shard_copy, data):
    store, row, original = shard_copy
    path = store.blobs.path(row["blob"])
    if data.draw(st.booleans()):
        where = data.draw(st.integers(0, len(original) - 1))
        damaged = bytearray(original)
        damaged[where] ^= data.draw(st.integers(1, 255))
    else:
        damaged = original[:data.draw(st.integers(0, len(original) - 1))]
    path.write_bytes(bytes(damaged))
    try:
        with pytest.raises(CorruptBlobError) as caught:
            dlstore.open(store.root).load_state_dict(row["run_id"])
        _one_line(caught.value)
    finally:
        path.write_bytes(original)
    weights = dlstore.open(store.root).load_state_dict(row["run_id"])
    assert all(torch.isfinite(v).all() for v in weights.values())


@SETTINGS
@given(query=st.text(max_size=60))
def test_any_query_text_gives_rows_or_a_query_error(built_store, query):
    try:
        built_store.sql(query)
    except DlstoreError as e:
        assert str(e)


@SETTINGS
@given(run_id=st.text(max_size=30), step=st.one_of(st.none(), st.integers(-5, 10**6)))
def test_any_run_id_and_step_give_weights_or_not_found(built_store, run_id, step):
    try:
        built_store.load_state_dict(run_id, step)
    except DlstoreError as e:
        _one_line(e)


@contextlib.contextmanager
def read_only(root):
    """Make a directory tree unwritable: permissions for a normal user, the immutable attribute
    for root (whom permissions do not stop); skip where neither is possible."""
    if os.geteuid() != 0:
        modes = {}
        for folder, _, files in os.walk(root):
            for path in [folder, *(os.path.join(folder, f) for f in files)]:
                modes[path] = os.stat(path).st_mode
                os.chmod(path, modes[path] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield
        finally:
            for path, mode in modes.items():
                os.chmod(path, mode)
        return
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "-R", "+i", str(root)], capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i is not available: nothing makes a "
                    "directory read-only for root here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(root)], check=True)


def _tree(root) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_read_only_store_is_a_one_line_error_and_stays_as_it_was(tmp_path, tiny_spec):
    from dlstore.building.build import build_zoo
    from dlstore.store.store import Store

    store = Store(tmp_path / "s", create=True)
    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text(TINY_SPEC)
    before = _tree(store.root)
    with read_only(store.root):
        with pytest.raises(DlstoreError) as caught:
            build_zoo(tiny_spec, store, device="cpu")
        _one_line(caught.value)
        result = subprocess.run(
            [sys.executable, "-m", "dlstore.cli", "build-zoo", str(spec_file), "--store",
             str(store.root), "--device", "cpu"], capture_output=True, text=True)
    assert _tree(store.root) == before
    assert dlstore.open(store.root).runs().height == 0
    assert result.returncode == 1 and "Traceback" not in result.stderr
