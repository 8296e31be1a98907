"""Small file helpers: hashing and writes that become visible only when complete."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a directory's files in sorted order (names included)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0")
            _update(h, f, chunk)
    else:
        _update(h, path, chunk)
    return h.hexdigest()


def _update(h, path: Path, chunk: int) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)


def fsync_path(path: str | Path) -> None:
    """fsync a file's data, or a directory's entries (so renames inside it survive a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: str | Path, suffix: str = "") -> Path:
    """Where a file or directory is written before it becomes visible: ``.NAME.tmp-PID[suffix]`` beside it.

    The one pattern every writer uses, so a rerun can recognise (and remove) what a killed one left.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` is a :func:`tmp_name` (of any process)."""
    return name.startswith(".") and ".tmp-" in name


def remove_dead_tmp(path: str | Path) -> None:
    """Remove the :func:`tmp_name` files or dirs of ``path`` whose writing process is gone (killed runs)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1].split(".")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def commit_file(tmp: str | Path, final: str | Path) -> None:
    """fsync then rename: the final name only ever holds a complete file."""
    fsync_path(tmp)
    os.replace(tmp, final)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary name, fsync, rename: readers never see half a file (nor its temporary, on failure)."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        commit_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_disk_full(e: BaseException) -> bool:
    """A write failed for want of space or quota (ENOSPC, EDQUOT): the user frees space and reruns."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished temporary directory into place, replacing an older one."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
