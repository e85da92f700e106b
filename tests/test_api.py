"""The Python API as researchers expect it: config as a dict, SQL over their own frames
(replacement scans), pandas on request, the store as a context manager."""

import duckdb
import polars as pl
import pyarrow as pa
import pytest

import dlstore


def test_run_config_is_a_dict(built_store):
    run_id = sorted(built_store.run_ids())[0]
    run = built_store.run(run_id)
    assert isinstance(run["config"], dict) and run["config"]["model"]["width"] == run["width"]
    assert run["tags"] == {}
    assert built_store.load_model(run_id) is not None  # its callers read the dict


def test_sql_sees_the_callers_polars_and_arrow_objects(built_store):
    picked = pl.DataFrame({"run_id": sorted(built_store.run_ids())[:3], "score": [1, 2, 3]})
    joined = built_store.sql("SELECT p.run_id, p.score, r.width FROM runs r "
                             "JOIN picked p USING (run_id) ORDER BY p.score")
    assert joined["score"].to_list() == [1, 2, 3] and joined["width"].null_count() == 0
    as_arrow = pa.table({"w": [8, 16]})  # noqa: F841 - named in the query
    assert built_store.sql("SELECT count(*) AS n FROM runs JOIN as_arrow ON width = w"
                           )["n"][0] == 8
    # a variable named like a view of the store does not shadow it
    runs = pl.DataFrame({"run_id": ["not-a-run"]})
    assert built_store.sql("SELECT count(*) AS n FROM runs")["n"][0] == 8 and runs.height == 1
    # and the frames are gone after the query (deleted here, so that DuckDB's own replacement
    # scan of this frame cannot find them either)
    del picked
    with pytest.raises(duckdb.Error):
        built_store.catalog.con.sql("SELECT * FROM picked")


def test_sql_returns_pandas_on_request(built_store):
    pytest.importorskip("pandas")
    frame = built_store.sql("SELECT run_id, width FROM runs ORDER BY run_id", pandas=True)
    assert type(frame).__module__.startswith("pandas") and len(frame) == 8
    mine = frame.head(2)  # noqa: F841 - named in the query
    assert built_store.sql("SELECT count(*) AS n FROM mine")["n"][0] == 2


def test_store_is_a_context_manager_that_closes(built_store):
    with dlstore.open(built_store.root) as store:
        assert store.sql("SELECT count(*) AS n FROM runs")["n"][0] == 8
    with pytest.raises(duckdb.Error):
        store.catalog.con.sql("SELECT 1")
