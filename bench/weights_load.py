"""`Store.weights` against one `torch.load` per checkpoint, on the same checkpoints, in one run.

    python bench/weights_load.py                         # builds a 10,000-checkpoint store
    python bench/weights_load.py --store S --query "SELECT run_id, step FROM checkpoints ..."

Without `--store` (or with a `--store` path that holds no store yet) it builds a zoo of `--runs`
MLPs of `--width` x 2 hidden layers on MNIST-1D, `--checkpoints` checkpoints each (defaults:
1,000 runs x 10 = 10,000 checkpoints of 7.4k parameters), and pulls all of them. The baseline
gets the same checkpoints as one `.pt` state dict per checkpoint (written to a temporary
directory first, not timed) and loads them one file at a time with `torch.load` into the same
[n, d] matrix.

Each side runs in a fresh process (once untimed so that the OS page cache holds both sets of
files, then `--repeats` timed runs; the median is reported): `bulk` is `Store.weights(query)`
including the SQL, the shard lookup and the hash verification of every shard that a fresh
process does once; `bulk, again` is the median of three more pulls in the same process (the
catalog open, the shards verified); `stream` is `Store.iter_weights(query, batch_size)` consumed
batch by batch. Prints GB/s of
weights delivered, the ratio to the baseline and peak memory (the process's peak RSS and its
growth over the RSS before the pull); the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

DEFAULT_QUERY = "SELECT run_id, step FROM checkpoints ORDER BY run_id, step"


def spec_text(runs: int, checkpoints: int, width: int) -> str:
    lrs = [0.002, 0.005, 0.01, 0.02, 0.05]
    seeds = -(-runs // len(lrs))
    steps = 2 * (checkpoints - 1)
    return textwrap.dedent(f"""
        name = "weights-bench"
        seeds = {seeds}
        checkpoints = "every:2"
        [dataset]
        name = "mnist1d"
        [model]
        arch = "mlp"
        width = {width}
        depth = 2
        [train]
        batch_size = 128
        steps = {steps}
        [grid]
        train.lr = {lrs}
    """)


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return status_mb("VmRSS")


def peak_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: a child keeps its parent's high-water mark across
    # exec in ru_maxrss, and the parent has held the whole pull
    return status_mb("VmHWM")


def child(method: str, store_path: str, query: str, files: str, batch_size: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    import dlstore

    before = rss_mb()
    if method == "torch_load":
        paths = Path(files).read_text().split("\n")
        started = time.perf_counter()
        first = torch.load(paths[0], weights_only=True)
        d = sum(v.numel() for v in first.values())
        out = torch.empty((len(paths), d))
        for i, path in enumerate(paths):
            state = torch.load(path, weights_only=True)
            torch.cat([v.reshape(-1) for v in state.values()], out=out[i])
        seconds = time.perf_counter() - started
        n_bytes = out.numel() * out.element_size()
        again = None
    elif method == "bulk":
        store = dlstore.open(store_path)
        started = time.perf_counter()
        out, _ = store.weights(query)
        seconds = time.perf_counter() - started
        n_bytes = out.numel() * out.element_size()
        del out
        warm = []
        for _ in range(3):
            started = time.perf_counter()
            out, _ = store.weights(query)
            warm.append(time.perf_counter() - started)
            del out
        again = statistics.median(warm)
    else:
        store = dlstore.open(store_path)
        started = time.perf_counter()
        n_bytes, total = 0, 0.0
        for _, batch in store.iter_weights(query, batch_size=batch_size):
            n_bytes += batch.numel() * batch.element_size()
            total += float(batch[:, 0].sum())  # touch the batch, as a consumer would
        seconds = time.perf_counter() - started
        again = None
    return {"seconds": seconds, "again": again, "bytes": n_bytes, "rss_before_mb": before,
            "peak_mb": peak_mb()}


def measure(method: str, args, files: Path) -> dict:
    command = [sys.executable, __file__, "--child", method, "--store", str(args.store),
               "--query", args.query, "--files", str(files), "--batch-size", str(args.batch_size)]
    runs = []
    for _ in range(args.repeats + 1):  # the first warms the page cache and is not counted
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    timed = runs[1:]
    seconds = statistics.median(r["seconds"] for r in timed)
    out = {"seconds": seconds, "gb_per_s": timed[0]["bytes"] / seconds / 1e9,
           "bytes": timed[0]["bytes"], "peak_mb": max(r["peak_mb"] for r in timed),
           "pull_mb": max(r["peak_mb"] - r["rss_before_mb"] for r in timed)}
    if timed[0]["again"] is not None:
        again = statistics.median(r["again"] for r in timed)
        out["again_seconds"] = again
        out["again_gb_per_s"] = timed[0]["bytes"] / again / 1e9
    return out


def prepare(args, workdir: Path) -> tuple[int, Path]:
    """Build the store if needed; write the baseline's per-checkpoint files; return (n, list)."""
    import torch

    import dlstore
    from dlstore.building.build import build_zoo
    from dlstore.spec import ZooSpec
    from dlstore.store.store import Store

    if not (Path(args.store) / "dlstore.json").is_file():
        print(f"building {args.runs} runs x {args.checkpoints} checkpoints into {args.store} ...",
              flush=True)
        started = time.perf_counter()
        spec = ZooSpec.from_text(spec_text(args.runs, args.checkpoints, args.width))
        build_zoo(spec, Store(args.store, create=True), device="cpu")
        print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
    store = dlstore.open(args.store)
    weights, layout = store.weights(args.query)
    paths = []
    for i, row in enumerate(weights):
        path = workdir / f"{i:06d}.pt"
        torch.save({k: v.clone() for k, v in layout.unflatten(row).items()}, path)
        paths.append(str(path))
    listing = workdir / "files.txt"
    listing.write_text("\n".join(paths))
    return weights.shape[0], listing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="store to pull from (built if absent)")
    parser.add_argument("--query", default=DEFAULT_QUERY)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per streamed batch")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--files", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.store, args.query, args.files, args.batch_size)))
        return
    with tempfile.TemporaryDirectory(prefix="dlstore-weights-bench-") as tmp:
        workdir = Path(tmp)
        if args.store is None:
            args.store = str(workdir / "store")
        files_dir = workdir / "pt"
        files_dir.mkdir()
        n, listing = prepare(args, files_dir)
        results = {m: measure(m, args, listing) for m in ("torch_load", "bulk", "stream")}
    base = results["torch_load"]
    print(f"{n} checkpoints, {base['bytes'] / 1e6:.1f} MB of float32 weights")
    rows = [("torch.load per file", base), ("Store.weights", results["bulk"]),
            (f"Store.iter_weights ({args.batch_size}/batch)", results["stream"])]
    for name, r in rows:
        print(f"  {name:32s} {r['seconds']:7.3f} s  {r['gb_per_s']:6.3f} GB/s  "
              f"x{r['gb_per_s'] / base['gb_per_s']:6.1f}  peak RSS {r['peak_mb']:6.0f} MB "
              f"(+{r['pull_mb']:.0f} MB for the pull)")
    bulk = results["bulk"]
    print(f"  {'Store.weights, again':32s} {bulk['again_seconds']:7.3f} s  "
          f"{bulk['again_gb_per_s']:6.3f} GB/s  (same process: shards already verified)")
    print(json.dumps({"checkpoints": n, "bytes": base["bytes"],
                      "ratio": bulk["gb_per_s"] / base["gb_per_s"], **{
                          name: results[name] for name in results}}))


if __name__ == "__main__":
    main()
