"""The built-in datasets: MNIST-1D, scikit-learn's digits, modular arithmetic (one-hot),
teacher-student regression-as-classification and a Gaussian mixture. Registered by name.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
from pydantic import Field

from dlstore.datasets.base import (
    Dataset,
    DatasetTensors,
    DataShape,
    as_tensors,
    split,
    test_size,
)
from dlstore.datasets.registry import register_dataset


@register_dataset("mnist1d")
class MNIST1dOptions(Dataset):
    """MNIST-1D (Greydanus 2020), generated locally: 40-point sequences, 10 classes."""

    name: Literal["mnist1d"]
    num_samples: int = Field(default=5000, ge=20,
                             description="train + test (80/20), rounded down to a multiple of 10")
    data_seed: int = Field(default=42, description="generation seed (the package's default)")
    shuffle_seq: bool = Field(default=False, description="permute the sequence positions")

    def generate(self) -> DatasetTensors:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed, args.shuffle_seq = (self.num_samples, self.data_seed,
                                                         self.shuffle_seq)
        # make_dataset seeds Python's and numpy's global generators; leave callers' streams alone
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            d = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return as_tensors(d["x"], d["y"], d["x_test"], d["y_test"], 10)

    def shape(self) -> DataShape:
        return DataShape(self.num_samples, (40,), 10)  # the package's final_seq_length


@register_dataset("digits")
class DigitsOptions(Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images), scaled to [0, 1], shape [1, 8, 8]."""

    name: Literal["digits"]
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = 0

    def generate(self) -> DatasetTensors:
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
        rng = np.random.default_rng(self.split_seed)
        return split(x, digits.target, self.test_fraction, rng, 10)

    def shape(self) -> DataShape:
        return DataShape(1797, (1, 8, 8), 10)


@register_dataset("modular")
class ModularOptions(Dataset):
    """All pairs (a, b) of Z_p with label a op b mod p; inputs are two concatenated one-hots."""

    name: Literal["modular"]
    p: int = Field(default=97, ge=2)
    operation: Literal["add", "sub", "mul"] = "add"
    train_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    split_seed: int = 0

    def generate(self) -> DatasetTensors:
        p = self.p
        a, b = (g.ravel() for g in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
        y = np.mod({"add": a + b, "sub": a - b, "mul": a * b}[self.operation], p)
        x = np.zeros((p * p, 2 * p), dtype=np.float32)
        x[np.arange(p * p), a] = 1.0
        x[np.arange(p * p), p + b] = 1.0
        rng = np.random.default_rng(self.split_seed)
        return split(x, y, 1.0 - self.train_fraction, rng, p)

    def shape(self) -> DataShape:
        return DataShape(self.p * self.p, (2 * self.p,), self.p)


@register_dataset("teacher_student")
class TeacherStudentOptions(Dataset):
    """Gaussian inputs labelled by the argmax of a random one-hidden-layer tanh teacher."""

    name: Literal["teacher_student"]
    dim: int = Field(default=20, ge=1)
    teacher_width: int = Field(default=64, ge=1)
    n_classes: int = Field(default=10, ge=2)
    n_samples: int = Field(default=5000, ge=2)
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    data_seed: int = Field(default=0, description="draws the teacher, the inputs and the split")

    def generate(self) -> DatasetTensors:
        rng = np.random.default_rng(self.data_seed)
        w1 = rng.standard_normal((self.dim, self.teacher_width)) / np.sqrt(self.dim)
        w2 = rng.standard_normal((self.teacher_width, self.n_classes)) / np.sqrt(
            self.teacher_width)
        x = rng.standard_normal((self.n_samples, self.dim)).astype(np.float32)
        y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
        return split(x, y, self.test_fraction, rng, self.n_classes)

    def shape(self) -> DataShape:
        teacher = 8 * self.teacher_width * (self.dim + self.n_classes + self.n_samples)
        return DataShape(self.n_samples, (self.dim,), self.n_classes, teacher)


@register_dataset("gaussian_mixture")
class GaussianMixtureOptions(Dataset):
    """Isotropic unit-variance Gaussian classes whose means lie `separation` from the origin.

    Labels cycle through the classes in each split, so train, test and every train prefix (an
    `n_train` subset) are balanced to within one example per class."""

    name: Literal["gaussian_mixture"]
    n_classes: int = Field(default=4, ge=2)
    dim: int = Field(default=10, ge=1)
    n_samples: int = Field(default=3000, ge=2, description="train + test")
    separation: float = Field(default=3.0, ge=0.0, description="norm of each class mean")
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    data_seed: int = Field(default=0, description="draws the means and the samples")

    def generate(self) -> DatasetTensors:
        rng = np.random.default_rng(self.data_seed)
        means = rng.standard_normal((self.n_classes, self.dim))
        means *= self.separation / np.linalg.norm(means, axis=1, keepdims=True)
        n_test = test_size(self.n_samples, self.test_fraction)

        def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
            y = np.arange(n) % self.n_classes
            return means[y] + rng.standard_normal((n, self.dim)), y

        (x, y), (x_test, y_test) = sample(self.n_samples - n_test), sample(n_test)
        return as_tensors(x, y, x_test, y_test, self.n_classes)

    def shape(self) -> DataShape:
        return DataShape(self.n_samples, (self.dim,), self.n_classes, 8 * self.n_classes * self.dim)
