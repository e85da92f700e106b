"""A user's own training loop logged into the store (`Store.track`): the same tables, views and
loaders as a built zoo; crashes, concurrent writers, resumption and bad input."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import dlstore
from dlstore.architectures.registry import parse_arch_options
from dlstore.errors import DataMismatchError, NotFoundError
from dlstore.store.maintenance import verify
from dlstore.store.tracking import TrackingError
from dlstore.store.writer import StoreWriter

MLP_CONFIG = {"lr": 0.05, "width": 8, "seed": 0, "optimizer": "sgd",
              "model": {"arch": "mlp", "width": 8, "depth": 1}, "input_shape": [6],
              "n_classes": 3}


def _task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def _train(store, config, steps=30, save_every=10, zoo="mine", model=None, **track):
    """A plain loop of the user's: SGD on a tiny task, logged every step."""
    torch.manual_seed(config.get("seed", 0))
    x, y = _task()
    if model is None:  # the config names a registered architecture: build it from there
        model = parse_arch_options(config["model"]).build((6,), 3)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    with store.track(zoo, config, **track) as run:
        for step in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                acc = (model(x).argmax(1) == y).float().mean().item()
            run.log(step, train_loss=loss.item(), test_acc=acc)
            if step % save_every == save_every - 1:
                run.save(step, model)
    return run, model


def _steps(store, table: str) -> list[int]:
    return store.sql(f"SELECT step FROM {table} ORDER BY step")["step"].to_list()


@pytest.fixture
def store(tmp_path):
    return dlstore.open(tmp_path / "s", create=True)


def test_a_tracked_run_is_a_run_like_any_other(store):
    run, model = _train(store, MLP_CONFIG)
    row = store.sql("SELECT status, zoo, lr, width, seed, optimizer, arch, final_step, error, "
                    "json_extract(config, '$.model.depth')::INT AS depth FROM runs").to_dicts()
    assert row == [{"status": "complete", "zoo": "mine", "lr": 0.05, "width": 8, "seed": 0,
                    "optimizer": "sgd", "arch": "mlp", "final_step": 29, "error": None,
                    "depth": 1}]
    assert store.sql("SELECT count(*) AS n FROM metrics")["n"][0] == 60
    final = dict(store.sql("SELECT metric, value FROM final").iter_rows())
    assert set(final) == {"train_loss", "test_acc"}
    assert _steps(store, "checkpoints") == [9, 19, 29]
    # the config names a registered architecture: load_model rebuilds it with the last weights
    rebuilt = store.load_model(run.id)
    x, _ = _task()
    torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)
    weights, layout = store.weights("SELECT run_id, step FROM checkpoints")
    assert weights.shape == (3, sum(p.numel() for p in model.parameters()))
    assert verify(store).ok


def test_a_network_dlstore_cannot_build_loads_into_the_users_module(store):
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    config = {"lr": 0.1, "seed": 1}
    run, model = _train(store, config, model=Mine())
    with pytest.raises(NotFoundError, match="records no architecture.*module=MyNet"):
        store.load_model(run.id)
    mine = store.load_model(run.id, module=Mine())
    x, _ = _task()
    torch.testing.assert_close(mine(x), model.eval()(x), rtol=0, atol=0)
    with pytest.raises(DataMismatchError, match="do not fit the module given"):
        store.load_model(run.id, module=nn.Linear(6, 3))
    assert store.load_state_dict(run.id, 9).keys() == model.state_dict().keys()


def test_an_exception_marks_the_run_failed_and_keeps_what_it_logged(store):
    with pytest.raises(ZeroDivisionError):
        with store.track("mine", {"seed": 0}) as run:
            run.log(0, loss=1.0)
            run.log(1, loss=0.5)
            raise ZeroDivisionError("division by zero")
    row = store.sql("SELECT status, error, final_step FROM runs").to_dicts()[0]
    assert row == {"status": "failed", "error": "ZeroDivisionError: division by zero",
                   "final_step": 1}
    assert store.sql("SELECT count(*) AS n FROM metrics")["n"][0] == 2


def test_a_run_whose_heartbeat_stopped_shows_as_died(store):
    """The rule of the runs view, on a run whose last update is older than the stale age."""
    writer = StoreWriter(store)
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    writer.append_runs([{"run_id": "gone", "zoo": "z", "status": "running", "config": "{}",
                         "commit_id": "c", "created_at": old}])
    writer.append_rows("run_updates", [{"run_id": "gone", "status": "running",
                                        "final_step": 3, "created_at": old}])
    with store.track("z", {"seed": 5}) as run:
        run.log(0, loss=1.0)
        run.flush()
        status = dict(store.sql("SELECT run_id, status FROM runs").iter_rows())
        assert status == {"gone": "died", run.id: "running"}
    assert dict(store.sql("SELECT run_id, status FROM runs").iter_rows())[run.id] == "complete"


_KILLED = textwrap.dedent("""
    import sys, time, dlstore
    store = dlstore.open(sys.argv[1], create=True)
    run = store.track("crash", {"seed": 0}, flush_every=0.2)
    step = 0
    while True:
        run.log(step, loss=1.0 / (step + 1))
        if step == 20:
            print("flushed", flush=True)
        step += 1
        time.sleep(0.01)
""")


def test_sigkill_loses_only_the_last_rows_and_the_run_resumes(store, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(store.root)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "flushed"
    time.sleep(1.0)  # several flushes of 0.2 s
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert verify(store).ok
    rows = _steps(store, "metrics")
    assert rows == list(range(len(rows))) and len(rows) >= 20  # a prefix, nothing torn
    run_id = store.sql("SELECT run_id FROM runs")["run_id"][0]
    # the restarted loop replays from step 0: steps the store holds are not logged twice
    with pytest.raises(TrackingError, match="already in the store.*resume=True"):
        store.track("crash", {"seed": 0})
    with store.track("crash", {"seed": 0}, resume=True) as run:
        assert run.id == run_id
        for step in range(len(rows) + 10):
            run.log(step, loss=1.0 / (step + 1))
    steps = _steps(store, "metrics")
    assert steps == list(range(len(rows) + 10))
    assert store.sql("SELECT status FROM runs")["status"][0] == "complete"


_WRITER = textwrap.dedent("""
    import sys, dlstore, torch
    store = dlstore.open(sys.argv[1], create=True)
    i = int(sys.argv[2])
    net = torch.nn.Linear(4, 2)
    with store.track("array", {"seed": i, "lr": 0.01 * (i + 1)}, flush_every=0.2,
                     flush_rows=25) as run:
        for step in range(60):
            run.log(step, loss=float(i * 1000 + step), acc=0.5)
            if step % 20 == 19:
                run.save(step, net)
""")


def _many_writers(root, n):
    dlstore.open(root, create=True)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(i)],
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    store = dlstore.open(root)
    runs = store.sql("SELECT seed, status FROM runs ORDER BY seed").to_dicts()
    assert runs == [{"seed": i, "status": "complete"} for i in range(n)]
    counts = store.sql("SELECT r.seed, count(*) AS n, count(DISTINCT m.step) AS steps, "
                       "bool_and(m.value = r.seed * 1000 + m.step) AS mine FROM metrics m "
                       "JOIN runs r USING (run_id) WHERE metric = 'loss' GROUP BY 1 ORDER BY 1"
                       ).to_dicts()
    assert counts == [{"seed": i, "n": 60, "steps": 60, "mine": True} for i in range(n)]
    assert store.sql("SELECT count(*) AS n FROM checkpoints")["n"][0] == 3 * n
    assert verify(store).ok


def test_eight_processes_log_into_one_store_at_once(tmp_path):
    _many_writers(tmp_path / "s", 8)


@pytest.mark.slow
def test_thirty_two_processes_log_into_one_store_at_once(tmp_path):
    _many_writers(tmp_path / "s", 32)


def test_bad_input_is_one_line_and_writes_nothing(store):
    with pytest.raises(TrackingError, match="not JSON-serialisable"):
        store.track("mine", {"model": object()})
    assert store.sql("SELECT count(*) AS n FROM runs")["n"][0] == 0
    run = store.track("mine", {"seed": 0})
    run.log(3, loss=1.0)
    with pytest.raises(TrackingError, match="loss is already logged at step 3; steps go forward"):
        run.log(2, loss=0.5)
    with pytest.raises(TrackingError, match="'step' is a column of the views"):
        run.log(4, step=1.0)
    with pytest.raises(TrackingError, match="step must be an int >= 0"):
        run.log(-1, loss=1.0)
    with pytest.raises(TrackingError, match="not a number"):
        run.log(5, loss="high")
    with pytest.warns(UserWarning, match="loss at step 6 is nan; stored as nan"):
        run.log(6, loss=float("nan"))
    run.save(6, nn.Linear(3, 2))
    with pytest.raises(TrackingError, match="differs from the run's earlier checkpoints at "
                                            r"'weight' \(\(2, 3\) -> \(2, 4\)\)"):
        run.save(7, nn.Linear(4, 2))
    with pytest.raises(TrackingError, match="a torch.nn.Module or a state dict"):
        run.save(8, {"w": [1, 2]})
    run.close()
    with pytest.raises(TrackingError, match="is closed"):
        run.log(9, loss=1.0)
    values = store.sql("SELECT step, value FROM metrics ORDER BY step").rows()
    assert values[0] == (3, 1.0) and values[1][0] == 6 and values[1][1] != values[1][1]  # NaN
    assert _steps(store, "checkpoints") == [6]
    assert verify(store).ok


def test_config_values_land_in_typed_columns_only_when_they_fit(store):
    with store.track("mine", {"lr": 1, "width": "wide", "seed": True, "note": "x"}) as run:
        run.log(0, loss=1.0)
    row = store.sql("SELECT lr, width, seed, config FROM runs").to_dicts()[0]
    assert (row["lr"], row["width"], row["seed"]) == (1.0, None, None)
    assert json.loads(row["config"]) == {"lr": 1, "width": "wide", "seed": True, "note": "x"}
    store.set_tags(run.id, {"note": "rerun of seed 3"})
    assert store.sql("SELECT tags['note'] AS n FROM runs")["n"][0] == "rerun of seed 3"
