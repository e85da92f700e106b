"""Store, views and checkpoints, on a tiny zoo built once per session."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import dlstore
from dlstore.building.build import build_zoo
from dlstore.errors import (
    CorruptBlobError,
    NotFoundError,
    QueryError,
    StoreError,
)
from dlstore.store.writer import StoreWriter


def test_runs_view_has_typed_hyperparameters(built_store, tiny_spec):
    runs = built_store.runs()
    assert runs.height == 8
    assert set(runs["run_id"]) == {r.run_id for r in tiny_spec.runs}
    assert set(runs["width"]) == {8, 16} and set(runs["lr"]) == {0.05, 0.2}
    assert set(runs["status"]) == {"complete"}
    # n_params of a 1-hidden-layer MLP: 10 inputs -> w -> 4 classes
    for row in runs.iter_rows(named=True):
        w = row["width"]
        assert row["n_params"] == 10 * w + w + w * 4 + 4
        assert json.loads(row["config"])["model"]["width"] == w


def test_checkpoints_and_metrics_long_format(built_store):
    counts = built_store.sql(
        "SELECT run_id, count(*) AS n, min(step) AS first, max(step) AS last "
        "FROM checkpoints GROUP BY run_id")
    assert counts.height == 8
    assert set(counts["n"]) == {5} and set(counts["first"]) == {0}
    total = built_store.sql("SELECT DISTINCT total_steps FROM runs")["total_steps"].to_list()
    assert counts["last"].unique().to_list() == total  # log:5 includes the last step
    whole = "FROM metrics WHERE tensor IS NULL"
    metrics = built_store.sql(f"SELECT DISTINCT metric {whole} ORDER BY metric")
    assert metrics["metric"].to_list() == sorted(
        ["train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "dist_from_init"])
    assert built_store.sql(f"SELECT count(*) AS n {whole}")["n"][0] == 8 * 5 * 6
    # the default per-tensor statistics: every parameter tensor of every run at every checkpoint
    n_tensors = len(built_store.load_state_dict(built_store.runs()["run_id"][0]))
    per_tensor = built_store.sql("SELECT count(*) AS n FROM metrics WHERE metric = 'q50'")
    assert per_tensor["n"][0] == 8 * 5 * n_tensors
    zero = built_store.sql("SELECT max(value) AS v FROM metrics "
                           "WHERE metric = 'dist_from_init' AND step = 0")
    assert zero["v"][0] == 0.0


def test_final_view_answers_questions_across_runs(built_store):
    answer = built_store.sql(
        "SELECT width, lr, avg(value) AS acc, count(*) AS n FROM final "
        "WHERE metric = 'test_acc' GROUP BY width, lr ORDER BY width, lr")
    assert answer.height == 4 and set(answer["n"]) == {2}
    assert answer["acc"].min() > 0.5  # a separable mixture: every config learns something
    steps = built_store.sql("SELECT DISTINCT f.step = r.final_step AS ok FROM final f "
                            "JOIN runs r USING (run_id)")
    assert steps["ok"].to_list() == [True]


def test_curves_and_wide_views(built_store):
    curves = built_store.sql("SELECT run_id, step, epoch, value FROM curves "
                             "WHERE metric = 'train_loss' ORDER BY run_id, step")
    assert curves.height == 40
    assert curves.filter(curves["step"] == 0)["epoch"].to_list() == [0.0] * 8
    wide = built_store.sql("SELECT * FROM metrics_wide")
    assert wide.height == 40 and "test_acc" in wide.columns


def test_a_query_creates_the_views_it_names_and_they_follow_new_commits(tmp_path, built_store):
    shutil.copytree(built_store.root, tmp_path / "s")  # it gains a commit below
    store = dlstore.open(tmp_path / "s")
    views = ("SELECT view_name FROM duckdb_views() WHERE NOT internal "
             "AND NOT starts_with(view_name, '_')")
    assert store.sql("SELECT count(*) AS n FROM final")["n"][0] > 0
    made = set(store.catalog.con.sql(views).pl()["view_name"])
    # final reads _metrics and runs; runs' rows read tags when they are computed, not when a
    # copy an earlier query saved is loaded
    assert made - {"tags"} == {"final", "runs"}
    # a query that names no view of ours (a listing of the catalog) sees every one
    listed = set(store.sql(views)["view_name"])
    assert {"tickets", "ticket_transfer", "metrics_wide", "curves", "zoos"} <= listed
    # a commit after the views were made: a view named again reads the new snapshot
    before = store.sql("SELECT count(*) AS n FROM runs")["n"][0]
    StoreWriter(store).commit([], [], [{"run_id": "added-later", "zoo": "extra"}])
    assert store.sql("SELECT count(*) AS n FROM runs")["n"][0] == before + 1
    assert store.sql("SELECT count(*) AS n FROM metrics_wide WHERE run_id = 'added-later'"
                     )["n"][0] == 0


def _fresh_copy(built_store, path):
    shutil.copytree(built_store.root, path)
    shutil.rmtree(path / "cache", ignore_errors=True)
    return dlstore.open(path)


def _saved(root) -> list:
    return sorted((root / "cache").glob("_runs_latest-*.arrow"))


RUNS = "SELECT * FROM runs ORDER BY run_id"
TYPES = "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM runs)"


def test_the_runs_state_one_process_computed_the_next_loads(tmp_path, built_store):
    first = _fresh_copy(built_store, tmp_path / "s")
    computed, types = first.sql(RUNS), first.sql(TYPES)
    assert "tags" in first.catalog._views  # computed: what it reads was made
    assert len(_saved(tmp_path / "s")) == 1
    second = dlstore.open(tmp_path / "s")  # another connection, as another process has
    loaded = second.sql(RUNS)
    assert "tags" not in second.catalog._views  # loaded: nothing behind it was read
    assert loaded.equals(computed) and second.sql(TYPES).equals(types)
    assert loaded.height == 8 and loaded.schema == computed.schema


def test_a_saved_runs_state_is_never_served_for_other_files(tmp_path, built_store):
    root = tmp_path / "s"
    store = _fresh_copy(built_store, root)
    store.sql(RUNS)
    (old,) = _saved(root)
    # a commit to runs: another copy replaces the old one, and it holds the new run
    StoreWriter(store).commit([], [], [{"run_id": "added-later", "zoo": "extra"}])
    fresh = dlstore.open(root)
    assert "added-later" in set(fresh.sql(RUNS)["run_id"])
    (new,) = _saved(root)
    assert new != old and not old.exists()
    again = dlstore.open(root)
    assert again.sql(RUNS).equals(fresh.sql(RUNS)) and "tags" not in again.catalog._views
    # a damaged copy is computed again (and saved whole)
    new.write_bytes(b"not an arrow file")
    damaged = dlstore.open(root)
    assert damaged.sql(RUNS).equals(fresh.sql(RUNS)) and "tags" in damaged.catalog._views
    assert dlstore.open(root).sql(RUNS).equals(fresh.sql(RUNS))
    assert new.read_bytes() != b"not an arrow file"


def test_a_store_that_cannot_be_written_still_answers(tmp_path, built_store, monkeypatch):
    store = _fresh_copy(built_store, tmp_path / "s")
    expected = dlstore.open(built_store.root).sql(RUNS)

    def refuse(key, data, durable=True):
        raise PermissionError(f"read-only: {key}")

    monkeypatch.setattr(store.location, "write_atomic", refuse)
    assert store.sql(RUNS).equals(expected)
    assert _saved(tmp_path / "s") == []


def test_loaded_model_reproduces_stored_test_accuracy(built_store):
    row = built_store.sql("SELECT run_id, final_step FROM runs ORDER BY run_id LIMIT 1").row(0)
    run_id, step = row
    model = built_store.load_model(run_id)
    assert isinstance(model, torch.nn.Module) and not model.training
    data = built_store.load_dataset(run_id)
    with torch.no_grad():
        logits = model(data["x_test"])
        acc = (logits.argmax(1) == data["y_test"]).double().mean().item()
        loss = F.cross_entropy(logits, data["y_test"]).item()
    stored = built_store.sql(f"SELECT metric, value FROM metrics WHERE run_id = '{run_id}' "
                             f"AND step = {step}")
    values = dict(stored.iter_rows())
    assert acc == pytest.approx(values["test_acc"], abs=1e-9)
    assert loss == pytest.approx(values["test_loss"], rel=1e-5)


def test_load_state_dict_at_every_step(built_store):
    run_id = built_store.runs()["run_id"][0]
    steps = built_store.sql(f"SELECT step FROM checkpoints WHERE run_id = '{run_id}' "
                            "ORDER BY step")["step"].to_list()
    first = built_store.load_state_dict(run_id, steps[0])
    last = built_store.load_state_dict(run_id)
    assert first.keys() == last.keys()
    assert not torch.equal(first["layers.0.weight"], last["layers.0.weight"])
    dist = built_store.sql(f"SELECT value FROM metrics WHERE run_id = '{run_id}' AND "
                           f"metric = 'dist_from_init' AND step = {steps[-1]}")["value"][0]
    flat = torch.cat([(last[k] - first[k]).flatten() for k in last])
    assert flat.double().norm().item() == pytest.approx(dist, rel=1e-5)


def test_load_dataset_is_what_the_run_used(built_store):
    run_id = built_store.runs()["run_id"][0]
    data = built_store.load_dataset(run_id)
    run = built_store.run(run_id)
    assert data["x_train"].shape[0] == run["n_train"]
    assert data["x_train"].dtype == torch.float32 and data["y_train"].dtype == torch.int64


def test_rebuilding_the_same_spec_adds_nothing(built_store, tiny_spec):
    versions = {n: built_store.tables.snapshot(n)[0] for n in ("runs", "metrics", "zoos")}
    report = build_zoo(tiny_spec, built_store, device="cpu")
    assert report.runs_built == 0 and report.runs_skipped == 8
    assert {n: built_store.tables.snapshot(n)[0] for n in versions} == versions
    assert built_store.sql("SELECT count(*) AS n FROM zoos")["n"][0] == 1


def test_unknown_run_and_step(built_store):
    with pytest.raises(NotFoundError, match="no run 'nope'"):
        built_store.load_model("nope")
    run_id = built_store.runs()["run_id"][0]
    with pytest.raises(NotFoundError, match="no checkpoint at step 7777"):
        built_store.load_state_dict(run_id, 7777)


@pytest.mark.parametrize("query, message", [
    ("SELEC 1", "syntax"),
    ("SELECT nope FROM runs", "nope"),
    ("SELECT * FROM no_such_table", "no_such_table"),
])
def test_bad_sql_is_a_query_error(built_store, query, message):
    with pytest.raises(QueryError, match=message):
        built_store.sql(query)


def test_missing_store_and_file_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        dlstore.open(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        dlstore.open(tmp_path / "file")
    assert not (tmp_path / "absent").exists()


def test_interrupted_commit_is_invisible_and_resume_completes(tmp_path, tiny_spec):
    store = dlstore.Store(tmp_path / "s", create=True)
    # a crash after rows were appended but before the runs row: simulate by committing
    # checkpoint and metric rows of a real run without its runs row
    run = tiny_spec.runs[0]
    store.tables.append("metrics", [{"run_id": run.run_id, "step": 0, "metric": "test_acc",
                                     "tensor": None, "value": 0.123, "commit_id": "dead"}])
    assert store.sql("SELECT count(*) AS n FROM metrics")["n"][0] == 0
    report = build_zoo(tiny_spec, store, device="cpu")
    assert report.runs_built == 8
    leftover = store.sql("SELECT count(*) AS n FROM metrics WHERE value = 0.123")
    assert leftover["n"][0] == 0
    assert store.sql("SELECT count(*) AS n FROM metrics WHERE tensor IS NULL")["n"][0] == 8 * 5 * 6


def test_corrupted_shard_is_reported(tmp_path, built_store):
    copy = tmp_path / "copy"
    shutil.copytree(built_store.root, copy)
    store = dlstore.open(copy)
    row = store.checkpoint(store.runs()["run_id"][0])
    path = store.blobs.path(row["blob"])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlobError, match="corrupted"):
        store.load_state_dict(row["run_id"])
    path.unlink()
    with pytest.raises(NotFoundError, match="missing"):
        dlstore.open(copy).load_state_dict(row["run_id"])


def test_diverged_runs_are_stored_as_data(tmp_path):
    from dlstore.spec import ZooSpec

    text = (
        'name = "blowup"\nseeds = 1\ncheckpoints = "every:5"\n'
        '[dataset]\nname = "gaussian_mixture"\nn_samples = 300\n'
        '[model]\narch = "mlp"\nwidth = 8\n'
        '[train]\nbatch_size = 30\nsteps = 20\n[grid]\ntrain.lr = [0.05, 1e8]\n')
    store = dlstore.Store(tmp_path / "s", create=True)
    report = build_zoo(ZooSpec.from_text(text), store, device="cpu")
    assert report.runs_built == 2 and report.runs_diverged == 1
    runs = {r["lr"]: r for r in store.runs().iter_rows(named=True)}
    assert runs[0.05]["status"] == "complete" and runs[0.05]["diverged_step"] is None
    blown = runs[1e8]
    assert blown["status"] == "diverged" and 0 <= blown["diverged_step"] < 20
    assert blown["final_step"] is None or blown["final_step"] <= blown["diverged_step"]
    steps = store.sql("SELECT max(step) AS s FROM checkpoints WHERE run_id = ?",
                      [blown["run_id"]])["s"][0]
    assert steps == blown["final_step"]


def test_mixed_width_cohort_stores_each_member_at_its_true_shape(built_store):
    runs = built_store.runs()
    assert runs["cohort_id"].n_unique() == 1  # widths 8 and 16 trained together
    blobs = built_store.sql("SELECT DISTINCT c.blob, r.width FROM checkpoints c "
                            "JOIN runs r USING (run_id) WHERE c.step = 0")
    assert blobs.height == 2  # one shard per width at each step, no padding on disk
    for row in runs.iter_rows(named=True):
        state = built_store.load_state_dict(row["run_id"])
        assert state["layers.0.weight"].shape == (row["width"], 10)
        assert state["layers.1.weight"].shape == (4, row["width"])
    for blob, width in blobs.iter_rows():
        layout = json.loads(built_store.blobs.metadata(blob)["layout"])
        assert {e["name"]: e["shape"] for e in layout}["layers.0.weight"] == [width, 10]


def test_a_store_gains_new_schema_columns_without_migration(tmp_path, built_store, monkeypatch):
    """A column added to dlstore.schemas reads as null in an older store, and the store's next
    write adds it to the Delta table; older rows keep their values."""
    import pyarrow as pa

    from dlstore import schemas

    copy = tmp_path / "copy"
    shutil.copytree(built_store.root, copy)
    grown = schemas.FITS.append(pa.field("added_later", pa.int64()))
    monkeypatch.setitem(schemas.TABLES, "fits", grown)
    store = dlstore.open(copy)
    assert store.sql("SELECT count(*) AS n FROM fits WHERE added_later IS NULL")["n"][0] == 0
    old = {"kind": "power_law", "query": "q", "params": "{}", "ci": "{}", "ci_level": 0.95,
           "objective": 0.0, "n": 3, "dlstore_version": "0"}
    monkeypatch.setitem(schemas.TABLES, "fits", schemas.FITS)
    StoreWriter(dlstore.open(copy)).record_fit(old)  # a write by the older schema
    monkeypatch.setitem(schemas.TABLES, "fits", grown)
    store = dlstore.open(copy)
    assert store.sql("SELECT added_later FROM fits")["added_later"].to_list() == [None]
    StoreWriter(store).record_fit({**old, "added_later": 7})
    got = dlstore.open(copy).sql("SELECT added_later FROM fits ORDER BY added_later NULLS FIRST")
    assert got["added_later"].to_list() == [None, 7]
    assert dlstore.open(copy).runs().height == 8  # the rest of the store reads as before
