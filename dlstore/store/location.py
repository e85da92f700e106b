"""Where a store lives, and the few file operations the store needs, done alike everywhere.

A store is a local directory or an object-store URI (`s3://bucket/prefix`, `gs://...`, or any
scheme pyarrow or fsspec knows). `open_location(uri, storage_options)` returns one of two
implementations of `Location`:

- `LocalLocation`: the operating system directly, as dlstore always did: writes go to a
  temporary name, are fsynced and renamed, so a file is complete under its name or absent even
  after a power cut.
- `ObjectLocation`: a pyarrow filesystem (S3 built from the same options deltalake gets, other
  schemes from pyarrow's or fsspec's registry). Writes go to a temporary key and are then moved
  (copied) to their name: objects appear whole, so a shard is complete under its hash or absent.

The tables go through deltalake's own object-store support with `storage_options`; this module
only decides those options. On S3 they always keep Delta's safe commit (conditional put,
`If-None-Match`), never the unsafe-rename mode, so concurrent builders cannot lose a commit.
DuckDB reads an object store's Parquet files from local copies fetched through the same pyarrow
filesystem (data files never change under their name): no DuckDB extension is downloaded at run
time, and queries run at local speed once the files are here.

Keys are '/'-separated paths relative to the store's root.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from dlstore.errors import StoreError

if TYPE_CHECKING:
    from pyarrow import fs as pafs

# kept free on a local disk: table writes are refused before they would leave less
MIN_FREE = 4 << 20
# options that would switch Delta's S3 commits to a rename without mutual exclusion
_UNSAFE = ("AWS_S3_ALLOW_UNSAFE_RENAME", "S3_ALLOW_UNSAFE_RENAME", "ALLOW_UNSAFE_RENAME")


@dataclass(frozen=True)
class FileInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


class Location(ABC):
    """A store's root. `uri` names it (an absolute path for local stores); `storage_options`
    are what deltalake needs to reach it."""

    uri: str
    storage_options: dict[str, str]
    local: bool

    def url(self, key: str) -> str:
        """What deltalake opens for `key` (a table directory)."""
        return f"{self.uri.rstrip('/')}/{key}"

    def display(self, key: str) -> str:
        """`key` as a user would locate it, for messages."""
        return self.url(key)

    @abstractmethod
    def is_file(self, key: str) -> bool: ...

    def is_empty(self) -> bool:
        """True when nothing is stored under the root (or the root does not exist yet)."""
        return not self.top_level()

    @abstractmethod
    def top_level(self) -> list[str]:
        """The names of the files and folders right under the root ([] if there is none)."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def open_read(self, key: str) -> IO[bytes]: ...

    @abstractmethod
    def write_atomic(self, key: str, data: bytes, durable: bool = True) -> None:
        """Write `data` under `key` so that `key` is either complete or absent; `durable`: on
        disk before this returns (False for what costs only time to lose, as a cache)."""

    def touch(self, key: str) -> bool:
        """Mark `key` as written now, if it can be done without rewriting it (True)."""
        return False

    @contextmanager
    def exclusive(self, key: str, wait: bool) -> Iterator[bool]:
        """Hold the lock named `key` while the block runs, shared with every process on this
        store: yields True when held (`wait`: block until it is free), False when another
        holder has it, or where the store cannot lock (an object store)."""
        yield False

    def free_bytes(self) -> int | None:
        """Bytes free for writing on the store's disk; None where unknown (object stores)."""
        return None

    def check_space(self, needed: int, what: str) -> None:
        """StoreError before a write of about `needed` bytes that the disk cannot take: the
        table writer (deltalake) panics in a background thread on a full disk, printing Rust
        backtraces no Python handler can catch."""
        free = self.free_bytes()
        if free is not None and free < needed + MIN_FREE:
            raise StoreError(f"the disk holding the store {self.uri} is full ({free / 2**20:.1f} "
                             f"MiB free; {what} needs about {needed / 2**20:.1f} MiB more than "
                             f"the {MIN_FREE / 2**20:.0f} MiB kept free); free some space or "
                             "run `dlstore gc`")

    @abstractmethod
    def info(self, key: str) -> FileInfo | None:
        """Size and modification time, or None if `key` is absent."""

    @abstractmethod
    def list(self, prefix: str) -> list[FileInfo]:
        """Every file under the directory `prefix`, recursively, in key order."""

    @abstractmethod
    def remove(self, key: str) -> None: ...

    @abstractmethod
    def local_path(self, key: str) -> Path | None:
        """The file on this machine holding `key`, where there is one (local stores)."""

    @abstractmethod
    def readable_files(self, uris: list[str]) -> list[str]:
        """Paths on this machine from which DuckDB reads these table files (URIs as deltalake
        lists them)."""

    @abstractmethod
    def readable_directory(self, prefix: str) -> str:
        """The directory on this machine under which `readable_files` of the tables under
        `prefix` lie: all that the SQL sandbox lets DuckDB read."""


class LocalLocation(Location):
    local = True

    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)
        self.storage_options = {}

    def display(self, key: str) -> str:
        return str(self.root / key)

    def is_file(self, key: str) -> bool:
        return (self.root / key).is_file()

    def top_level(self) -> list[str]:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {self.root} is a file, not a directory")
        return sorted(os.listdir(self.root)) if self.root.is_dir() else []

    def read_bytes(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def open_read(self, key: str) -> IO[bytes]:
        return open(self.root / key, "rb")

    def write_atomic(self, key: str, data: bytes, durable: bool = True) -> None:
        path = self.root / key
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
            raise
        if not durable:
            return
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def exclusive(self, key: str, wait: bool) -> Iterator[bool]:
        # flock: the kernel lets go of a holder that dies, so there is no stale lock to break
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def free_bytes(self) -> int | None:
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            st = os.statvfs(folder)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def touch(self, key: str) -> bool:
        try:
            os.utime(self.root / key)
        except OSError:
            return False
        return True

    def info(self, key: str) -> FileInfo | None:
        try:
            st = (self.root / key).stat()
        except FileNotFoundError:
            return None
        return FileInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str) -> list[FileInfo]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        found = []
        for dirpath, _, names in os.walk(base):
            for name in names:
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:  # a writer's temporary file, renamed meanwhile
                    continue
                found.append(FileInfo(path.relative_to(self.root).as_posix(), st.st_size,
                                      st.st_mtime))
        return sorted(found, key=lambda f: f.key)

    def remove(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path:
        return self.root / key

    def readable_files(self, uris: list[str]) -> list[str]:
        return uris

    def readable_directory(self, prefix: str) -> str:
        return str(self.root / prefix)


class ObjectLocation(Location):
    local = False

    def __init__(self, uri: str, storage_options: dict[str, str], filesystem: pafs.FileSystem,
                 base: str):
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        self.fs = filesystem
        self.base = base.rstrip("/")  # the root as a path inside `fs`
        self.scheme = uri.split("://", 1)[0]

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def is_file(self, key: str) -> bool:
        from pyarrow import fs as pafs

        return self._call(key, lambda: self.fs.get_file_info(self._path(key)).type
                          == pafs.FileType.File)

    def top_level(self) -> list[str]:
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(self.base, allow_not_found=True)
        return sorted(f.base_name for f in self._call("", lambda: self.fs.get_file_info(selector)))

    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def open_read(self, key: str) -> IO[bytes]:
        return self._call(key, lambda: self.fs.open_input_stream(self._path(key)))

    def write_atomic(self, key: str, data: bytes, durable: bool = True) -> None:
        head, _, name = key.rpartition("/")  # an object store's put is durable when it returns
        tmp = f"{head}/" * bool(head) + f".{name}.{uuid.uuid4().hex}.tmp"

        def write() -> None:
            with self.fs.open_output_stream(self._path(tmp)) as f:
                f.write(data)
            self.fs.move(self._path(tmp), self._path(key))

        self._call(key, write)

    def info(self, key: str) -> FileInfo | None:
        from pyarrow import fs as pafs

        found = self._call(key, lambda: self.fs.get_file_info(self._path(key)))
        if found.type != pafs.FileType.File:
            return None
        return FileInfo(key, found.size, _seconds(found.mtime))

    def list(self, prefix: str) -> list[FileInfo]:
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(self._path(prefix), recursive=True, allow_not_found=True)
        found = self._call(prefix, lambda: self.fs.get_file_info(selector))
        start = len(self.base) + 1
        return sorted((FileInfo(f.path[start:], f.size, _seconds(f.mtime)) for f in found
                       if f.type == pafs.FileType.File), key=lambda f: f.key)

    def remove(self, key: str) -> None:
        try:
            self._call(key, lambda: self.fs.delete_file(self._path(key)))
        except FileNotFoundError:
            pass  # as on a local disk: already gone is removed

    def local_path(self, key: str) -> None:
        return None

    def readable_files(self, uris: list[str]) -> list[str]:
        """Local copies: Delta never rewrites a data file under its name, so a copy fetched once
        stays valid, and DuckDB then reads at local speed (the first query on a machine fetches
        the tables, later ones only files committed since)."""
        import hashlib

        paths = []
        for uri in uris:
            name = hashlib.sha256(uri.encode()).hexdigest()
            cached = cache_dir() / "tables" / name[:2] / f"{name[2:]}.parquet"
            if not cached.is_file():
                source = uri.split("://", 1)[-1]
                tmp = cached.parent / f".{cached.name}.{uuid.uuid4().hex}.tmp"
                try:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    with self._call(uri, lambda s=source: self.fs.open_input_stream(s)) as f, \
                            open(tmp, "wb") as out:
                        shutil.copyfileobj(f, out, 1 << 22)
                    os.replace(tmp, cached)
                finally:
                    tmp.unlink(missing_ok=True)
            paths.append(str(cached))
        return paths

    def readable_directory(self, prefix: str) -> str:
        return str(cache_dir() / "tables")

    def _call(self, key, action):
        try:
            return action()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StoreError(f"cannot reach {self.display(key)}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else e}"
                             ) from None


def open_location(root: str | Path, storage_options: dict[str, str] | None = None) -> Location:
    """The location of a store: a local path (or file:// URI), or an object-store URI."""
    options = dict(storage_options or {})
    text = str(root)
    if "://" not in text or text.startswith("file://"):
        if options:
            raise StoreError(f"storage options {sorted(options)} apply to object-store URIs "
                             f"(s3://...), not to the local store {text}")
        # normalised (no '..'): DuckDB's sandbox refuses paths that climb
        return LocalLocation(Path(os.path.abspath(text.removeprefix("file://"))))
    scheme = text.split("://", 1)[0].lower()
    settings = {**{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
                **{k.upper(): v for k, v in options.items()}}
    unsafe = [k for k in _UNSAFE if settings.get(k, "").lower() in ("1", "true", "yes")]
    if unsafe:
        raise StoreError(f"{unsafe[0]} lets concurrent writers overwrite each other's table "
                         "commits; dlstore keeps Delta's conditional-put commits on S3")
    if scheme in ("s3", "s3a"):
        return _s3_location(text, options, settings)
    return _other_location(text, options)


def _s3_location(uri: str, options: dict[str, str], settings: dict[str, str]) -> ObjectLocation:
    from pyarrow import fs as pafs

    endpoint = _first(settings, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT",
                      "ENDPOINT_URL", "ENDPOINT")
    delta = dict(options)
    # Delta commits on S3 write each log entry with If-None-Match (the default in deltalake 1.x;
    # said explicitly so that no environment setting can turn it into an unsafe rename)
    if _first({k.upper(): v for k, v in options.items()}, "CONDITIONAL_PUT",
              "AWS_CONDITIONAL_PUT") is None:
        delta["conditional_put"] = "etag"
    kwargs: dict = {
        "access_key": _first(settings, "AWS_ACCESS_KEY_ID", "ACCESS_KEY_ID"),
        "secret_key": _first(settings, "AWS_SECRET_ACCESS_KEY", "SECRET_ACCESS_KEY"),
        "session_token": _first(settings, "AWS_SESSION_TOKEN", "AWS_TOKEN", "SESSION_TOKEN",
                                "TOKEN"),
        "region": _first(settings, "AWS_REGION", "AWS_DEFAULT_REGION", "REGION"),
    }
    if endpoint is not None:
        scheme, _, host = endpoint.rpartition("://")
        kwargs["endpoint_override"] = host.rstrip("/")
        kwargs["scheme"] = scheme or "https"
        if scheme == "http" and _first(settings, "AWS_ALLOW_HTTP", "ALLOW_HTTP") is None:
            delta["allow_http"] = "true"
    if kwargs["access_key"] is None or kwargs["secret_key"] is None:
        kwargs.pop("access_key"), kwargs.pop("secret_key")  # the SDK's own credential chain
    try:
        filesystem = pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})
    except (OSError, ValueError, TypeError) as e:
        raise StoreError(f"cannot configure S3 for {uri}: {e}") from None
    return ObjectLocation(uri, delta, filesystem, uri.split("://", 1)[1])


def _other_location(uri: str, options: dict[str, str]) -> ObjectLocation:
    from pyarrow import fs as pafs

    try:
        filesystem, base = pafs.FileSystem.from_uri(uri)
    except (pafs.ArrowInvalid, OSError, ValueError):
        try:
            import fsspec

            spec_fs, base = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError, OSError) as e:
            raise StoreError(f"no filesystem for the store URI {uri}: {e}") from None
        filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(spec_fs))
    return ObjectLocation(uri, options, filesystem, base)


def cache_dir() -> Path:
    """Where copies of object-store files are kept on this machine ($DLSTORE_CACHE)."""
    root = os.environ.get("DLSTORE_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlstore"
    return Path(root)


def _first(settings: dict[str, str], *names: str) -> str | None:
    return next((settings[n] for n in names if settings.get(n)), None)


def _seconds(mtime) -> float:
    return mtime.timestamp() if mtime is not None else time.time()
