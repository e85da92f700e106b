"""Importing a Small-CNN-Zoo-sized zoo, and pulling it back, in one run:

    python bench/import_speed.py                      # 10,000 checkpoints: 1,000 models x 10
    python bench/import_speed.py --models 200 --steps 5

Writes the published layout of the Small CNN Zoo (Unterthiner et al. 2020) under a temporary
directory: `weights.npy` [n, 4970] float32 in TensorFlow's kernel order, `metrics.csv` (modeldir,
step, config.*, four metrics per checkpoint), `layout.csv`. Then times

- `import`: `dlstore.importers.import_zoo(store, "unterthiner", ...)` into a new store
  (transposing every kernel, one cohort shard per step per batch, rows committed per batch);
- `weights`: `Store.weights` of every imported checkpoint, [n, 4970];
- `npy`: reading the same matrix with `np.load` (the source's own loader), for the ratio.

Prints seconds, checkpoints per second and the ratio weights / npy; the last line is JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import dlstore
from dlstore.importers import import_zoo

LAYOUT = [("sequential/conv2d/kernel:0", (3, 3, 1, 16)), ("sequential/conv2d/bias:0", (16,)),
          ("sequential/conv2d_1/kernel:0", (3, 3, 16, 16)), ("sequential/conv2d_1/bias:0", (16,)),
          ("sequential/conv2d_2/kernel:0", (3, 3, 16, 16)), ("sequential/conv2d_2/bias:0", (16,)),
          ("sequential/dense/kernel:0", (16, 10)), ("sequential/dense/bias:0", (10,))]


def write_source(root: Path, models: int, steps: int, seed: int = 0) -> int:
    root.mkdir(parents=True)
    d = sum(int(np.prod(s)) for _, s in LAYOUT)
    n = models * steps
    weights = np.lib.format.open_memmap(root / "weights.npy", mode="w+", dtype=np.float32,
                                        shape=(n, d))
    rng = np.random.default_rng(seed)
    for start in range(0, n, 1000):
        stop = min(n, start + 1000)
        weights[start:stop] = rng.standard_normal((stop - start, d), dtype=np.float32)
    weights.flush()
    with open(root / "layout.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["varname", "start_idx", "end_idx", "size", "shape"])
        start = 0
        for name, shape in LAYOUT:
            size = int(np.prod(shape))
            w.writerow([name, start, start + size, size, str(shape)])
            start += size
    with open(root / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "modeldir", "step", "config.activation", "config.dataset",
                    "config.learning_rate", "config.l2reg", "config.optimizer",
                    "test_accuracy", "test_loss", "train_accuracy", "train_loss"])
        for m in range(models):
            for k in range(steps):
                acc = rng.uniform(0.1, 0.99)
                w.writerow([m * steps + k, f"{m}", k * 100, "relu", "mnist",
                            float(rng.choice([1e-3, 1e-2, 1e-1])), 1e-4, "adam",
                            round(acc, 4), round(2.3 * (1 - acc), 4), round(acc + 0.01, 4),
                            round(2.2 * (1 - acc), 4)])
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write source and store (default: a temporary directory)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        n = write_source(base / "sczoo", args.models, args.steps)
        store = dlstore.open(base / "store", create=True)
        t = time.perf_counter()
        report = import_zoo(store, "unterthiner", base / "sczoo", zoo="sczoo")
        import_s = time.perf_counter() - t
        assert report.checkpoints == n and not report.errors
        keys = "SELECT run_id, step FROM checkpoints ORDER BY run_id, step"
        t = time.perf_counter()
        w, _ = store.weights(keys)
        weights_s = time.perf_counter() - t
        assert tuple(w.shape) == (n, 4970)
        t = time.perf_counter()
        npy = np.load(base / "sczoo" / "weights.npy")
        npy_s = time.perf_counter() - t
        assert npy.shape == (n, 4970)
        shards = len(list((base / "store" / "blobs").rglob("*.safetensors")))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"import: {n:,} checkpoints of {args.models:,} models in {import_s:.1f} s "
          f"({n / import_s:,.0f} checkpoints/s), {shards} shards")
    print(f"Store.weights: [{n:,}, 4970] in {weights_s:.2f} s; np.load of weights.npy "
          f"{npy_s:.2f} s (ratio {weights_s / npy_s:.1f}x)")
    print(json.dumps({"checkpoints": n, "models": args.models, "import_s": round(import_s, 2),
                      "weights_s": round(weights_s, 3), "npy_s": round(npy_s, 3),
                      "shards": shards}))


if __name__ == "__main__":
    main()
