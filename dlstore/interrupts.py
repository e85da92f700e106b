"""Ctrl-C and SIGTERM during a build: one path for both, and commits they cannot cut in half.

SIGTERM's default action ends the process where it stands, losing every finished cohort not yet
committed; `sigterm_as_interrupt` turns it into the exception Ctrl-C raises, so a terminated
build keeps what it finished exactly as an interrupted one does. `deferred_interrupts` holds
both signals while a commit runs, so that a commit finishes (or, on a second signal, stops) and
is never retried with rows it may already have written.

Signal handlers can only be changed from the main thread; elsewhere both helpers do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python handles signals, as Ctrl-C raises KeyboardInterrupt."""

    exit_code = 128 + signal.SIGTERM


def exit_code(stop: BaseException) -> int:
    """The shell's status for a process stopped by `stop`: 128 + the signal's number."""
    return getattr(stop, "exit_code", 128 + signal.SIGINT)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install(handlers: dict[int, object]) -> None:
    for signum, handler in handlers.items():
        # None: a handler not installed from Python; the default is the closest we can restore
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (a KeyboardInterrupt)."""
    if not _main_thread():
        yield
        return

    def terminate(signum, frame) -> None:
        raise Terminated()

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, terminate)}
    try:
        yield
    finally:
        _install(previous)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver the first one to the handler
    that was in place. A second signal meanwhile is delivered at once: whoever presses Ctrl-C
    twice wants out, and what the block leaves half-done must then be harmless (a commit's rows
    are invisible until its runs rows are written)."""
    if not _main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    held: list[int] = []
    delivered = []

    def hold(signum, frame) -> None:
        if held:
            _install(previous)
            delivered.append(signum)
            signal.raise_signal(signum)
        held.append(signum)

    for signum in SIGNALS:
        signal.signal(signum, hold)
    try:
        yield
    finally:
        _install(previous)
        if held and not delivered:
            signal.raise_signal(held[0])
