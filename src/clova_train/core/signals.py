"""SIGTERM handled like Ctrl-C by long single-process commands, and the one-line error both end with."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from clova_train.core.errors import ClovaError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so the same cleanup runs."""


class Interrupted(ClovaError):
    """A command stopped by Ctrl-C or SIGTERM after cleaning up; exits 130 like an interrupted shell command."""

    exit_code = 130


def signal_name(e: BaseException) -> str:
    return "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; a second must not cut the cleanup short
        raise Terminated()

    before = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
