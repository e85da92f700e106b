"""Content-addressed safetensors shards.

A shard holds one checkpoint step of a cohort: every tensor with a leading member axis [P, ...],
plus `__metadata__` that makes it self-describing (layout, architecture, run ids, step). Its name
is the sha256 of its bytes: `blobs/ab/cdef....safetensors`. Writes go to a temporary name, are
fsynced, then renamed, so a shard is either complete under its hash or absent.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from dlstore.errors import CorruptBlobError, NotFoundError, StoreError

if TYPE_CHECKING:
    import torch

_CHUNK = 1 << 22


class BlobStore:
    def __init__(self, root: Path):
        self.root = root
        self._verified: set[str] = set()

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
