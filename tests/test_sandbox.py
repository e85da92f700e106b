"""The SQL surface only reads the store: every attack is refused in one line, and the store is
unchanged after it (same files, same bytes, verify clean, every run still visible)."""

import hashlib
import shutil
from pathlib import Path

import pytest

from dlstore.errors import QueryError
from dlstore.store.maintenance import verify
from dlstore.store.store import Store


def _fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def attacked(built_store, tmp_path_factory):
    """A copy of the tiny store, and another store whose files a query must not reach."""
    root = tmp_path_factory.mktemp("sandbox") / "s"
    shutil.copytree(built_store.root, root)
    other = tmp_path_factory.mktemp("other") / "s"
    shutil.copytree(built_store.root, other)
    return Store(root), other


def _log(root: Path, table: str = "runs") -> Path:
    return root / "tables" / table / "_delta_log"


WRITES = [
    "COPY (SELECT 1) TO '{root}/tables/runs/_delta_log/00000000000000000099.json'",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{root}/tables/runs/_delta_log/"
    "00000000000000000099.json' (FORMAT json)",
    "explain analyse copy (select 1) to '{root}/x.csv'",
    "EXPLAIN /* c */ ANALYZE -- c\n COPY (SELECT 1) TO '{root}/x.csv'",
    "EXPLAIN (FORMAT json) COPY (SELECT 1) TO '{root}/x.csv'",
    "EXPLAIN ANALYZE CREATE OR REPLACE VIEW runs AS SELECT * FROM runs WHERE false",
    "CREATE OR REPLACE VIEW runs AS SELECT * FROM runs WHERE false",
    "CREATE TABLE t AS SELECT 1",
    "EXPLAIN ANALYZE SET threads = 1",
    "SET enable_external_access = true",
    "RESET enable_external_access",
    "EXPLAIN ANALYZE INSTALL httpfs",
    "INSTALL httpfs",
    "LOAD httpfs",
    "ATTACH '{root}/tables/evil.duckdb'",
    "EXPORT DATABASE '{root}/export'",
    "PRAGMA enable_profiling",
    "CALL pragma_version()",
    "SET VARIABLE x = 1",
    "BEGIN TRANSACTION",
    "SELECT 1; COPY (SELECT 1) TO '{root}/x.csv'",
    "WITH x AS (SELECT 1) INSERT INTO runs SELECT * FROM x",
]
# refused before the check: DuckDB's parser takes neither
UNPARSED = [
    "EXPLAIN EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/x.csv'",
    "SELECT * FROM query('COPY (SELECT 1) TO ''{root}/x.csv''')",
]

READS_OUTSIDE = [
    "SELECT * FROM read_csv('/etc/passwd', sep = ':')",
    "SELECT * FROM read_csv('/etc/shadow')",
    "SELECT * FROM read_text('/proc/self/environ')",
    "SELECT * FROM read_blob('/etc/hostname')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_csv('https://example.com/data.csv')",
    "SELECT * FROM read_parquet('s3://bucket/x.parquet')",
    "SELECT * FROM read_parquet('{other}/tables/runs/*.parquet')",
    "SELECT * FROM read_parquet('{root}/tables/../../other/tables/runs/*.parquet')",
    "SELECT * FROM read_json('{root}/dlstore.json')",
    "SELECT * FROM read_blob('{root}/blobs/**')",
    "EXPLAIN ANALYZE SELECT * FROM read_text('/proc/self/environ')",
]


@pytest.mark.parametrize("attack", WRITES + READS_OUTSIDE + UNPARSED)
def test_attack_is_refused_and_the_store_is_unchanged(attacked, attack):
    store, other = attacked
    root = Path(store.root)
    # a query first: the first query over a snapshot saves the runs' state under cache/
    runs = store.sql("SELECT count(*) AS n FROM runs")["n"][0]
    before = _fingerprint(root)
    with pytest.raises(QueryError) as refused:
        store.sql(attack.format(root=root, other=other))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("Parser Error" if attack in UNPARSED else "refused:"), message
    assert _fingerprint(root) == before
    # the same Store still sees every run, and the store verifies clean
    assert store.sql("SELECT count(*) AS n FROM runs")["n"][0] == runs == 8
    assert Store(root).sql("SELECT count(*) AS n FROM runs")["n"][0] == 8
    assert verify(store).ok


@pytest.mark.parametrize("query", [
    "SELECT count(*) AS n FROM runs",
    "WITH x AS (SELECT * FROM runs) SELECT count(*) AS n FROM x",
    "FROM runs SELECT count(*) AS n",
    "DESCRIBE runs",
    "SUMMARIZE SELECT lr FROM runs",
    "PIVOT (SELECT run_id, metric, value FROM final WHERE tensor IS NULL) ON metric "
    "USING first(value)",
    "EXPLAIN SELECT * FROM runs",
    "EXPLAIN ANALYZE SELECT count(*) FROM metrics",
    "-- a comment first\nSELECT json_extract_string(config, '$.model.arch') AS arch FROM runs",
    "SELECT * FROM read_parquet('{root}/tables/runs/*.parquet')",
])
def test_reads_still_work(attacked, query):
    store, _ = attacked
    frame = store.sql(query.format(root=store.root))
    assert frame.height > 0


def test_refusal_through_the_cli_is_one_line(attacked):
    import subprocess
    import sys

    store, _ = attacked
    result = subprocess.run(
        [sys.executable, "-m", "dlstore.cli", "sql", "--store", str(store.root),
         "EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/dlstore-sandbox-test.csv'"],
        capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: refused:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not Path("/tmp/dlstore-sandbox-test.csv").exists()
