"""The log replay (`dlstore.store.deltalog`) against deltalake's own snapshot, the reference:
after appends, a compaction (remove actions), a checkpoint, and a clean-up of the log entries
before the checkpoint; and refusing what it does not read."""

import json

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from dlstore.errors import StoreError
from dlstore.store.deltalog import LogReplay, UnsupportedTable
from dlstore.store.location import LocalLocation
from dlstore.store.tables import Tables


def _append(path, start: int, n: int = 3) -> None:
    write_deltalake(str(path), pa.table({"x": list(range(start, start + n))}), mode="append")


def _replayed(path) -> LogReplay:
    log = path / "_delta_log"
    commits = {int(p.name[:20]): str(p) for p in log.glob("*.json")}
    checkpoints = {}
    for p in log.glob("*.checkpoint*.parquet"):
        checkpoints.setdefault(int(p.name[:20]), []).append(str(p))
    replay = LogReplay()
    replay.advance(commits, checkpoints, lambda key: open(key, "rb").read())
    return replay


def _reference(path) -> tuple[int, set[str]]:
    table = DeltaTable(str(path))
    return table.version(), {uri.rsplit("/", 1)[-1] for uri in table.file_uris()}


def test_replay_equals_deltalake_through_compaction_checkpoint_and_cleanup(tmp_path):
    path = tmp_path / "t"
    for i in range(4):
        _append(path, 10 * i)
    replay = _replayed(path)
    assert (replay.version, set(replay.files)) == _reference(path)
    assert sorted(replay.files.values()) == [3, 3, 3, 3]  # rows, from the log's statistics

    DeltaTable(str(path)).optimize.compact()  # removes the four files, adds one
    _append(path, 100, n=5)
    replay = _replayed(path)
    assert (replay.version, set(replay.files)) == _reference(path)
    assert sorted(replay.files.values()) == [5, 12]

    table = DeltaTable(str(path))
    table.create_checkpoint()
    _append(path, 200)
    # the entries a checkpoint covers may be deleted: the replay starts from the checkpoint
    for entry in (path / "_delta_log").glob("*.json"):
        if int(entry.name[:20]) < table.version():
            entry.unlink()
    replay = _replayed(path)
    assert (replay.version, set(replay.files)) == _reference(path)
    assert sorted(replay.files.values()) == [3, 5, 12]


def test_replay_is_incremental(tmp_path):
    path = tmp_path / "t"
    _append(path, 0)
    replay, reads = LogReplay(), []

    def read(key):
        reads.append(key)
        return open(key, "rb").read()

    def listing():
        return {int(p.name[:20]): str(p) for p in (path / "_delta_log").glob("*.json")}

    replay.advance(listing(), {}, read)
    _append(path, 3)
    _append(path, 6)
    reads.clear()
    replay.advance(listing(), {}, read)
    assert [key.rsplit("/", 1)[-1][:20] for key in reads] == [f"{v:020d}" for v in (1, 2)]
    assert (replay.version, set(replay.files)) == _reference(path)


def test_features_it_does_not_read_are_refused(tmp_path):
    path = tmp_path / "t"
    _append(path, 0)
    entry = path / "_delta_log" / f"{1:020d}.json"
    entry.write_text(json.dumps({"add": {
        "path": "part-x.parquet", "partitionValues": {}, "size": 1, "modificationTime": 0,
        "dataChange": True, "deletionVector": {"storageType": "u", "pathOrInlineDv": "x",
                                               "sizeInBytes": 1, "cardinality": 1}}}) + "\n")
    with pytest.raises(UnsupportedTable, match="deletion vector"):
        _replayed(path)
    entry.write_text(json.dumps({"protocol": {"minReaderVersion": 3, "minWriterVersion": 7,
                                              "readerFeatures": ["columnMapping"]}}) + "\n")
    with pytest.raises(UnsupportedTable, match="columnMapping"):
        _replayed(path)


def test_store_tables_read_through_the_replay(tmp_path):
    """`Tables.snapshot` names the same files as deltalake, and a refused feature is one line."""
    tables = Tables(LocalLocation(tmp_path), "tables")
    tables.create_missing()
    tables.append("tags", [{"run_id": "r", "key": "k", "value": "v"}])
    tables.append("tags", [{"run_id": "r", "key": "k", "value": "w"}])
    version, files = tables.snapshot("tags")
    assert (version, {f.rsplit("/", 1)[-1] for f in files}) == _reference(tmp_path / "tables/tags")
    assert all(f.startswith(str(tmp_path / "tables" / "tags") + "/") for f in files)
    assert [rows for _, rows in tables.data_files("tags")] == [1, 1]

    log = tmp_path / "tables" / "tags" / "_delta_log"
    newest = max(log.glob("*.json"))
    newest.write_text(newest.read_text().rstrip() + "\n" + json.dumps(
        {"metaData": {"id": "x", "format": {"provider": "parquet", "options": {}},
                      "schemaString": "{}", "partitionColumns": ["run_id"],
                      "configuration": {}, "createdAt": 0}}) + "\n")
    fresh = Tables(LocalLocation(tmp_path), "tables")
    with pytest.raises(StoreError, match="uses a Delta feature dlstore does not read "
                                         r"\(partition columns\)"):
        fresh.snapshot("tags")
