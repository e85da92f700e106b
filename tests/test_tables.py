"""The tables' write layout: rows clustered by `CLUSTER_BY` in row groups of `ROW_GROUP_ROWS`,
and the compaction that the writer of every `COMPACT_EVERY`-th version runs."""

from __future__ import annotations

import random

import pyarrow.parquet as pq

from dlstore.schemas import ROW_GROUP_ROWS
from dlstore.store import tables as tables_module
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter


def _metric_rows(n: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    names = ["test_acc", "train_loss", "test_loss", "train_acc"]
    rows = [(f"r{rng.randrange(50):02d}", rng.randrange(300), rng.choice(names), rng.random())
            for _ in range(n)]
    return {"run_id": [r[0] for r in rows], "step": [r[1] for r in rows],
            "metric": [r[2] for r in rows], "tensor": [None] * n,
            "value": [r[3] for r in rows], "commit_id": ["c"] * n}


def test_metric_rows_land_clustered_in_bounded_row_groups(tmp_path):
    store = Store(tmp_path / "s", create=True)
    columns = _metric_rows(40_000, seed=0)
    StoreWriter(store).append_rows("metrics", columns)
    (path,) = store.tables.snapshot("metrics")[1]
    file = pq.ParquetFile(path)
    assert [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)] == [
        ROW_GROUP_ROWS, ROW_GROUP_ROWS, 40_000 - 2 * ROW_GROUP_ROWS]
    written = file.read().to_pylist()
    keys = [(r["metric"], r["step"], r["run_id"]) for r in written]
    assert keys == sorted(keys)
    # the same rows: sorted, not changed
    given = sorted(zip(columns["metric"], columns["step"], columns["run_id"], columns["value"]))
    assert sorted((r["metric"], r["step"], r["run_id"], r["value"]) for r in written) == given
    # a row group's statistics can now rule out other metrics: here the last holds one only
    stats = [file.metadata.row_group(i).column(2).statistics for i in range(file.num_row_groups)]
    assert sum(s.min == s.max for s in stats) >= 1


def test_the_writer_of_every_tenth_version_merges_the_small_files(tmp_path):
    store = Store(tmp_path / "s", create=True)
    writer = StoreWriter(store)
    every = tables_module.COMPACT_EVERY
    for i in range(every - 1):  # versions 1 .. every-1 (0 created the table)
        writer.append_rows("metrics", _metric_rows(100, seed=i))
    assert len(store.tables.snapshot("metrics")[1]) == every - 1
    writer.append_rows("metrics", _metric_rows(100, seed=every))  # version `every`: merges
    version, files = store.tables.snapshot("metrics")
    assert len(files) == 1 and version == every + 1  # the append, then the compaction
    rows = store.sql("SELECT count(*) AS n, sum(value) AS s FROM _metrics")
    expected = [_metric_rows(100, seed=i) for i in [*range(every - 1), every]]
    assert rows["n"][0] == 100 * every
    assert abs(rows["s"][0] - sum(sum(c["value"]) for c in expected)) < 1e-9
    # the merged file's row groups stay bounded (its rows are not re-sorted: see README)
    assert all(pq.ParquetFile(f).metadata.row_group(0).num_rows <= ROW_GROUP_ROWS
               for f in files)


def test_a_failed_compaction_leaves_the_append_standing(tmp_path, monkeypatch):
    store = Store(tmp_path / "s", create=True)
    writer = StoreWriter(store)
    called = []

    def refuse(self, name):
        called.append(name)
        raise OSError("disk full")

    monkeypatch.setattr(tables_module.DeltaTable, "optimize", property(
        lambda self: type("O", (), {"compact": lambda *a, **k: refuse(self, "metrics")})()))
    for i in range(tables_module.COMPACT_EVERY):
        writer.append_rows("metrics", _metric_rows(10, seed=i))
    assert called == ["metrics"]
    rows = store.sql("SELECT count(*) AS n FROM _metrics")["n"][0]
    assert rows == 10 * tables_module.COMPACT_EVERY


def test_appends_and_compactions_stay_compressed(tmp_path):
    store = Store(tmp_path / "s", create=True)
    writer = StoreWriter(store)
    for i in range(tables_module.COMPACT_EVERY):
        writer.append_rows("metrics", _metric_rows(2_000, seed=i))
    (path,) = store.tables.snapshot("metrics")[1]
    column = pq.ParquetFile(path).metadata.row_group(0).column(4)  # value
    assert column.compression == "SNAPPY"


def _small_files(store: Store, n: int) -> None:
    for i in range(n):
        StoreWriter(store).append_rows("metrics", _metric_rows(10, seed=100 + i))


def _rows(store: Store) -> int:
    return store.sql("SELECT count(*) AS n FROM _metrics")["n"][0]


def test_a_compaction_beside_another_leaves_the_rows_once(tmp_path):
    # deltalake lets two OPTIMIZE commits that removed the same files both land (their rows
    # then show twice): while one compaction holds the table's lock, the elected one skips
    store = Store(tmp_path / "s", create=True)
    _small_files(store, 3)
    version, files = store.tables.snapshot("metrics")
    lock = tables_module.COMPACT_LOCK.format(name="metrics")
    with store.location.exclusive(lock, wait=False) as held:
        assert held
        store.tables._merge_small_files("metrics")
        assert store.tables.snapshot("metrics") == (version, files)  # it skipped
    store.tables._merge_small_files("metrics")  # free again: it merges
    after_version, after_files = store.tables.snapshot("metrics")
    assert after_version == version + 1 and len(after_files) == 1
    assert _rows(store) == 30


def test_compactions_at_once_wait_for_each_other(tmp_path):
    import threading

    store = Store(tmp_path / "s", create=True)
    _small_files(store, 4)
    lock = tables_module.COMPACT_LOCK.format(name="metrics")
    done = []
    with store.location.exclusive(lock, wait=False) as held:
        assert held
        other = threading.Thread(target=lambda: done.append(store.tables.compact("metrics")))
        other.start()
        other.join(timeout=1.0)
        assert other.is_alive() and not done  # `dlstore compact` waits for the lock
        store.tables._open("metrics").optimize.compact()  # the holder's own merge
    other.join(timeout=30)
    assert len(done) == 1 and done[0].get("numFilesRemoved", 0) == 0  # nothing left to merge
    assert _rows(store) == 40 and len(store.tables.snapshot("metrics")[1]) == 1
