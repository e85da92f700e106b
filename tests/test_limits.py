"""Specs that would exhaust memory or never end are one-line errors before anything is
allocated; the sizes behind that check, and the dry run's estimates, match what is built."""

import pytest

from dlstore.architectures.base import Architecture
from dlstore.architectures.registry import parse_arch_options
from dlstore.building.plan import plan_build
from dlstore.errors import SpecError
from dlstore.spec import ZooSpec
from tests.conftest import TINY_SPEC


@pytest.mark.parametrize("raw, input_shape, n_classes", [
    ({"arch": "mlp", "width": 7, "depth": 3}, (40,), 10),
    ({"arch": "mlp", "width": 5, "depth": 0}, (1, 8, 8), 10),
    ({"arch": "mlp", "width": 5, "depth": 1}, (3,), 4),
    ({"arch": "cnn1d", "width": 6, "depth": 3, "kernel": 5}, (40,), 10),
    ({"arch": "cnn1d", "width": 4, "depth": 2, "kernel": 4}, (3, 17), 5),
    ({"arch": "cnn1d", "width": 4, "depth": 9, "kernel": 9}, (3,), 5),  # length reaches 1
    ({"arch": "cnn1d", "width": 3, "depth": 12, "kernel": 2}, (2, 40), 5),  # even kernel
])
def test_counted_sizes_match_the_built_network(raw, input_shape, n_classes):
    options = parse_arch_options(raw)
    counted = options.size(input_shape, n_classes)
    built = Architecture.size(options, input_shape, n_classes)  # the module, built and run
    assert (counted.params, counted.activations) == (built.params, built.activations)


def _spec(old: str, new: str, text: str = TINY_SPEC) -> ZooSpec:
    assert old in text
    return ZooSpec.from_text(text.replace(old, new))


@pytest.mark.parametrize("old, new, named", [
    ("[8, 16]", "[8, 100000000000]", "mlp width 100,000,000,000"),
    ("depth = 1", "depth = 1000000000000", "depth 1,000,000,000,000"),
    ('arch = "mlp"\ndepth = 1', 'arch = "cnn1d"\nwidth = 2\ndepth = 1\nkernel = 10000000000000',
     "kernel 10,000,000,000,000"),
    ("n_samples = 600", "n_samples = 600\ndim = 10000000000000", "600 examples of 10,000,000"),
    ("n_samples = 600", "n_samples = 600\nn_classes = 10000000000000", "gaussian_mixture"),
    ("n_samples = 600", "n_samples = 10000000000000", "10,000,000,000,000 examples"),
    ('name = "gaussian_mixture"\nn_samples = 600', 'name = "modular"\np = 10000000',
     "modular"),
    ('name = "gaussian_mixture"\nn_samples = 600', 'name = "mnist1d"\nnum_samples = 1e13',
     "mnist1d"),
])
def test_specs_larger_than_memory_fail_before_anything_is_allocated(old, new, named):
    spec = _spec(old, new)
    with pytest.raises(SpecError) as e:
        plan_build(spec, "cpu")
    message = str(e.value)
    assert named in message and "this machine has" in message and "B" in message
    assert "\n" not in message and len(message) < 400


def test_an_explicit_cohort_size_counts_every_member():
    fits = TINY_SPEC.replace("depth = 1", "depth = 1\nwidth = 100000").replace(
        "model.width = [8, 16]\n", "")
    plan_build(ZooSpec.from_text(fits), "cpu")  # ~0.1 GB a member: fits anywhere
    many = ZooSpec.from_text(fits.replace("seeds = 2", "seeds = 5000") + "\n[build]\n"
                             "cohort_size = 10000\n")
    with pytest.raises(SpecError, match="a cohort of 10000 members"):
        plan_build(many, "cpu")


@pytest.mark.parametrize("old, new, message", [
    ("epochs = 3", "epochs = 1e12", "15,000,000,000,000 optimizer steps (1,000,000,000,000 "
                                    "epochs of 15 batches), more than the 1,000,000,000"),
    ("epochs = 3", "steps = 10000000000", "10,000,000,000 optimizer steps"),
    ('"log:5"', '"log:1e9"', "'log:1e9' is not 'log:K'"),
    ('"log:5"\n', '"log:1000000000"\n', "saves 100,000,001 checkpoints"),
    ('"log:5"\n', '"every:1"\n', "saves 100,000,001 checkpoints"),
])
def test_specs_that_never_end_are_refused(old, new, message):
    text = TINY_SPEC.replace(old, new)
    if "log:1000000000" in new or "every:1" in new:
        text = text.replace("epochs = 3", "steps = 100000000")
    with pytest.raises(SpecError) as e:
        plan_build(ZooSpec.from_text(text), "cpu")
    assert message in str(e.value)


def test_deeply_nested_toml_is_a_spec_error():
    for text in ("x = " + "[" * 50_000 + "]" * 50_000, "x = " + "{a = " * 5000 + "1" + "}" * 5000):
        with pytest.raises(SpecError, match="nested deeper"):
            ZooSpec.from_text(text)


def test_unknown_keys_are_named_a_few_at_a_time():
    keys = "".join(f"colour{i} = 1\n" for i in range(900))
    with pytest.raises(SpecError) as e:
        ZooSpec.from_text(keys + TINY_SPEC)
    assert str(e.value).startswith("colour0: Extra inputs are not permitted; colour1:")
    assert str(e.value).endswith("and 895 more") and len(str(e.value)) < 300
    many = "".join(f"k{i} = 1\n" for i in range(100_000))  # refused before any is validated
    with pytest.raises(SpecError, match="model: 100,002 keys in one table, more than the 1,000"):
        ZooSpec.from_text(TINY_SPEC.replace("[model]\n", "[model]\n" + many))


def test_dry_run_estimate_counts_what_the_build_stores(built_store, tiny_spec):
    estimate = plan_build(tiny_spec, "cpu").estimate()
    stored = built_store.sql("SELECT count(*) AS n, sum(n_bytes) AS b FROM checkpoints")
    assert estimate.checkpoints == stored["n"][0] == 40
    weights = stored["b"][0]
    metric_rows = built_store.sql("SELECT count(*) AS n FROM metrics")["n"][0]
    assert weights < estimate.bytes < weights + 100 * metric_rows
    assert 0 < estimate.seconds < 60
