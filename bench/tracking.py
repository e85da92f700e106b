"""Logging a training loop's metrics and checkpoints: `Store.track` against MLflow, in one run.

    pip install mlflow            # bench-only
    python bench/tracking.py                          # 1,000 runs x 200 steps x 4 metrics
    python bench/tracking.py --runs 100 --procs 1     # a quick look

The same work both ways: `--runs` runs of `--steps` steps, each step logging 4 metrics, each run
saving `--checkpoints` checkpoints of a ~10k-parameter MLP (40 -> 200 -> 10), logged from one
process and from `--procs` processes at once (the runs split between them). MLflow runs on its
default local backend (SQLite, `mlflow.db`) and gets its fastest path: each run's metrics sent
with `log_batch` (1,000 values a call, MLflow's limit), its parameters with `log_params`, each
checkpoint written with safetensors and logged with `log_artifact`. dlstore's loop calls
`run.log(step, ...)` every step and `run.save(step, model)`, as a user's loop would.

Then the two cross-run questions, each side in a fresh process: "best final test_acc per lr"
(dlstore: one SQL over `final`; MLflow: `search_runs` then a pandas groupby) and "the test_acc
curves of 100 runs" (dlstore: one SQL over `curves`; MLflow: `get_metric_history` per run). Each
is timed twice in that process: the first time (the process's first query: dlstore also reads
the tables' logs and sets up its views then) and again (a session's later queries). Then the
same in a second process, as a later notebook or `dlstore sql` call runs them: dlstore's first
query there loads the runs' state the first process saved instead of computing it.
Prints seconds and values/s of both sides and the ratios; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

LRS = (0.01, 0.03, 0.1, 0.3)


def _model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 200), torch.nn.ReLU(),
                               torch.nn.Linear(200, 10))


def _values(i: int, step: int, steps: int) -> dict[str, float]:
    t = (step + 1) / steps
    return {"train_loss": 2.3 * (1 - t) + 0.01 * (i % 7), "test_loss": 2.4 * (1 - t),
            "train_acc": t, "test_acc": 0.5 * t + 0.001 * (i % 13)}


def _dlstore_worker(gate, root: str, runs: list[int], steps: int, checkpoints: int) -> None:
    import dlstore

    store = dlstore.open(root)
    model = _model()
    every = max(steps // checkpoints, 1)
    gate.wait()  # imports done: every process starts logging at once
    for i in runs:
        with store.track("bench", {"lr": LRS[i % len(LRS)], "seed": i, "width": 200}) as run:
            for step in range(steps):
                run.log(step, **_values(i, step, steps))
                if step % every == every - 1:
                    run.save(step, model)
    store.close()  # what is buffered is appended: the work is done when this returns
    gate.wait()


def _mlflow_worker(gate, uri: str, runs: list[int], steps: int, checkpoints: int,
                   tmp: str) -> None:
    import mlflow
    from mlflow.entities import Metric
    from safetensors.torch import save_file

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("bench").experiment_id
    model = _model()
    every = max(steps // checkpoints, 1)
    gate.wait()
    for i in runs:
        run = client.create_run(experiment)
        client.log_batch(run.info.run_id, params=[
            mlflow.entities.Param(k, str(v)) for k, v in
            {"lr": LRS[i % len(LRS)], "seed": i, "width": 200}.items()])
        metrics = []
        now = int(time.time() * 1000)
        for step in range(steps):
            metrics += [Metric(k, v, now, step) for k, v in _values(i, step, steps).items()]
            if step % every == every - 1:
                path = Path(tmp) / f"ck-{i}-{step}.safetensors"
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
                client.log_artifact(run.info.run_id, str(path))
                path.unlink()
        for start in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000])
        client.set_terminated(run.info.run_id)
    gate.wait()


def _split(runs: int, procs: int) -> list[list[int]]:
    return [list(range(k, runs, procs)) for k in range(procs)]


def _timed(target, args: list[tuple]) -> float:
    """Seconds for spawned processes (one per entry of `args`) to run `target` on their share,
    from when all have imported what they need to when the last has finished."""
    ctx = mp.get_context("spawn")  # deltalake does not survive fork()
    gate = ctx.Barrier(len(args) + 1)
    workers = [ctx.Process(target=target, args=(gate, *a)) for a in args]
    for w in workers:
        w.start()
    gate.wait()
    started = time.perf_counter()
    gate.wait()
    seconds = time.perf_counter() - started
    for w in workers:
        w.join()
        if w.exitcode != 0:
            raise SystemExit(f"a {target.__name__} process failed ({w.exitcode})")
    return seconds


_QUERIES = {
    "dlstore": textwrap.dedent("""
        import sys, time, json, dlstore
        store = dlstore.open(sys.argv[1])
        best = ("SELECT lr, max(value) AS best FROM final WHERE metric = 'test_acc' "
                "GROUP BY lr ORDER BY lr")
        t = time.perf_counter()
        result = store.sql(best)
        best_s = time.perf_counter() - t
        t = time.perf_counter()
        store.sql(best)
        best_again_s = time.perf_counter() - t
        ids = store.sql("SELECT run_id FROM runs ORDER BY run_id LIMIT 100")["run_id"].to_list()
        curves = ("SELECT run_id, step, value FROM curves WHERE metric = 'test_acc' "
                  "AND list_contains(?, run_id)")
        t = time.perf_counter()
        points = store.sql(curves, [ids]).height
        curves_s = time.perf_counter() - t
        t = time.perf_counter()
        store.sql(curves, [ids])
        curves_again_s = time.perf_counter() - t
        print(json.dumps({"best": best_s, "best_again": best_again_s, "curves": curves_s,
                          "curves_again": curves_again_s, "lrs": result.height,
                          "points": points}))
    """),
    "mlflow": textwrap.dedent("""
        import sys, time, json, mlflow
        mlflow.set_tracking_uri(sys.argv[1])
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name("bench").experiment_id
        def best():
            frame = mlflow.search_runs([experiment], max_results=100000)
            return frame, frame.groupby("params.lr")["metrics.test_acc"].max()
        t = time.perf_counter()
        frame, result = best()
        best_s = time.perf_counter() - t
        t = time.perf_counter()
        best()
        best_again_s = time.perf_counter() - t
        ids = sorted(frame["run_id"])[:100]
        def curves():
            return sum(len(client.get_metric_history(r, "test_acc")) for r in ids)
        t = time.perf_counter()
        points = curves()
        curves_s = time.perf_counter() - t
        t = time.perf_counter()
        curves()
        curves_again_s = time.perf_counter() - t
        print(json.dumps({"best": best_s, "best_again": best_again_s, "curves": curves_s,
                          "curves_again": curves_again_s, "lrs": len(result),
                          "points": points}))
    """),
}


def _query(side: str, where: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _QUERIES[side], where], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--procs", default="1,4", help="process counts to log from")
    a = parser.parse_args()
    import mlflow

    import dlstore

    values = a.runs * a.steps * 4
    rows, result = [], {"runs": a.runs, "steps": a.steps, "values": values}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in [int(p) for p in a.procs.split(",")]:
            root = f"{tmp}/dl-{procs}"
            dlstore.open(root, create=True)
            shares = _split(a.runs, procs)
            dl = _timed(_dlstore_worker, [(root, s, a.steps, a.checkpoints) for s in shares])
            uri = f"sqlite:///{tmp}/mlflow-{procs}.db"
            mlflow.set_tracking_uri(uri)
            mlflow.MlflowClient().create_experiment(
                "bench", artifact_location=Path(f"{tmp}/artifacts-{procs}").as_uri())
            ml = _timed(_mlflow_worker, [(uri, s, a.steps, a.checkpoints, tmp)
                                         for s in shares])
            rows.append((f"log, {procs} process{'es' if procs > 1 else ''}", dl, ml))
            result[f"log_{procs}"] = {"dlstore_s": dl, "mlflow_s": ml, "ratio": ml / dl}
            if procs == 1:
                # the first process to query after the logging, then a later one
                first = {side: _query(side, where) for side, where in (("dlstore", root),
                                                                       ("mlflow", uri))}
                later = {side: _query(side, where) for side, where in (("dlstore", root),
                                                                       ("mlflow", uri))}
                for q in (first, later):
                    assert q["dlstore"]["lrs"] == q["mlflow"]["lrs"] and (
                        q["dlstore"]["points"] == q["mlflow"]["points"]), q
                for key, q, what in (("best", first, "best final test_acc per lr"),
                                     ("best", later, "  first query, a later process"),
                                     ("best_again", later, "  the same again"),
                                     ("curves", first, "test_acc curves of 100 runs"),
                                     ("curves", later, "  a later process"),
                                     ("curves_again", later, "  the same again")):
                    label = key + ("_later" if q is later and key in ("best", "curves") else "")
                    rows.append((what, q["dlstore"][key], q["mlflow"][key]))
                    result[label] = {"dlstore_s": q["dlstore"][key], "mlflow_s": q["mlflow"][key],
                                     "ratio": q["mlflow"][key] / q["dlstore"][key]}
    print(f"{a.runs} runs x {a.steps} steps x 4 metrics ({values:,} values), {a.checkpoints} "
          "checkpoints a run, ~10k parameters")
    print(f"{'':32} {'dlstore':>10} {'mlflow':>10} {'ratio':>7}")
    for what, dl, ml in rows:
        print(f"{what:32} {dl:9.3f}s {ml:9.3f}s {ml / dl:6.1f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
