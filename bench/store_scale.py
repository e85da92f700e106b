"""How the tables and queries of a store grow with the number of runs, measured side by side.

Writes synthetic stores of 1,000 x SCALE runs (11 checkpoints and 6 metrics per run, like
`zoo/mnist1d-10k.toml`), committed in batches of --runs-per-commit as a build commits them, and
times what a user waits for: opening the store (reading every table's Delta snapshot), a grouped
aggregate over `final`, one run's curve, and one checkpoint lookup (what `load_model` does before
reading the shard). Then compacts the tables and times the same again. With --s3 the smallest
scale is also written to a local S3-compatible server (moto) and queried through it.

    python bench/store_scale.py [--scales 1 10] [--runs-per-commit 100] [--s3]

The last line is JSON. docs/scaling.md projects these figures to 100,000 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dlstore  # noqa: E402
import dlstore.schemas  # noqa: E402
from dlstore.store.maintenance import compact  # noqa: E402

CHECKPOINTS = 11
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "dist_from_init")
QUERIES = {
    "aggregate over final": "SELECT width, lr, avg(value) AS acc, count(*) AS n FROM final "
                            "WHERE metric = 'test_acc' GROUP BY width, lr",
    "one run's curve": "SELECT step, value FROM curves WHERE run_id = ? "
                       "AND metric = 'test_loss' ORDER BY step",
}


def write_synthetic(store: dlstore.Store, n_runs: int, per_commit: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    widths, lrs = np.array([16, 32, 64, 128]), np.array([0.01, 0.03, 0.1, 0.3])
    steps = np.unique(np.geomspace(1, 2000, CHECKPOINTS - 1).astype(int))
    steps = np.concatenate([[0], steps, [2000] * (CHECKPOINTS - 1 - len(steps))])[:CHECKPOINTS]
    for start in range(0, n_runs, per_commit):
        ids = [f"synthetic-{k:012x}" for k in range(start, min(start + per_commit, n_runs))]
        n, commit = len(ids), f"commit{start:08d}"
        run_ids = np.repeat(ids, CHECKPOINTS)
        step = np.tile(steps, n)
        store.tables.append("checkpoints", {
            "run_id": run_ids, "step": step, "epoch": step / 100.0,
            "blob": [f"{(start + k // 40) * 11 + s:064x}" for k in range(n) for s in range(11)],
            "member": np.repeat(np.arange(n) % 40, CHECKPOINTS).astype(np.int32),
            "dtype": ["float32"] * len(step), "n_bytes": np.full(len(step), 10792),
            "commit_id": [commit] * len(step)})
        rows = n * CHECKPOINTS * len(METRICS)
        store.tables.append("metrics", {
            "run_id": np.repeat(run_ids, len(METRICS)), "step": np.repeat(step, len(METRICS)),
            "metric": np.tile(METRICS, n * CHECKPOINTS), "tensor": pa.nulls(rows, pa.string()),
            "value": rng.random(rows), "commit_id": [commit] * rows})
        store.tables.append("runs", _with_nulls("runs", n, {
            "run_id": ids, "zoo": ["synthetic"] * n, "status": ["complete"] * n,
            "arch": ["mlp"] * n, "dataset": ["mnist1d"] * n,
            "width": rng.choice(widths, n), "depth": np.full(n, 2),
            "lr": rng.choice(lrs, n), "seed": np.arange(start, start + n),
            "final_step": np.full(n, steps[-1]), "commit_id": [commit] * n}))


def _with_nulls(table: str, n: int, columns: dict) -> dict:
    """The table's other columns as nulls (what an older store reads for a new column)."""
    schema = dlstore.schemas.TABLES[table]
    return {f.name: columns[f.name] if f.name in columns else pa.nulls(n, f.type)
            for f in schema}


def timed(action, repeat: int = 5) -> tuple[float, float]:
    """(first call, median of the next `repeat`) in milliseconds."""
    t = time.perf_counter()
    action()
    first = (time.perf_counter() - t) * 1e3
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        action()
        times.append((time.perf_counter() - t) * 1e3)
    return first, statistics.median(times)


def measure(root, options: dict | None) -> dict:
    store = dlstore.open(root, storage_options=options)
    run_id = store.sql("SELECT run_id FROM runs LIMIT 1")["run_id"][0]
    result = {"open (ms)": timed(lambda: dlstore.open(root, storage_options=options)
                                 .sql("SELECT 1 AS x FROM runs LIMIT 1"), repeat=3)[1]}
    for name, query in QUERIES.items():
        params = [run_id] if "?" in query else None
        result[f"{name} (ms)"] = timed(lambda q=query, p=params: store.sql(q, p))[1]
    result["checkpoint lookup (ms)"] = timed(lambda: store.checkpoint(run_id))[1]
    listing = store.location.list("tables")
    live = {uri.rsplit("/", 1)[-1] for name in dlstore.schemas.TABLES
            for uri in store.tables.snapshot(name)[1]}
    result["snapshot files"] = len(live)
    result["snapshot MB"] = round(sum(f.size for f in listing
                                      if f.key.rsplit("/", 1)[-1] in live) / 2**20, 1)
    result["log files"] = sum("/_delta_log/" in f.key for f in listing)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--runs-per-commit", type=int, default=100)
    parser.add_argument("--s3", action="store_true", help="also measure the smallest scale on "
                        "a local S3-compatible server (moto[server])")
    args = parser.parse_args()
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DLSTORE_CACHE"] = str(Path(tmp) / "cache")  # object-store copies start cold
        targets = [(scale, "local", str(Path(tmp) / f"x{scale}"), None)
                   for scale in args.scales]
        server = None
        if args.s3:
            from tests.s3server import start_s3_server

            server, options = start_s3_server("bench")
            targets.append((min(args.scales), "s3 (moto)", "s3://bench/store", options))
        try:
            for scale, where, root, options in targets:
                n_runs = 1000 * scale
                store = dlstore.Store(root, create=True, storage_options=options)
                t = time.perf_counter()
                write_synthetic(store, n_runs, args.runs_per_commit)
                written = time.perf_counter() - t
                row = {"runs": n_runs, "metric rows": n_runs * CHECKPOINTS * len(METRICS),
                       "where": where, "write (s)": round(written, 1)}
                row.update({f"{k}": v for k, v in measure(root, options).items()})
                compact(store)
                row.update({f"compacted {k}": v for k, v in measure(root, options).items()})
                report.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if server is not None:
                server.kill()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
