"""The phase protocol: a tickets zoo builds with --shard and --backend ray, through the same
`Experiment` calls as a plain zoo, and gives the runs, masks and weights of a local build."""

import pytest

import dlstore
from dlstore.building.build import build_zoo
from dlstore.experiments.base import Experiment, experiment_for
from dlstore.experiments.tickets import Tickets
from tests.test_distributed import _assert_same_build, ray_instance  # noqa: F401 - a fixture
from tests.test_tickets import TICKET_SPEC, tickets_spec

TWO_SEEDS = TICKET_SPEC.replace("seeds = 1", "seeds = 2")


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    store = dlstore.Store(tmp_path_factory.mktemp("whole") / "s", create=True)
    build_zoo(tickets_spec(text=TWO_SEEDS), store, device="cpu")
    return store


def _masks(store):
    return store.sql("SELECT mask_id, run_id, level, density, tensor_densities FROM masks "
                     "ORDER BY mask_id")


def test_a_spec_says_which_experiment_it_is():
    spec = tickets_spec(text=TWO_SEEDS)
    assert isinstance(experiment_for(spec), Tickets)
    plain = dlstore.spec.ZooSpec.from_text(TICKET_SPEC.split("[tickets]")[0])
    assert type(experiment_for(plain)) is Experiment
    assert experiment_for(plain).phases() == [list(plain.runs)]


def test_tickets_shards_hold_whole_lineages():
    """Each shard is a block of dense runs with every run derived from them, so shards never
    read each other's runs; together they are the zoo, each run once."""
    experiment = Tickets(tickets_spec(text=TWO_SEEDS))
    whole = experiment.phases()
    parts = [experiment.phases((i, 2)) for i in range(2)]
    for level in range(len(whole)):
        ids = [r.run_id for part in parts for r in part[level]]
        assert sorted(ids) == sorted(r.run_id for r in whole[level])
    for part in parts:
        mine = {r.run_id for phase in part for r in phase}
        for phase in part:
            for run in phase:
                for source in (run.dense_run_id, run.prune_from, run.parent_run_id,
                               run.sibling_of) if hasattr(run, "dense_run_id") else ():
                    assert source is None or source in mine, (run.run_id, source)
    # contiguous blocks of the dense runs (the spec's, then the target condition's): the parts
    # differ in size, as the spec's own dense runs carry the transfers
    assert [len(part[0]) for part in parts] == [2, 2]
    assert sum(map(len, parts[0])) + sum(map(len, parts[1])) == experiment.zoo_runs()


def test_a_sharded_tickets_build_equals_the_whole(tmp_path, whole):
    spec = tickets_spec(text=TWO_SEEDS)
    store = dlstore.Store(tmp_path / "sharded", create=True)
    built = [build_zoo(spec, store, device="cpu", shard=(i, 2)).runs_built for i in range(2)]
    assert built == [sum(map(len, Tickets(spec).phases((i, 2)))) for i in range(2)]
    # the cohorts of a shard hold half the members: equal to float rounding, not bit for bit
    _assert_same_build(store, whole, exact=False)
    assert _masks(store).drop("density", "tensor_densities").equals(
        _masks(whole).drop("density", "tensor_densities"))
    stability = "SELECT group_id, metric FROM group_metrics ORDER BY ALL"
    assert store.sql(stability).equals(whole.sql(stability))


@pytest.mark.slow  # a Ray build is also in the default run: tests/test_distributed.py
def test_a_ray_tickets_build_equals_the_local_build(ray_instance, tmp_path, whole):  # noqa: F811
    """Each cohort of each level a Ray task that reads the previous level's masks and rewind
    weights from the store itself: bit for bit the local build (the same cohorts)."""
    store = dlstore.Store(tmp_path / "ray", create=True)
    report = build_zoo(tickets_spec(text=TWO_SEEDS), store, device="cpu", backend="ray")
    assert report.runs_built == report.runs_total
    _assert_same_build(store, whole)
    assert _masks(store).equals(_masks(whole))
