import random

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dlstore.datasets.base import (
    Dataset,
    DatasetTensors,
    apply_label_noise,
    clean_split,
    gaussian_clone,
    run_data,
)
from dlstore.datasets.registry import DATASETS, parse_dataset_options
from dlstore.errors import DlstoreError, SpecError
from dlstore.seeds import derive_seed

# name -> (raw options kept small for speed, input shape, n_classes, n_train, n_test)
SHAPES = {
    "mnist1d": ({}, (40,), 10, 4000, 1000),
    "digits": ({}, (1, 8, 8), 10, 1438, 359),
    "modular": ({"p": 11}, (22,), 11, 61, 60),
    "teacher_student": ({"n_samples": 500}, (20,), 10, 400, 100),
    "gaussian_mixture": ({}, (10,), 4, 2400, 600),
}
# a cheap, seeded variant of each dataset, for tests about seeds and noise
SMALL = {
    "mnist1d": {"num_samples": 300},
    "digits": {},
    "modular": {"p": 13},
    "teacher_student": {"n_samples": 400},
    "gaussian_mixture": {"n_samples": 400},
}
DATA_SEED = {"mnist1d": "data_seed", "digits": "split_seed", "modular": "split_seed",
             "teacher_student": "data_seed", "gaussian_mixture": "data_seed"}
# real images: tests/test_image_data.py writes the files they read (mnist takes seconds)
IMAGE_DATASETS = {"mnist", "idx", "cifar", "svhn", "image_folder"}
# token sequences for the transformer: tests/test_sequences.py
SEQUENCE_DATASETS = {"arithmetic", "sparse_parity", "markov", "text"}


def opts(name: str, **raw) -> Dataset:
    return parse_dataset_options({"name": name, **raw})


def test_every_registered_dataset_is_covered():
    assert IMAGE_DATASETS | SEQUENCE_DATASETS <= set(DATASETS)
    assert (set(DATASETS) - IMAGE_DATASETS - SEQUENCE_DATASETS == set(SHAPES) == set(SMALL)
            == set(DATA_SEED))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_dtypes_and_classes(name):
    raw, shape, n_classes, n_train, n_test = SHAPES[name]
    d = clean_split(opts(name, **raw))
    assert d.input_shape == shape and d.n_classes == n_classes
    assert d.x_train.shape == (n_train, *shape) and d.x_test.shape == (n_test, *shape)
    assert d.y_train.shape == (n_train,) and d.y_test.shape == (n_test,)
    assert d.x_train.dtype == d.x_test.dtype == torch.float32
    assert d.y_train.dtype == d.y_test.dtype == torch.int64
    for y in (d.y_train, d.y_test):
        assert 0 <= int(y.min()) and int(y.max()) < n_classes
    assert torch.isfinite(d.x_train).all() and torch.isfinite(d.x_test).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_generation_is_deterministic_and_seeded(name):
    o = opts(name, **SMALL[name])
    first = o.generate()
    again = o.generate()  # bypasses the cache: a real regeneration
    for a, b in zip(_tensors(first), _tensors(again)):
        assert torch.equal(a, b)
    assert first.fingerprint == again.fingerprint == clean_split(o).fingerprint
    other = opts(name, **SMALL[name], **{DATA_SEED[name]: 7}).generate()
    assert not torch.equal(first.x_train, other.x_train)
    assert first.fingerprint != other.fingerprint


def _tensors(d: DatasetTensors) -> tuple[torch.Tensor, ...]:
    return d.x_train, d.y_train, d.x_test, d.y_test


def test_fingerprint_covers_every_tensor():
    d = clean_split(opts("gaussian_mixture", n_samples=100))
    for i in range(4):
        parts = [t.clone() for t in _tensors(d)]
        parts[i] = parts[i].flip(0)
        assert DatasetTensors(*parts, d.n_classes).fingerprint != d.fingerprint


def test_digits_are_scaled_to_unit_interval():
    d = clean_split(opts("digits"))
    x = torch.cat([d.x_train, d.x_test])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


@pytest.mark.parametrize(("operation", "fn"), [
    ("add", lambda a, b: a + b), ("sub", lambda a, b: a - b), ("mul", lambda a, b: a * b)])
def test_modular_labels_match_the_one_hot_operands(operation, fn):
    p = 13
    d = clean_split(opts("modular", p=p, operation=operation))
    x, y = torch.cat([d.x_train, d.x_test]), torch.cat([d.y_train, d.y_test])
    assert (x.sum(1) == 2).all()
    a, b = x[:, :p].argmax(1), x[:, p:].argmax(1)
    assert torch.equal(y, fn(a, b) % p)
    assert len(set(zip(a.tolist(), b.tolist()))) == p * p  # every pair exactly once


def test_modular_train_fraction_sets_the_split():
    d = clean_split(opts("modular", p=10, train_fraction=0.3))
    assert (d.x_train.shape[0], d.x_test.shape[0]) == (30, 70)


def test_gaussian_mixture_is_balanced_and_learnable():
    d = clean_split(opts("gaussian_mixture"))
    assert torch.bincount(d.y_train).tolist() == [600] * 4
    assert torch.bincount(d.y_test).tolist() == [150] * 4
    means = torch.stack([d.x_train[d.y_train == c].mean(0) for c in range(d.n_classes)])
    predicted = torch.cdist(d.x_test, means).argmin(1)
    assert (predicted == d.y_test).float().mean() > 0.8


def test_teacher_student_labels_use_many_classes():
    d = clean_split(opts("teacher_student"))
    counts = torch.bincount(d.y_train, minlength=d.n_classes)
    assert (counts > 0).sum() >= 5 and counts.max() < 0.5 * len(d.y_train)


def test_mnist1d_leaves_global_rngs_alone():
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state(), random.getstate()
    opts("mnist1d", num_samples=200, data_seed=5).generate()
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]


def test_clean_split_ignores_run_level_options():
    base = clean_split(opts("digits"))
    assert clean_split(opts("digits", n_train=10, label_noise=0.5, noise_seed=3)) is base
    assert clean_split(opts("digits", split_seed=1)) is not base


def test_run_data_without_options_is_the_clean_split():
    o = opts("teacher_student", n_samples=400)
    d, full = run_data(o, run_seed=0), clean_split(o)
    assert d.fingerprint == full.fingerprint
    assert run_data(o, run_seed=1).fingerprint == d.fingerprint  # no noise: seed is irrelevant


def test_n_train_takes_a_nested_prefix_and_keeps_the_test_split():
    full = clean_split(opts("mnist1d"))
    small = run_data(opts("mnist1d", n_train=100), run_seed=0)
    larger = run_data(opts("mnist1d", n_train=1000), run_seed=0)
    assert small.x_train.shape == (100, 40) and larger.x_train.shape == (1000, 40)
    assert torch.equal(small.x_train, full.x_train[:100])
    assert torch.equal(small.y_train, full.y_train[:100])
    assert torch.equal(small.x_train, larger.x_train[:100])
    assert torch.equal(small.x_test, full.x_test) and torch.equal(small.y_test, full.y_test)


def test_n_train_larger_than_the_train_split_is_a_user_error():
    with pytest.raises(DlstoreError, match=r"dataset\.n_train.*1438"):
        run_data(opts("digits", n_train=5000), run_seed=0)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 0.9])
def test_label_noise_changes_exactly_the_requested_count(fraction):
    y = torch.arange(1000) % 7
    noisy = apply_label_noise(y, 7, fraction, seed=1)
    changed = noisy != y
    assert int(changed.sum()) == round(fraction * 1000)  # every chosen label really changed
    assert noisy.dtype == torch.int64 and 0 <= int(noisy.min()) and int(noisy.max()) < 7
    assert torch.equal(y, torch.arange(1000) % 7)  # input untouched


def test_label_noise_is_seeded_and_uniform_over_other_classes():
    y = torch.zeros(20000, dtype=torch.int64)
    a = apply_label_noise(y, 5, 0.5, seed=1)
    assert torch.equal(a, apply_label_noise(y, 5, 0.5, seed=1))
    assert not torch.equal(a, apply_label_noise(y, 5, 0.5, seed=2))
    counts = torch.bincount(a[a != 0], minlength=5)[1:].float()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.02


def test_label_noise_rejects_a_fraction_out_of_range():
    with pytest.raises(ValueError):
        apply_label_noise(torch.zeros(5, dtype=torch.int64), 3, 1.0, seed=0)


def test_run_label_noise_follows_noise_seed_or_run_seed():
    raw = {"n_samples": 400, "label_noise": 0.25}
    clean = clean_split(opts("gaussian_mixture", **raw))
    d0 = run_data(opts("gaussian_mixture", **raw), run_seed=0)
    d1 = run_data(opts("gaussian_mixture", **raw), run_seed=1)
    n = len(clean.y_train)
    assert int((d0.y_train != clean.y_train).sum()) == round(0.25 * n)
    assert not torch.equal(d0.y_train, d1.y_train)
    expected = apply_label_noise(clean.y_train, 4, 0.25, derive_seed(0, "noise"))
    assert torch.equal(d0.y_train, expected)
    assert torch.equal(d0.x_train, clean.x_train) and torch.equal(d0.y_test, clean.y_test)
    fixed = [run_data(opts("gaussian_mixture", **raw, noise_seed=9), run_seed=s) for s in (0, 1)]
    assert torch.equal(fixed[0].y_train, fixed[1].y_train)
    assert torch.equal(fixed[0].y_train, apply_label_noise(clean.y_train, 4, 0.25, 9))


def test_noise_applies_to_the_subset_only():
    d = run_data(opts("digits", n_train=200, label_noise=0.1, noise_seed=0), run_seed=0)
    full = clean_split(opts("digits"))
    assert int((d.y_train != full.y_train[:200]).sum()) == 20
    assert torch.equal(full.y_train, clean_split(opts("digits")).y_train)  # cache untouched


@pytest.mark.parametrize(("raw", "fragment"), [
    ({}, "dataset.name: missing; known datasets: arithmetic, cifar, digits, "
          "gaussian_mixture"),
    ({"name": "imagenet"}, "dataset.name: unknown dataset 'imagenet'; known: arithmetic, cifar, "
                          "digits"),
    ({"name": "mnist1d", "n_trian": 5}, "dataset.n_trian: Extra inputs are not permitted"),
    ({"name": "mnist1d", "n_train": "many"}, "dataset.n_train: "),
    ({"name": "mnist1d", "n_train": 0}, "dataset.n_train: "),
    ({"name": "digits", "label_noise": 1.0}, "dataset.label_noise: "),
    ({"name": "modular", "operation": "div"}, "dataset.operation: "),
    ({"name": "modular", "p": 1}, "dataset.p: "),
])
def test_bad_options_name_the_field(raw, fragment):
    with pytest.raises(SpecError) as info:
        parse_dataset_options(raw)
    assert fragment in str(info.value)


def test_every_bad_field_is_reported_in_one_error():
    with pytest.raises(SpecError) as info:
        parse_dataset_options({"name": "gaussian_mixture", "dim": 0, "colour": "red"})
    message = str(info.value)
    assert "dataset.dim: " in message and "dataset.colour: " in message and "; " in message


def test_options_are_immutable_and_default_sensibly():
    o = opts("mnist1d")
    assert (o.n_train, o.label_noise, o.noise_seed) == (None, 0.0, None)
    with pytest.raises(ValidationError, match="frozen"):
        o.n_train = 5  # type: ignore[misc]


def test_a_split_with_an_empty_side_is_a_spec_error():
    with pytest.raises(SpecError, match="train and 0 test"):
        clean_split(opts("gaussian_mixture", n_samples=4, test_fraction=0.1))


def test_gaussian_clone_has_each_class_mean_and_covariance():
    rng = np.random.default_rng(0)
    n_classes, dim, per_class = 3, 5, 20000
    y = torch.arange(n_classes).repeat_interleave(per_class)
    mixing = torch.as_tensor(rng.standard_normal((n_classes, dim, dim)))
    # skewed, correlated classes (exponential noise): the clone keeps only two moments
    noise = torch.as_tensor(rng.exponential(size=(len(y), dim)))
    x = (torch.einsum("nd,nde->ne", noise, mixing[y]) + 3.0 * y[:, None]).to(torch.float32)
    clone = gaussian_clone(x, y, n_classes, seed=1)
    assert clone.shape == x.shape and clone.dtype == x.dtype
    assert not torch.allclose(clone, x)
    for c in range(n_classes):
        real, fake = x[y == c].double(), clone[y == c].double()
        scale = real.std(0).max().item()
        assert torch.allclose(fake.mean(0), real.mean(0), atol=0.03 * scale)
        assert torch.allclose(torch.cov(fake.T), torch.cov(real.T), atol=0.05 * scale**2)
        # the real classes are skewed, the clone's are not: only the first two moments copied
        skew = ((fake - fake.mean(0)) ** 3).mean(0) / fake.std(0) ** 3
        assert skew.abs().max() < 0.1
    assert torch.equal(gaussian_clone(x, y, n_classes, seed=1), clone)
    assert not torch.equal(gaussian_clone(x, y, n_classes, seed=2), clone)


def test_gaussian_clone_of_a_rank_deficient_class_stays_in_its_span():
    # digits-like: more dimensions than examples per class, images of shape [1, 4, 4]
    x = torch.zeros((12, 1, 4, 4))
    x[:, 0, 0, :2] = torch.randn(12, 2)
    y = torch.tensor([0, 1] * 6)
    clone = gaussian_clone(x, y, 2, seed=0)
    assert clone.shape == x.shape and torch.isfinite(clone).all()
    assert clone[:, 0, 1:].abs().max() < 1e-6 and clone[:, 0, 0, 2:].abs().max() < 1e-6
