"""`dlstore import-runs`: finished runs from checkpoint files and a metrics file, imported as
tracked runs: idempotent, resumable, and never unpickling arbitrary objects."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import dlstore
from dlstore.importers import runs as importer
from dlstore.store.maintenance import verify


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)}


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "finished"
    a, b = root / "run_a", root / "run_b"
    a.mkdir(parents=True)
    b.mkdir()
    save_file(_state(0), str(a / "step_0.safetensors"))
    save_file(_state(1), str(a / "step_10.safetensors"))
    (a / "metrics.csv").write_text("step,train_loss,test_acc\n0,2.0,0.1\n5,1.0,\n10,0.5,0.9\n")
    (a / "config.json").write_text(json.dumps({"lr": 0.1, "width": 4, "seed": 3}))
    torch.save(_state(2), b / "ckpt-5.pt")
    (b / "metrics.jsonl").write_text('{"step": 0, "loss": 3.0}\n{"step": 5, "loss": 1.5}\n'
                                     '{"step": 5, "val_loss": 1.7}\n')
    return root


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dlstore.cli", *map(str, args)],
                          capture_output=True, text=True)


def test_finished_runs_import_once(source, tmp_path):
    store_path = tmp_path / "s"
    result = _cli("import-runs", source, "--zoo", "old", "--store", store_path)
    assert result.returncode == 0, result.stderr
    assert "2 runs imported (0 already complete): 3 checkpoints, 8 metric values" in result.stdout
    store = dlstore.open(store_path)
    runs = store.sql("SELECT run_id, status, lr, width, seed, final_step FROM runs "
                     "ORDER BY final_step DESC").to_dicts()
    assert [(r["status"], r["lr"], r["width"], r["seed"], r["final_step"]) for r in runs] == [
        ("complete", 0.1, 4, 3, 10), ("complete", None, None, None, 5)]
    a, b = runs[0]["run_id"], runs[1]["run_id"]
    # the empty cell is a missing value; the two step-5 lines of run_b merge
    assert store.sql("SELECT step, metric FROM metrics WHERE run_id = ? AND step = 5",
                     [a]).rows() == [(5, "train_loss")]
    assert sorted(store.sql("SELECT metric FROM metrics WHERE run_id = ? AND step = 5",
                            [b])["metric"]) == ["loss", "val_loss"]
    for run_id, step, seed in ((a, 0, 0), (a, 10, 1), (b, 5, 2)):
        got = store.load_state_dict(run_id, step)
        assert all(torch.equal(got[k], v) for k, v in _state(seed).items())
    assert verify(store).ok
    again = _cli("import-runs", source, "--zoo", "old", "--store", store_path)
    assert "0 runs imported (2 already complete): 0 checkpoints" in again.stdout
    assert dlstore.open(store_path).sql("SELECT count(*) AS n FROM metrics")["n"][0] == 8


def test_an_import_cut_short_resumes_without_duplicates(source, tmp_path, monkeypatch):
    store = dlstore.open(tmp_path / "s", create=True)
    real, calls = importer.read_checkpoint, []

    def failing(path):
        calls.append(path)
        if len(calls) == 4:  # run_a: both files checked, the first saved, then the second
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(importer, "read_checkpoint", failing)
    with pytest.raises(KeyboardInterrupt):
        importer.import_runs(store, source, "old")
    monkeypatch.setattr(importer, "read_checkpoint", real)
    report = importer.import_runs(store, source, "old")
    assert (report.runs, report.skipped) == (2, 0)
    rows = store.sql("SELECT run_id, step, metric, count(*) AS n FROM metrics GROUP BY ALL")
    assert rows.height == 8 and set(rows["n"]) == {1}
    assert store.sql("SELECT count(*) AS n FROM checkpoints")["n"][0] == 3
    assert set(store.sql("SELECT status FROM runs")["status"]) == {"complete"}
    assert verify(store).ok


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_bad_sources_are_one_line_and_create_nothing(tmp_path):
    store_path = tmp_path / "s"
    missing = _cli("import-runs", tmp_path / "nope", "--zoo", "z", "--store", store_path)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "is not a directory" in missing.stderr and not store_path.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _cli("import-runs", empty, "--zoo", "z", "--store", store_path)
    assert "holds no run" in result.stderr and not store_path.exists()

    evil = tmp_path / "evil"
    evil.mkdir()
    with (evil / "step_1.pt").open("wb") as f:
        pickle.dump({"w": _Boom()}, f)
    result = subprocess.run([sys.executable, "-m", "dlstore.cli", "import-runs", str(evil),
                             "--zoo", "z", "--store", str(store_path)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "step_1.pt cannot be read as a checkpoint" in result.stderr
    assert not (tmp_path / "pwned").exists()
    assert dlstore.open(store_path).sql("SELECT count(*) AS n FROM runs")["n"][0] == 0

    for name, text, message in (
            ("nostep", None, "no step in the file name"),
            ("badcsv", "step,loss\n0,1.0\nx,2.0\n", r"metrics.csv line 3: `step` must be an "
                                                   "integer, got 'x'"),
            ("badvalue", "step,loss\n0,high\n", "metrics.csv line 2: loss is 'high', not a "
                                                "number")):
        run = tmp_path / name
        run.mkdir()
        if text is None:
            save_file(_state(0), str(run / "final.safetensors"))
        else:
            (run / "metrics.csv").write_text(text)
        with pytest.raises(importer.RunSourceError, match=message):
            importer.import_runs(dlstore.open(store_path), run, "z")
    assert dlstore.open(store_path).sql("SELECT count(*) AS n FROM runs")["n"][0] == 0
