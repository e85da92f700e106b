"""`dlstore fit scaling` end to end: SQL selection -> fit -> fits table -> figure, on a store whose
final losses follow a known law L(N, D) = E + A/N^alpha + B/D^beta."""

import json

import numpy as np
import pytest

import dlstore
from dlstore.store.writer import StoreWriter
from tests.test_cli import dlstore as run_cli

TRUTH = {"E": 0.5, "A": 30.0, "alpha": 0.4, "B": 80.0, "beta": 0.5}
QUERY = ("SELECT n_params AS N, n_train AS D, value AS loss FROM final "
         "WHERE metric = 'test_loss'")


@pytest.fixture(scope="module")
def law_store(tmp_path_factory):
    """Runs over N x D whose final test_loss is the law times small log-normal noise."""
    root = tmp_path_factory.mktemp("fit") / "store"
    store = dlstore.Store(root, create=True)
    rng = np.random.default_rng(0)
    runs, metrics = [], []
    for n in np.geomspace(1e3, 1e5, 6).round():
        for d in np.geomspace(1e3, 1e5, 5).round():
            run_id = f"law-{int(n)}-{int(d)}"
            law = TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]
            runs.append({"run_id": run_id, "zoo": "law", "status": "complete",
                         "n_params": int(n), "n_train": int(d), "final_step": 10})
            metrics.append({"run_id": run_id, "step": 10, "metric": "test_loss",
                            "tensor": None, "value": law * np.exp(rng.normal(0, 0.01))})
    StoreWriter(store).commit([], metrics, runs)
    return root


def test_two_variable_fit_is_printed_saved_and_plotted(law_store, tmp_path):
    plot = tmp_path / "law.png"
    result = run_cli("fit", "scaling", "--store", str(law_store), "--query", QUERY,
                     "--bootstrap", "50", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert "alpha" in result.stdout and "compute-optimal" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fits = dlstore.open(law_store).sql("SELECT * FROM fits")
    assert fits.height == 1 and fits["kind"][0] == "chinchilla" and fits["n"][0] == 30
    assert fits["query"][0] == QUERY
    params, ci = json.loads(fits["params"][0]), json.loads(fits["ci"][0])
    for name in ("alpha", "beta", "E"):
        assert params[name] == pytest.approx(TRUTH[name], abs=0.05)
        low, high = ci[name]
        assert low <= params[name] <= high


def test_one_variable_fit(law_store, tmp_path):
    query = ("SELECT n_params, avg(value) AS loss FROM final WHERE metric = 'test_loss' "
             "AND n_train = 100000 GROUP BY n_params")
    result = run_cli("fit", "scaling", "--store", str(law_store), "--query", query,
                     "--x", "n_params", "--y", "loss", "--bootstrap", "0",
                     "--plot", str(tmp_path / "one.png"))
    assert result.returncode == 0, result.stderr
    assert "power_law fit of 6 points" in result.stdout
    kinds = dlstore.open(law_store).sql("SELECT kind FROM fits ORDER BY created_at")["kind"]
    assert kinds.to_list()[-1] == "power_law"


@pytest.mark.parametrize("args, message", [
    (["--query", "SELECT 1 AS N"], "missing"),
    (["--query", QUERY + " LIMIT 3"], "N takes 1 distinct value"),
    (["--query", QUERY, "--x", "N"], "both --x and --y"),
])
def test_bad_fit_requests_are_one_line_errors(law_store, args, message):
    result = run_cli("fit", "scaling", "--store", str(law_store), *args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
