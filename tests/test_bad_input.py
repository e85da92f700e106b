"""Property-based: whatever a user gives, the answer is a result or a one-line DlstoreError."""

import shutil
import tomllib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlstore
from dlstore.errors import CorruptBlobError, DlstoreError, SpecError
from dlstore.zoo.spec import ZooSpec
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


@SETTINGS
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


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes through read-only permissions")
def test_read_only_store_is_a_one_line_error(tmp_path, tiny_spec):
    import os
    import stat

    from dlstore.store.store import Store
    from dlstore.zoo.builder import build_zoo

    store = Store(tmp_path / "s", create=True)
    for folder, _, files in os.walk(store.root):
        for name in [*files, "."]:
            path = os.path.join(folder, name)
            os.chmod(path, os.stat(path).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    with pytest.raises(DlstoreError) as caught:
        build_zoo(tiny_spec, store, device="cpu")
    _one_line(caught.value)
