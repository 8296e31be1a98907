"""How `clova tokenize` ends when it cannot finish: interrupted, out of space, or with nothing usable."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from clova_train.core.errors import ClovaError
from clova_train.shards.format import prefix_files


@contextlib.contextmanager
def worker_pool(ctx, workers: int, initializer: Callable, initargs: tuple):
    """A pool whose workers finish their batch and exit (close + join), never terminated mid-task: a worker
    killed while it holds the task queue's lock hangs the pool's cleanup (a SIGTERM to the process group did)."""
    # Workers are born with SIGINT/SIGTERM blocked (the mask is inherited by fork, also by the forks the pool's
    # handler thread makes later) and ignore them from their initializer on, so a signal sent to the process
    # group just as they start cannot kill one half-started; this process gets its pending signal on unblocking.
    stop = {signal.SIGINT, signal.SIGTERM}
    # The unblocking sits inside the try that closes and joins: a signal pending since the fork is raised
    # there, and a pool left to its finalizer would hang, since that terminates workers that ignore SIGTERM.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        pool = ctx.Pool(workers, initializer=_ignoring_stop, initargs=(initializer, initargs))
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        yield pool
    finally:
        pool.close()
        try:
            pool.join()
        except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM while the batches in flight finish: stop now
            for p in mp.active_children():
                p.kill()
            os._exit(130)


def _ignoring_stop(initializer: Callable, initargs: tuple) -> None:
    """In a worker: Ctrl-C and SIGTERM are the main process's to handle (it closes the pool), then the real initializer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # discards one that arrived while blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    initializer(*initargs)


def note(line: str) -> None:
    print(line, file=sys.stderr)


def drop_unrecorded(out_dir: Path, progress_file: str, is_ours: Callable[[str], bool]) -> int:
    """Remove shard and temporary files the progress file does not list (a write cut short); the number kept."""
    try:
        state = json.loads((out_dir / progress_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    keep = {f.name for rec in state.get("shards", []) for f in prefix_files(out_dir / rec["prefix"])}
    for f in out_dir.iterdir():
        if f.name not in keep and is_ours(f.name):
            f.unlink(missing_ok=True)
    return len(state.get("shards", []))


def check_usable(report: dict, out_dir: Path) -> None:
    """Raise unless the run wrote at least one training document; the message gives the skips by reason."""
    train = report["split"]["train"]["documents"]
    if train:
        return
    read, skipped = report["documents_read"], report["skipped"]
    if not read:
        why = "the inputs hold no documents (empty files?)"
    elif skipped["total"]:
        reasons = ", ".join(f"{reason}: {n:,}" for reason, n in skipped["by_reason"].items())
        where = next((ex[0] for ex in skipped["examples"].values() if ex), None)
        why = f"all {read:,} document(s) read were skipped ({reasons}{'; e.g. ' + where if where else ''})"
    else:
        valid = report["split"]["valid"]["documents"]
        why = f"all {valid:,} document(s) went to the validation split; lower --valid-fraction or add text"
    raise ClovaError(f"{out_dir}: no training document written: {why}; fix the inputs and tokenize into a new --out")
