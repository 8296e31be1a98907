"""One writer per directory: an exclusive lock file that names the pid and host holding it.

``fcntl.flock`` does the locking (the kernel drops it when its process dies,
however it dies); the file's text, ``pid host``, tells a second writer who
holds it. Some cluster filesystems keep flock per node, so a lock left by a
process of another host that did not release it is refused, not guessed at.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Callable

from clova_train.core.errors import ClovaError

LOCK_FILE = ".clova.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(text: str) -> tuple[int, str] | None:
    pid, _, host = text.strip().partition(" ")
    return (int(pid), host) if pid.isdigit() and host else None


class DirLock:
    """``with DirLock(lock_path, what):`` the holder writes there; a second one fails at once naming the holder.

    ``what`` is the command, for the message ("clova tokenize"); ``note`` receives the line said when a
    dead process's lock is taken over.
    """

    def __init__(self, path: str | Path, what: str, note: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.what = what
        self.note = note or (lambda line: None)
        self._fd = -1
        self._created = False

    def __enter__(self) -> "DirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise ClovaError(f"{self.path.parent}: is a file; --out must be a directory")
        self._created = not self.path.parent.exists()  # removed again if it stays empty (a refused command)
        me = f"{os.getpid()} {socket.gethostname()}"
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ClovaError(f"{self.path}: cannot create the lock file ({e.strerror}); the output directory must be writable") from None
            try:
                flocked = self._flock(fd)
                held = _holder(os.pread(fd, 256, 0).decode("utf-8", "replace"))
                here = socket.gethostname()
                if held and held != (os.getpid(), here) and (not flocked or held[1] != here):
                    # Without flock (or with one that may be per node) only a same-host pid that is gone is stale.
                    if held[1] != here or _alive(held[0]):
                        raise self._busy(held)
                if held and held != (os.getpid(), here):
                    self.note(f"{self.path}: taking over the lock of pid {held[0]} on {held[1]}, which is gone")
                # Another writer may have removed and recreated the file between our open and flock.
                if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    try:
                        os.ftruncate(fd, 0)
                        os.pwrite(fd, me.encode(), 0)
                        os.fsync(fd)
                    except OSError as e:  # a full disk, most likely
                        raise ClovaError(f"{self.path}: cannot write the lock file ({e.strerror}); free space and rerun") from None
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _flock(self, fd: int) -> bool:
        """True when the flock is ours; False when the filesystem cannot flock (the text alone decides then)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            raise self._busy(_holder(os.pread(fd, 256, 0).decode("utf-8", "replace"))) from None
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                return False
            raise

    def _busy(self, held: tuple[int, str] | None) -> ClovaError:
        who = f"pid {held[0]} on host {held[1]}" if held else "another process"
        gone = (
            f"; if that process is gone (it ran on another host, so this one cannot tell), remove {self.path}"
            if held and held[1] != socket.gethostname() else ""
        )
        return ClovaError(f"{self.path.parent}: another {self.what} ({who}) is writing here; wait for it or use another directory{gone}")

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            os.unlink(self.path)  # while still flocked: a waiting opener sees the inode change and retries
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = -1
        if self._created:
            try:
                self.path.parent.rmdir()
            except OSError:
                pass  # not empty: the command wrote its output


def dir_lock(directory: str | Path, what: str, note: Callable[[str], None] | None = None, *, beside: bool = False) -> DirLock:
    """The lock of an output directory: ``DIR/.clova.lock``, or ``.DIR.lock`` beside it for a directory that is
    replaced whole when it is done (``clova export``)."""
    directory = Path(directory)
    path = directory.with_name(f".{directory.name}.lock") if beside else directory / LOCK_FILE
    return DirLock(path, what, note)
