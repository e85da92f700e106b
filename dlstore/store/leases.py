"""Build leases: what keeps `gc` from removing the shards of a build in progress.

A build writes its shards as checkpoints arrive but references them only when it commits its
cohorts, so for a while its shards look like garbage. Before it writes any shard a build takes a
lease, `leases/<id>.json` (its zoo, host, pid, start time and a heartbeat), renewed by a thread
every `RENEW_SECONDS`; the lease is removed when the build ends. A lease whose heartbeat is older
than `TTL_SECONDS` is dead (its process was killed). `gc` spares every unreferenced shard
written after the start of the oldest live lease, whatever `--older-than` says.

A build stopped for longer than the TTL (suspended, say) may find on waking that gc removed its
shards: before it commits, the committer checks that every shard its rows point to still exists
and leaves out the runs whose shards are gone (a rebuild trains them again).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from dlstore.errors import StoreError
from dlstore.store.location import Location

PREFIX = "leases"
RENEW_SECONDS = 15.0
TTL_SECONDS = 120.0


class BuildLease:
    """`with BuildLease(location, zoo):` holds a lease for the block's duration."""

    def __init__(self, location: Location, zoo: str, renew_seconds: float = RENEW_SECONDS):
        self.location = location
        self.key = f"{PREFIX}/{uuid.uuid4().hex}.json"
        self.started = time.time()
        self.body = {"zoo": zoo, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": self.started}
        self.renew_seconds = renew_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BuildLease:
        try:
            self._write()
        except OSError as e:
            raise StoreError(f"cannot write a build lease to {self.location.display(PREFIX)}: "
                             f"{e.strerror or e}") from None
        self._thread = threading.Thread(target=self._renew, name="dlstore-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.location.remove(self.key)
        except OSError:
            pass  # a lease left behind dies by its heartbeat

    def _write(self) -> None:
        self.location.write_atomic(self.key, json.dumps(
            {**self.body, "heartbeat": time.time()}).encode())

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            try:
                self._write()
            except OSError:
                pass  # tried again at the next beat; gc spares shards until the TTL passes


def live_leases(location: Location, now: float | None = None) -> list[dict]:
    """The leases of builds still alive (heartbeat within the TTL), oldest first."""
    now = time.time() if now is None else now
    found = []
    for info in location.list(PREFIX):
        try:
            body = json.loads(location.read_bytes(info.key))
            beat = float(body.get("heartbeat", info.mtime))
        except (OSError, ValueError, TypeError, AttributeError):
            # being written, or damaged: its file's age decides
            body, beat = {"started": info.mtime}, info.mtime
        if now - beat <= TTL_SECONDS:
            found.append(body)
    return sorted(found, key=lambda b: float(b.get("started", 0)))
