import textwrap

import pytest

from dlstore.errors import SpecError
from dlstore.spec import ZooSpec, checkpoint_steps

BASE = """
name = "t"
[dataset]
name = "gaussian_mixture"
[model]
arch = "mlp"
[train]
epochs = 2
"""


def spec(tables: str = "", top: str = "", base: str = BASE) -> ZooSpec:
    """`base` with top-level keys `top` inserted before its tables and `tables` appended."""
    head, _, rest = textwrap.dedent(base).partition("[dataset]")
    return ZooSpec.from_text(head + textwrap.dedent(top) + "\n[dataset]" + rest
                             + textwrap.dedent(tables))


def test_grid_is_cartesian_product_times_seeds():
    s = spec(top="seeds = [3, 4]", tables="""
        [grid]
        model.width = [8, 16, 32]
        "train.lr" = [0.1, 0.01]
    """)
    assert len(s.runs) == 12
    combos = {(r.model.width, r.train.lr, r.seed) for r in s.runs}
    assert combos == {(w, lr, sd) for w in (8, 16, 32) for lr in (0.1, 0.01) for sd in (3, 4)}
    assert len({r.run_id for r in s.runs}) == 12
    assert all(r.run_id.startswith("t-") for r in s.runs)


def test_seeds_count_means_range():
    assert [r.seed for r in spec(top="seeds = 3").runs] == [0, 1, 2]


@pytest.mark.parametrize("top, tables", [
    ("seeds = 10000000000", ""),
    ("seeds = 400000", "[grid]\nmodel.width = [8, 16, 32]"),
])
def test_a_spec_of_too_many_runs_is_refused_before_expansion(top, tables):
    with pytest.raises(SpecError, match="more than the 1,000,000"):
        spec(top=top, tables=tables)


def test_run_ids_are_stable_across_versions():
    """Guards the store format: these ids must never change for this spec. If this test fails,
    existing stores would see their runs renamed; add new options with no-op defaults instead."""
    s = spec(top="seeds = 2", tables="""
        [grid]
        model.width = [8, 16]
    """)
    assert [r.run_id for r in s.runs] == [
        "t-639129540a1e", "t-f2824e92ada4", "t-b38095af4d37", "t-2c65da730195"]


def test_run_id_leaves_defaults_out_and_depends_on_zoo_name():
    explicit = spec(base=BASE.replace('arch = "mlp"', 'arch = "mlp"\nwidth = 64'))
    assert explicit.runs[0].run_id == spec().runs[0].run_id  # 64 is the default width
    renamed = spec(base=BASE.replace('name = "t"', 'name = "u"'))
    assert renamed.runs[0].run_id.removeprefix("u-") != spec().runs[0].run_id.removeprefix("t-")
    other = spec(base=BASE.replace("epochs = 2", "epochs = 3"))
    assert other.runs[0].run_id != spec().runs[0].run_id


@pytest.mark.parametrize("top, tables, field", [
    ("colour = 1", "", "colour"),
    ("", "[build]\ncohort = 3", "build.cohort"),
    ("", "[grid]\ntrain.lrr = [1.0]", "grid.train.lrr"),
    ("", "[grid]\ntrain.lr = 0.1", "grid.train.lr"),
    ("", "[grid]\ntrain.lr = [-1.0]", "grid.train.lr"),
    ("", "[grid]\nseeds = [1, 2]", "grid.seeds"),
    ('checkpoints = "lin:4"', "", "checkpoints"),
    ("seeds = 0", "", "seeds"),
    ("", "[dataset.extra]\nx = 1", "dataset.extra"),
])
def test_bad_fields_are_named(top, tables, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        spec(tables, top)


@pytest.mark.parametrize("old, new, field", [
    ('name = "gaussian_mixture"', 'name = "imagenet"', "dataset.name"),
    ('name = "gaussian_mixture"', 'name = "gaussian_mixture"\nn_tran = 5', "dataset.n_tran"),
    ('arch = "mlp"', 'arch = "vit"', "model.arch"),
    ('arch = "mlp"', 'arch = "mlp"\nwidth = "wide"', "model.width"),
    ("epochs = 2", "epochs = 2\nlr = 0", "train.lr"),
    ("epochs = 2", "epochs = 2\noptimizer = \"rmsprop\"", "train.optimizer"),
    ("epochs = 2", "epochs = 2\nsteps = 4", "train"),
    ("epochs = 2", "epochs = 2\noptimizer = \"adam\"\nmomentum = 0.5", "train"),
    ('name = "t"', 'name = "no spaces"', "name"),
])
def test_bad_section_values_are_named(old, new, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        spec(base=BASE.replace(old, new))


def test_list_in_a_field_points_to_grid():
    with pytest.raises(SpecError, match="train.lr"):
        spec(base=BASE.replace("epochs = 2", "epochs = 2\nlr = [0.1, 0.2]"))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not valid TOML"):
        ZooSpec.from_text("name = ")
    with pytest.raises(SpecError, match="not found"):
        ZooSpec.from_toml(tmp_path / "nope.toml")


def test_duplicate_grid_values_are_refused():
    with pytest.raises(SpecError, match="same run"):
        spec("[grid]\nmodel.width = [8, 8]")


def test_checkpoint_schedules():
    assert checkpoint_steps("every:25", 100) == [0, 25, 50, 75, 100]
    assert checkpoint_steps("every:30", 100) == [0, 30, 60, 90, 100]
    log = checkpoint_steps("log:6", 1000)
    assert len(log) == 6 and log[0] == 0 and log[1] == 1 and log[-1] == 1000
    ratios = [b / a for a, b in zip(log[1:], log[2:])]
    assert max(ratios) / min(ratios) < 1.5  # evenly spaced in log
    assert checkpoint_steps("log:10", 5) == [0, 1, 2, 3, 4, 5]  # fewer steps than asked
    assert checkpoint_steps([10, 0, 5], 10) == [0, 5, 10]
    with pytest.raises(SpecError, match="past the last step"):
        checkpoint_steps([0, 11], 10)
