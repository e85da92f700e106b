"""Content-addressed safetensors shards.

A shard holds one checkpoint step of a cohort: every tensor with a leading member axis [P, ...],
plus `__metadata__` that makes it self-describing (layout, architecture, run ids, step). Its name
is the sha256 of its bytes: `blobs/ab/cdef....safetensors`. Writes go to a temporary name and are
then renamed (fsynced first on a local disk, copied on an object store), so a shard is either
complete under its hash or absent.

On an object store, a shard that is read is fetched whole into a local cache (`$DLSTORE_CACHE`,
default `~/.cache/dlstore`), hashed on the way, and read from there with `safe_open` like a local
shard. Shards never change under their name, so a cached copy is always valid; the whole shard
is read anyway to verify it, and the next member read from the same shard is local.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from dlstore.errors import CorruptBlobError, NotFoundError, StoreError
from dlstore.store.location import FileInfo, Location, cache_dir

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
_SUFFIX = ".safetensors"


class BlobStore:
    def __init__(self, location: Location, prefix: str = "blobs"):
        self.location = location
        self.prefix = prefix
        self.root = location.local_path(prefix) or location.display(prefix)
        self._verified: set[str] = set()
        self._layouts: dict[str, tuple] = {}

    def key(self, blob: str) -> str:
        return f"{self.prefix}/{blob[:2]}/{blob[2:]}{_SUFFIX}"

    def path(self, blob: str) -> Path | str:
        """Where the shard lives: a local path, or a URI on an object store."""
        return self.location.local_path(self.key(blob)) or self.location.display(self.key(blob))

    def put(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
        """Write a shard and return its hash; writing bytes that already exist is a no-op."""
        from safetensors.torch import save as save_safetensors

        data = save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata)
        blob = hashlib.sha256(data).hexdigest()
        if self.location.is_file(self.key(blob)):
            return blob
        try:
            self.location.write_atomic(self.key(blob), data)
        except OSError as e:
            raise StoreError(f"cannot write shard to {self.root}: {e.strerror or e}") from None
        self._verified.add(blob)
        return blob

    def check_writable(self) -> None:
        """Raise StoreError now, rather than after hours of training, if shards cannot be
        written here (a read-only store, a full or unmounted disk)."""
        probe = f"{self.prefix}/.probe.{uuid.uuid4().hex}.tmp"
        try:
            self.location.write_atomic(probe, b"")
            self.location.remove(probe)
        except OSError as e:
            raise StoreError(f"cannot write shards to {self.root}: {e.strerror or e}") from None

    def verify(self, blob: str, force: bool = False) -> None:
        """Raise CorruptBlobError unless the shard's bytes hash to its name (checked once per
        process unless `force`; `force` on an object store hashes the stored object itself)."""
        if blob in self._verified and not force:
            return
        self._verified.discard(blob)
        if self.location.local or not force:
            self._file(blob)
            return
        self._exists(blob)
        with self.location.open_read(self.key(blob)) as f:
            digest = _digest(f)
        self._check(blob, digest)

    def read_member(self, blob: str, member: int, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of one member, read as slices without loading the rest of the shard."""
        path = self._file(blob, verify)
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

        path = self._file(blob, verify)
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
        # the header of a local shard; an object-store shard is cached whole (unverified here:
        # its members are verified when they are read)
        path = self._file(blob, verify=False)
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
        return dict(self._header(blob).get("__metadata__") or {})

    def shape(self, blob: str) -> dict[str, list[int]]:
        """Shape of every tensor in a shard, read from its header."""
        return {name: list(info["shape"]) for name, info in self._header(blob).items()
                if name != "__metadata__"}

    def remove(self, blob: str) -> int:
        """Delete a shard; returns the bytes freed."""
        info = self.location.info(self.key(blob))
        self.location.remove(self.key(blob))
        self._verified.discard(blob)
        return info.size if info else 0

    def remove_temporary(self, leftover: FileInfo) -> None:
        """Delete a temporary file left by an interrupted write (as `list` returns it)."""
        self.location.remove(leftover.key)

    def list(self) -> tuple[dict[str, FileInfo], list[FileInfo]]:
        """(shards present, by hash; leftover temporary files of interrupted writes)."""
        blobs, temporary = {}, []
        for entry in self.location.list(self.prefix):
            folder, _, name = entry.key.removeprefix(f"{self.prefix}/").rpartition("/")
            if name.endswith(".tmp"):
                temporary.append(entry)
            elif name.endswith(_SUFFIX) and "/" not in folder:
                blobs[folder + name.removesuffix(_SUFFIX)] = entry
        return blobs, temporary

    # -- reading through a local file -----------------------------------------------------

    def _file(self, blob: str, verify: bool = True) -> Path:
        """A local file with the shard's bytes, verified once per process (unless not
        `verify`): the shard itself on a local store, a cached copy of an object-store shard."""
        local = self.location.local_path(self.key(blob))
        if local is not None:
            self._exists(blob)
            if verify and blob not in self._verified:
                with open(local, "rb") as f:
                    self._check(blob, _digest(f))
            return local
        cached = cache_dir() / "blobs" / blob[:2] / f"{blob[2:]}{_SUFFIX}"
        if cached.is_file() and (not verify or blob in self._verified):
            return cached
        if cached.is_file():
            with open(cached, "rb") as f:
                if _digest(f).hexdigest() == blob:
                    self._verified.add(blob)
                    return cached
        self._fetch(blob, cached)
        return cached

    def _fetch(self, blob: str, cached: Path) -> None:
        """Copy an object-store shard into the cache, hashing it on the way; a shard whose bytes
        do not match its name is not cached."""
        self._exists(blob)
        tmp = cached.parent / f".{cached.name}.{uuid.uuid4().hex}.tmp"
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with self.location.open_read(self.key(blob)) as source, open(tmp, "wb") as sink:
                digest = _digest(source, sink)
            self._check(blob, digest)
            os.replace(tmp, cached)
        except OSError as e:
            raise StoreError(f"cannot cache shard {blob} in {cached.parent}: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _header(self, blob: str) -> dict:
        """The shard's safetensors header (tensor names, dtypes, shapes, offsets, metadata), read
        without the tensors: a local file through safetensors, an object through two reads."""
        local = self.location.local_path(self.key(blob))
        if local is not None:
            self._exists(blob)
            try:
                with safe_open(str(local), framework="pt") as f:
                    header = {name: {"shape": f.get_slice(name).get_shape()} for name in f.keys()}
                    header["__metadata__"] = f.metadata()
                    return header
            except (SafetensorError, OSError, ValueError) as e:
                raise CorruptBlobError(f"shard {blob} cannot be read ({local}): {e}") from None
        self._exists(blob)
        with self.location.open_read(self.key(blob)) as f:
            try:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
                return header
            except (struct.error, ValueError, MemoryError) as e:
                raise CorruptBlobError(f"shard {blob} cannot be read ({self.path(blob)}): "
                                       f"{e}") from None

    def _check(self, blob: str, digest) -> None:
        if digest.hexdigest() != blob:
            raise CorruptBlobError(f"shard {blob} is corrupted: its bytes hash to "
                                   f"{digest.hexdigest()[:16]}..., not to its name "
                                   f"({self.path(blob)})")
        self._verified.add(blob)

    def _exists(self, blob: str) -> None:
        if not self.location.is_file(self.key(blob)):
            raise NotFoundError(f"shard {blob} is missing from the store ({self.path(blob)})")


def _digest(source: IO[bytes], sink: IO[bytes] | None = None):
    digest = hashlib.sha256()
    while chunk := source.read(_CHUNK):
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest

