"""The quickstart zoo as shipped: it builds, learns, and its checkpoints reproduce its metrics."""

from pathlib import Path

import pytest
import torch

import dlstore
from dlstore.building.build import build_zoo
from dlstore.spec import ZooSpec

SPEC = Path(__file__).parent.parent / "zoo" / "quickstart.toml"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    store = dlstore.Store(tmp_path_factory.mktemp("qs") / "store", create=True)
    spec = ZooSpec.from_toml(SPEC)
    build_zoo(spec, store, device="cpu")
    return spec, store


def test_quickstart_covers_the_grid(quickstart):
    spec, store = quickstart
    grid = store.sql("SELECT count(DISTINCT width) AS w, count(DISTINCT lr) AS lr, "
                     "count(DISTINCT seed) AS s, count(*) AS n FROM runs WHERE dataset = 'mnist1d'")
    assert grid.row(0, named=True) == {"w": 3, "lr": 3, "s": 2, "n": len(spec.runs)}


def test_quickstart_best_run_learns_mnist1d(quickstart):
    _, store = quickstart
    best = store.sql("SELECT run_id, value FROM final WHERE metric = 'test_acc' "
                     "ORDER BY value DESC LIMIT 1").row(0)
    assert best[1] > 0.5  # chance is 0.1


def test_every_loaded_model_reproduces_its_stored_test_accuracy(quickstart):
    _, store = quickstart
    final = store.sql("SELECT run_id, value FROM final WHERE metric = 'test_acc'")
    for run_id, stored in final.iter_rows():
        data = store.load_dataset(run_id)
        with torch.no_grad():
            predicted = store.load_model(run_id)(data["x_test"]).argmax(1)
        assert (predicted == data["y_test"]).double().mean().item() == pytest.approx(stored,
                                                                                    abs=1e-12)
