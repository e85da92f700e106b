"""Dataset registry: a name in a spec's [dataset] table maps to an options class that generates
the data in-process, or reads it from files the user already has (`source`). Nothing is ever
downloaded, so a store can always regenerate what a run trained on and check it against the
fingerprint recorded at training time.

Every dataset shares three run-level options: `n_train` (the first n examples of the train split,
so subsets nest), `label_noise` (a fraction of train labels replaced by a different class) and
`noise_seed` (None = derived from the run's seed). The remaining options decide generation; the
generated split is cached per process because runs of one zoo share it.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from dlstore.errors import SpecError
from dlstore.seeds import seed_for

RUN_LEVEL = frozenset({"n_train", "label_noise", "noise_seed"})


@dataclass(frozen=True)
class DatasetTensors:
    """A train/test split. Tensors are shared with the in-process cache (runs of a zoo hold views
    of one x_train) and the fingerprint is computed once per object: do not modify them in place.
    """

    x_train: torch.Tensor  # float32 [N_train, *input_shape]
    y_train: torch.Tensor  # int64 [N_train]
    x_test: torch.Tensor  # float32 [N_test, *input_shape]
    y_test: torch.Tensor  # int64 [N_test]
    n_classes: int
    # nats per token of the source that generated a sequence task, where it is known exactly
    # (`markov`): the best loss any model can reach, held against fitted irreducible losses
    entropy_rate: float | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over n_classes and the shapes, dtypes and bytes of the four tensors, in a fixed
        order: recorded with a run so that regenerated data can be checked against it."""
        digest = hashlib.sha256(f"classes={self.n_classes}".encode())
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            t = t.detach().cpu().contiguous()
            digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class DataShape:
    """What generating a dataset gives, known from its options alone (`Dataset.shape`)."""

    n_examples: int  # train + test
    input_shape: tuple[int, ...]
    n_classes: int
    extra_bytes: int = 0  # what generation holds besides the examples (a teacher network)

    @property
    def generation_bytes(self) -> int:
        """Peak memory of generating the split, roughly: the examples drawn in float64, their
        shuffled copy and the float32 tensors (about three float64 copies), plus the extra."""
        return 3 * 8 * self.n_examples * (math.prod(self.input_shape) + 1) + self.extra_bytes


class Dataset(BaseModel):
    """A dataset's options, validated like a spec's other tables (unknown fields refused).
    Subclasses add their generation options as fields and implement `generate`; the built-ins
    name themselves with `name: Literal[...]`, a plugin by its entry point or import path.
    `shape` is optional (the memory check skips a dataset without it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    n_train: int | None = Field(default=None, ge=1, description="first n train examples")
    label_noise: float = Field(default=0.0, ge=0.0, lt=1.0, description="fraction relabelled")
    noise_seed: int | None = Field(default=None, description="None = derived from the run seed")

    def generate(self) -> DatasetTensors:
        """The full clean split (no subset, no noise), from the generation options alone."""
        raise NotImplementedError

    def shape(self) -> DataShape | None:
        """Sizes of the split without generating it, for the memory check that runs before a
        build allocates anything; None if unknown (the check then skips the dataset)."""
        return None

    def source(self) -> str | None:
        """What the data is read from, in words (`files under /data/fashion`), for the message
        when a stored run's data cannot be regenerated; None for data made from the options
        alone (then only a changed generator can change it)."""
        return None

    def source_state(self) -> str:
        """A cheap token that changes when the source does (file sizes and modification times):
        part of the in-process cache key, so that files moved or replaced since they were read
        are read again. Across processes the fingerprint catches changed bytes whatever this
        says. Raises the dataset's one-line error if the source is gone; "" for generated data.
        """
        return ""







def as_tensors(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
             n_classes: int) -> DatasetTensors:
    return DatasetTensors(
        torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32),
        torch.as_tensor(np.ascontiguousarray(y), dtype=torch.int64),
        torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32),
        torch.as_tensor(np.ascontiguousarray(y_test), dtype=torch.int64),
        n_classes,
    )


def test_size(n: int, test_fraction: float) -> int:
    """Test-set size, refusing a split that leaves either side empty (nothing to train or score)."""
    n_test = int(round(n * test_fraction))
    if not 0 < n_test < n:
        raise SpecError(f"dataset: splitting {n} examples with test fraction {test_fraction:g} "
                        f"leaves {n - n_test} train and {n_test} test examples; both must be > 0")
    return n_test


def split(x: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator,
           n_classes: int) -> DatasetTensors:
    order = rng.permutation(len(y))
    n_test = test_size(len(y), test_fraction)
    test, train = order[:n_test], order[n_test:]
    return as_tensors(x[train], y[train], x[test], y[test], n_classes)
















def clean_split(options: Dataset) -> DatasetTensors:
    """The generated split for `options`, ignoring the run-level options; cached per process
    (mnist1d takes seconds to generate), so the tensors are shared: do not modify them."""
    return _clean_split(options, options.source_state())


def _clean_split(options: Dataset, source_state: str) -> DatasetTensors:
    generation = options.model_dump_json(exclude=RUN_LEVEL)
    return _generate_cached(type(options), generation, source_state)


def apply_label_noise(y: torch.Tensor, n_classes: int, fraction: float,
                      seed: int) -> torch.Tensor:
    """A copy of `y` with exactly round(fraction * len(y)) labels, at positions chosen by `seed`,
    each replaced by a uniformly drawn *different* class (so the noise rate is what it says)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label noise fraction must be in [0, 1), got {fraction}")
    y = y.clone()
    n_noisy = int(round(fraction * len(y)))
    if n_noisy == 0:
        return y
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n_noisy]
    shift = torch.randint(1, n_classes, (n_noisy,), generator=g)
    y[idx] = (y[idx] + shift) % n_classes
    return y


def gaussian_clone(x: torch.Tensor, y: torch.Tensor, n_classes: int, seed: int) -> torch.Tensor:
    """Inputs shaped like `x` where each example of class c is drawn afresh from the Gaussian
    with the mean and covariance (ddof 0) of the class-c examples of `x`: what a network can
    classify from the first two moments of each class alone (Refinetti et al. 2023). The labels
    stay `y`. Drawn on the CPU from `seed`, so the same inputs and seed give the same clone on
    any device; a rank-deficient class covariance is sampled within its span."""
    flat = x.detach().cpu().reshape(x.shape[0], -1).to(torch.float64)
    labels = y.detach().cpu()
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty_like(flat)
    for c in range(n_classes):
        index = (labels == c).nonzero().flatten()
        if index.numel() == 0:
            continue
        members = flat[index]
        mean = members.mean(0)
        centred = members - mean
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / index.numel())
        root = eigenvectors * eigenvalues.clamp_min(0.0).sqrt()  # root @ root.T = covariance
        z = torch.randn((index.numel(), flat.shape[1]), generator=generator, dtype=torch.float64)
        out[index] = mean + z @ root.T
    return out.to(x.dtype).reshape(x.shape).to(x.device)


def run_data(options: Dataset, run_seed: int) -> DatasetTensors:
    """Exactly what one run trains and is evaluated on: its train subset with its label noise.

    x tensors are views of the cached clean split (runs share them); results are cached too, so
    runs without label noise share one object and its fingerprint. Do not modify them in place."""
    noise_seed = None
    if options.label_noise > 0:
        noise_seed = seed_for(options.noise_seed, run_seed, "noise")
    return _run_data(type(options), options.model_dump_json(), noise_seed,
                     options.source_state())


@functools.lru_cache(maxsize=64)
def _run_data(cls: type[Dataset], options_json: str, noise_seed: int | None,
              source_state: str) -> DatasetTensors:
    options = cls.model_validate_json(options_json)
    full = _clean_split(options, source_state)
    available = full.x_train.shape[0]
    n = available if options.n_train is None else options.n_train
    if n > available:
        raise SpecError(f"dataset.n_train: {n} exceeds the {available} training examples of "
                        f"{options.name} with these options")
    y = full.y_train[:n]
    if noise_seed is not None:
        y = apply_label_noise(y, full.n_classes, options.label_noise, noise_seed)
    return DatasetTensors(full.x_train[:n], y, full.x_test, full.y_test, full.n_classes,
                          full.entropy_rate)


@functools.lru_cache(maxsize=16)
def _generate_cached(cls: type[Dataset], generation_json: str,
                     source_state: str) -> DatasetTensors:
    """`source_state` only keys the cache: files changed since they were read miss it."""
    return cls.model_validate_json(generation_json).generate()
