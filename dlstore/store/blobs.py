"""Content-addressed safetensors shards.

A shard holds one checkpoint step of a cohort: every tensor with a leading member axis [P, ...],
plus `__metadata__` that makes it self-describing (layout, architecture, run ids, step). Its name
is the sha256 of its bytes: `blobs/ab/cdef....safetensors`. Writes go to a temporary name, are
fsynced, then renamed, so a shard is either complete under its hash or absent.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from dlstore.errors import CorruptBlobError, NotFoundError, StoreError

if TYPE_CHECKING:
    import torch

_CHUNK = 1 << 22
# read_members slices a shard's member axis in one piece unless this many unwanted members lie
# between two wanted ones: small gaps cost less to copy than another slice costs to make
_GAP = 8
# safetensors' header dtype codes -> torch dtype names
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}


class BlobStore:
    def __init__(self, root: Path):
        self.root = root
        self._verified: set[str] = set()
        self._layouts: dict[str, tuple] = {}

    def path(self, blob: str) -> Path:
        return self.root / blob[:2] / f"{blob[2:]}.safetensors"

    def put(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
        """Write a shard and return its hash; writing bytes that already exist is a no-op."""
        from safetensors.torch import save as save_safetensors

        data = save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata)
        blob = hashlib.sha256(data).hexdigest()
        path = self.path(blob)
        if path.exists():
            return blob
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            raise StoreError(f"cannot write shard to {self.root}: {e.strerror or e}") from None
        self._verified.add(blob)
        return blob

    def check_writable(self) -> None:
        """Raise StoreError now, rather than after hours of training, if shards cannot be
        written here (a read-only store, a full or unmounted disk)."""
        probe = self.root / f".probe.{uuid.uuid4().hex}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"cannot write shards to {self.root}: {e.strerror or e}") from None

    def verify(self, blob: str, force: bool = False) -> None:
        """Raise CorruptBlobError unless the file's bytes hash to its name (checked once per
        process unless `force`)."""
        if blob in self._verified and not force:
            return
        path = self._existing(blob)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != blob:
            raise CorruptBlobError(f"shard {blob} is corrupted: its bytes hash to "
                                   f"{digest.hexdigest()[:16]}..., not to its name ({path})")
        self._verified.add(blob)

    def read_member(self, blob: str, member: int, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of one member, read as slices without loading the rest of the shard."""
        if verify:
            self.verify(blob)
        path = self._existing(blob)
        try:
            with safe_open(str(path), framework="pt") as f:
                return {name: f.get_slice(name)[member] for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptBlobError(f"shard {blob} cannot be read ({path}): {e}") from None

    def read_members(self, blob: str, members: Sequence[int], names: Sequence[str],
                     verify: bool = True) -> dict[str, torch.Tensor]:
        """Tensors `names` of several members, each [len(members), ...] in the order given.

        Each tensor is read in as few slices as cover the members (one slice over their range,
        split where _GAP or more unwanted members lie between two wanted ones), then indexed:
        a bulk read of many members costs one pass over the shard, not one file access per
        member, and a read of a few scattered members does not copy the whole shard."""
        import numpy as np
        import torch

        if verify:
            self.verify(blob)
        path = self._existing(blob)
        wanted, inverse = np.unique(np.asarray(members, dtype=np.int64), return_inverse=True)
        cuts = np.flatnonzero(np.diff(wanted) > _GAP) + 1
        segments = [(int(part[0]), int(part[-1]) + 1) for part in np.split(wanted, cuts)]
        # row of each wanted member in the concatenated segments
        offsets = np.cumsum([0] + [b - a for a, b in segments[:-1]])
        segment_of = np.repeat(np.arange(len(segments)), [len(p) for p in np.split(wanted, cuts)])
        rows = offsets[segment_of] + wanted - np.array([a for a, _ in segments])[segment_of]
        rows = rows[inverse.reshape(-1)]
        total = sum(b - a for a, b in segments)
        index = None if np.array_equal(rows, np.arange(total)) else torch.as_tensor(rows)
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                out = {}
                for name in names:
                    if name not in present:
                        raise CorruptBlobError(f"shard {blob} holds no tensor {name!r} "
                                               f"({path})")
                    tensor = f.get_slice(name)
                    parts = [tensor[a:b] for a, b in segments]
                    block = parts[0] if len(parts) == 1 else torch.cat(parts)
                    out[name] = block if index is None else block.index_select(0, index)
                return out
        except (SafetensorError, OSError, ValueError, IndexError) as e:
            raise CorruptBlobError(f"shard {blob} cannot be read ({path}): {e}") from None

    def read_many(self, requests: Sequence[tuple[str, Sequence[int]]], names: Sequence[str],
                  threads: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """`read_members` of every (blob, members) request, in order, verified and read by a few
        threads ahead of the consumer: hashing and slicing release the GIL, and a first read of
        many shards is bound by hashing their bytes. At most `threads` (default: the CPU count,
        up to 8) reads are in flight, so memory holds that many shards' slices."""
        threads = threads or min(8, os.cpu_count() or 1)
        if threads == 1 or len(requests) <= 1:
            for blob, members in requests:
                yield self.read_members(blob, members, names)
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="dlstore-read") as pool:
            pending = deque()
            todo = iter(requests)
            for blob, members in itertools.islice(todo, threads):
                pending.append(pool.submit(self.read_members, blob, members, names))
            while pending:
                result = pending.popleft().result()
                for blob, members in itertools.islice(todo, 1):
                    pending.append(pool.submit(self.read_members, blob, members, names))
                yield result

    def layout(self, blob: str) -> tuple[tuple[tuple[str, tuple[int, ...], str], ...], int]:
        """((name, shape of one member, dtype) of every tensor, number of members), in the
        order the shard's metadata records (state-dict order; header order if it records none).
        Read from the header alone, once per process: a shard's bytes never change under its
        hash."""
        if blob not in self._layouts:
            self._layouts[blob] = self._read_layout(blob)
        return self._layouts[blob]

    def _read_layout(self, blob: str) -> tuple[tuple[tuple[str, tuple[int, ...], str], ...], int]:
        path = self._existing(blob)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = {name: f.get_slice(name) for name in f.keys()}
                recorded = json.loads((f.metadata() or {}).get("layout", "[]"))
                order = [t["name"] for t in recorded]
                if sorted(order) != sorted(header):
                    order = list(header)
                tensors = [(name, list(header[name].get_shape())) for name in order]
                dtypes = [_DTYPES.get(header[name].get_dtype(), header[name].get_dtype())
                          for name in order]
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptBlobError(f"shard {blob} cannot be read ({path}): {e}") from None
        members = {shape[0] for _, shape in tensors if shape}
        if len(members) != 1 or any(not shape for _, shape in tensors):
            raise CorruptBlobError(f"shard {blob} has no common member axis ({path})")
        return (tuple((name, tuple(shape[1:]), dtype)
                      for (name, shape), dtype in zip(tensors, dtypes)), members.pop())

    def metadata(self, blob: str) -> dict[str, str]:
        path = self._existing(blob)
        try:
            with safe_open(str(path), framework="pt") as f:
                return dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptBlobError(f"shard {blob} cannot be read ({path}): {e}") from None

    def shape(self, blob: str) -> dict[str, list[int]]:
        """Shape of every tensor in a shard, read from its header."""
        path = self._existing(blob)
        try:
            with safe_open(str(path), framework="pt") as f:
                return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptBlobError(f"shard {blob} cannot be read ({path}): {e}") from None

    def remove(self, blob: str) -> int:
        """Delete a shard; returns the bytes freed."""
        path = self.path(blob)
        size = path.stat().st_size
        path.unlink()
        self._verified.discard(blob)
        return size

    def list(self) -> tuple[list[str], list[Path]]:
        """(blob hashes present, leftover temporary files of interrupted writes)."""
        blobs, temporary = [], []
        if self.root.is_dir():
            for path in sorted(self.root.glob("*/*")):
                if path.name.endswith(".tmp"):
                    temporary.append(path)
                elif path.suffix == ".safetensors":
                    blobs.append(path.parent.name + path.stem)
        return blobs, temporary

    def _existing(self, blob: str) -> Path:
        path = self.path(blob)
        if not path.is_file():
            raise NotFoundError(f"shard {blob} is missing from the store ({path})")
        return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
