"""A researcher's own architecture, dataset and metric family, from a package outside dlstore
(tests/plugins/dlstore_example_plugin, on the path with its entry points: see conftest)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import dlstore
from dlstore.building.build import build_zoo
from dlstore.building.plan import plan_cohorts
from dlstore.errors import DlstoreError, SpecError
from dlstore.spec import ZooSpec
from dlstore.store.store import Store
from dlstore.store.writer import StoreWriter

ARCH_PATH = "dlstore_example_plugin.nets:ResMLP"

PLUGIN_SPEC = textwrap.dedent("""
    name = "plug"
    seeds = 2
    checkpoints = [0, 20, 40]

    [dataset]
    name = "dlstore_example_plugin.tasks:Parity"   # an import path
    n_samples = 256

    [model]
    arch = "resmlp"                                 # an entry point's name
    width = 8

    [train]
    lr = 0.2
    batch_size = 32
    steps = 40

    [grid]
    model.arch = ["resmlp", "dlstore_example_plugin.nets:ResMLP"]

    [metrics]
    margin = { at = "all" }                         # the plugin's family, by entry point
    neural_collapse = true                          # a built-in family on the plugin's features
""")


class Bare(dlstore.Architecture):
    """An architecture that declares nothing beyond `build`."""

    width: int = 4

    def build(self, input_shape, n_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], self.width), nn.Tanh(),
                             nn.Linear(self.width, n_classes))


def spec_with(model: str, metrics: str = "", extra: str = "") -> str:
    return textwrap.dedent(f"""
        name = "p"
        {extra}
        [dataset]
        name = "parity"
        [model]
        {model}
        [train]
        steps = 4
        batch_size = 16
        [metrics]
        {metrics}
    """)


@pytest.fixture(scope="module")
def plugin_store(tmp_path_factory):
    spec = ZooSpec.from_text(PLUGIN_SPEC)
    store = Store(tmp_path_factory.mktemp("plugin") / "s", create=True)
    report = build_zoo(spec, store, device="cpu")
    assert report.runs_built == len(spec.runs) == 4
    return spec, store


def test_a_plugin_zoo_builds_and_its_runs_and_metrics_are_in_sql(plugin_store):
    spec, store = plugin_store
    runs = store.sql("SELECT run_id, arch, dataset, width FROM runs WHERE zoo = 'plug' "
                     "ORDER BY arch").to_dicts()
    assert {r["arch"] for r in runs} == {"resmlp", ARCH_PATH}
    assert {r["dataset"] for r in runs} == {"dlstore_example_plugin.tasks:Parity"}
    assert all(r["width"] == 8 for r in runs)
    margins = store.sql("SELECT run_id, step, value FROM metrics "
                        "WHERE metric = 'test_margin'").to_dicts()
    assert {(m["run_id"], m["step"]) for m in margins} == {
        (r.run_id, s) for r in spec.runs for s in (0, 20, 40)}
    nc1 = store.sql("SELECT count(*) AS n FROM metrics WHERE metric = 'nc1'").to_dicts()
    assert nc1[0]["n"] == 4  # at the last checkpoint of each run


def test_load_model_rebuilds_the_plugin_module_and_its_test_accuracy(plugin_store):
    spec, store = plugin_store
    final = {r["run_id"]: r["value"] for r in store.sql(
        "SELECT run_id, value FROM final WHERE metric = 'test_acc'").to_dicts()}
    assert len(final) == 4
    for run in spec.runs:
        model = store.load_model(run.run_id)
        assert type(model).__name__ == "ResidualNet"
        data = store.load_dataset(run.run_id)
        with torch.no_grad():
            acc = (model(data["x_test"]).argmax(1) == data["y_test"]).double().mean().item()
        assert acc == pytest.approx(final[run.run_id], abs=1e-9)


def test_both_spellings_train_the_same_network_under_different_ids(plugin_store):
    spec, store = plugin_store
    by_arch = {}
    for run in spec.runs:
        assert run.canonical()["model"] == {"arch": run.model.arch, "width": 8}
        by_arch.setdefault(run.seed, []).append(run.run_id)
    for a, b in by_arch.values():
        assert a != b
        assert torch.equal(store.load_state_dict(a)["head.weight"],
                           store.load_state_dict(b)["head.weight"])


def test_a_plugin_run_id_depends_on_its_options():
    one = ZooSpec.from_text(spec_with('arch = "resmlp"\nwidth = 8')).runs[0].run_id
    two = ZooSpec.from_text(spec_with('arch = "resmlp"\nwidth = 9')).runs[0].run_id
    assert one != two


def test_without_the_plugin_load_model_names_the_module_and_load_state_dict_works(
        plugin_store):
    spec, store = plugin_store
    by_path = next(r.run_id for r in spec.runs if r.model.arch == ARCH_PATH)
    by_name = next(r.run_id for r in spec.runs if r.model.arch == "resmlp")
    script = textwrap.dedent(f"""
        import dlstore
        store = dlstore.open({str(store.root)!r})
        print(sorted(store.load_state_dict({by_path!r})))
        for run_id in ({by_path!r}, {by_name!r}):
            try:
                store.load_model(run_id)
            except dlstore.DlstoreError as e:
                print("ERROR", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, cwd="/").stdout.splitlines()
    assert "head.weight" in out[0]
    errors = [line for line in out if line.startswith("ERROR")]
    assert len(errors) == 2
    assert "cannot import module 'dlstore_example_plugin.nets'" in errors[0]
    assert "pip install it or add its directory to PYTHONPATH" in errors[0]
    assert "'resmlp'" in errors[1] and "pip install it" in errors[1]


def test_an_undeclared_property_is_refused_in_one_line_before_training():
    with pytest.raises(SpecError) as e:
        ZooSpec.from_text(spec_with('arch = "tests.test_plugins:Bare"',
                                    "neural_collapse = true"))
    message = str(e.value)
    assert "\n" not in message
    assert "'tests.test_plugins:Bare'" in message and "features_method" in message
    with pytest.raises(SpecError, match="prunable_tensors"):
        ZooSpec.from_text(spec_with('arch = "tests.test_plugins:Bare"',
                                    extra="[tickets]\nlevels = 1"))
    # without those features the architecture trains (generic kernel, no padding declared)
    assert ZooSpec.from_text(spec_with('arch = "tests.test_plugins:Bare"')).runs


def test_without_declared_padding_each_width_trains_in_its_own_cohort():
    grid = "[grid]\nmodel.width = [4, 8]"
    plugin = ZooSpec.from_text(spec_with(f'arch = "resmlp"\n{grid}'))
    mlp = ZooSpec.from_text(spec_with(f'arch = "mlp"\n{grid}'))
    assert len(plan_cohorts(list(plugin.runs))) == 2
    assert len(plan_cohorts(list(mlp.runs))) == 1


@pytest.mark.parametrize("metrics, message", [
    ("colour = true", "metrics.colour: unknown metric family 'colour'; known: "),
    ('"nope.mod:X" = true', "cannot import module 'nope.mod'"),
    ('margin = { scale = "x" }', "metrics.margin.scale"),
    ('margin = { colour = 1 }', "metrics.margin.colour"),
])
def test_metric_family_errors_name_the_key(metrics, message):
    with pytest.raises(DlstoreError, match=message.replace(".", r"\.")):
        ZooSpec.from_text(spec_with('arch = "mlp"', metrics))


def test_unknown_names_list_the_plugin_among_the_known_ones():
    with pytest.raises(SpecError, match="known: cnn1d, cnn2d, mlp, resmlp, resnet, transformer, "
                                        "or an import path"):
        ZooSpec.from_text(spec_with('arch = "vit"'))
    with pytest.raises(SpecError, match="margin"):
        ZooSpec.from_text(spec_with('arch = "mlp"', "colour = true"))
    with pytest.raises(SpecError, match="is not a subclass of dlstore.Architecture"):
        ZooSpec.from_text(spec_with('arch = "dlstore_example_plugin.tasks:Parity"'))


def test_import_dlstore_does_not_import_torch():
    script = "import sys, dlstore; print('torch' in sys.modules); dlstore.Architecture"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


SPLITS = {"train": 0.5, "test": 0.5}


def test_weight_space_canonical_forms_need_declared_permutation_symmetries(plugin_store):
    from dlstore.analysis.wsl import WeightDataset, WeightSpaceError

    _, store = plugin_store
    query = ("SELECT c.run_id, c.step FROM checkpoints c JOIN runs r USING (run_id) "
             "WHERE r.arch = 'resmlp'")
    with pytest.raises(WeightSpaceError) as e:
        WeightDataset(store, query, features="canonical", splits=SPLITS)
    assert "\n" not in str(e.value)
    assert "'resmlp'" in str(e.value) and "permutation_symmetries" in str(e.value)
    flat = WeightDataset(store, query, features="flat", splits=SPLITS)  # needs no symmetry
    with pytest.raises(WeightSpaceError, match="'resmlp' does not declare"):
        flat.split("train", augment=True)


def test_backfill_adds_a_plugin_family_to_runs_built_without_it(tmp_path):
    from dlstore.metrics.backfill import backfill_checkpoint_metrics, missing_checkpoint_metrics

    base = spec_with('arch = "resmlp"', extra='checkpoints = [0, 4]')
    store = Store(tmp_path / "s", create=True)
    build_zoo(ZooSpec.from_text(base), store, device="cpu")
    measured = ZooSpec.from_text(base + '"dlstore_example_plugin.probes:Margin" = '
                                 '{ at = "all", scale = 2.0 }')
    assert missing_checkpoint_metrics(store, measured.name, measured.runs, measured.metrics) == {
        (measured.runs[0].run_id, 0): {"dlstore_example_plugin.probes:Margin"},
        (measured.runs[0].run_id, 4): {"dlstore_example_plugin.probes:Margin"}}
    assert backfill_checkpoint_metrics(StoreWriter(store), measured.name, measured.runs,
                                       measured.metrics) == 2
    rows = store.sql("SELECT step, value FROM metrics WHERE metric = 'test_margin' "
                     "ORDER BY step").to_dicts()
    assert [r["step"] for r in rows] == [0, 4] and all(r["value"] > 0 for r in rows)
    assert missing_checkpoint_metrics(store, measured.name, measured.runs, measured.metrics) == {}
