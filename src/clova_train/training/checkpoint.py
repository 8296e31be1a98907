"""Checkpoints that become visible only when complete, with the RNG and sampler state to resume exactly."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from clova_train.core.errors import ClovaError
from clova_train.core.files import atomic_write_json, atomic_write_text, fsync_path
from clova_train.training.distributed import CollectiveError
from clova_train.training.rundir import CHECKPOINT_DIR, LATEST_FILE, MARKER_FILE
from clova_train.training.trust import check_checkpoint_files


class Faults:
    """Fault injection for the fault-tolerance tests, from CLOVA_FAULT (e.g. "kill_at_step=6;nan_at_steps=3,4").

    kill_at_step=N: rank 0 kills itself (SIGKILL) after step N is logged.
    kill_in_save=N: rank 0 kills itself after DeepSpeed wrote step N's files, before the completion marker.
    nan_at_steps=A,B: every rank's loss becomes NaN at those steps.
    """

    def __init__(self, spec: str | None = None):
        spec = os.environ.get("CLOVA_FAULT", "") if spec is None else spec
        self.kill_at_step = self.kill_in_save = None
        self.nan_at_steps: set[int] = set()
        for item in filter(None, (s.strip() for s in spec.split(";"))):
            key, _, value = item.partition("=")
            if key == "kill_at_step":
                self.kill_at_step = int(value)
            elif key == "kill_in_save":
                self.kill_in_save = int(value)
            elif key == "nan_at_steps":
                self.nan_at_steps = {int(v) for v in value.split(",") if v}
            else:
                raise ClovaError(f"CLOVA_FAULT: unknown fault {key!r}")

    @staticmethod
    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fsync_tree(directory: Path, rank: int, world: int) -> None:
    """Make a checkpoint durable before it is marked complete; the ranks share the files."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for p in files[rank::world]:
        fsync_path(p)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    """DeepSpeed checkpoints that become visible only when complete.

    Save: DeepSpeed writes RUN_DIR/checkpoints/<tag>/ (every rank its shards),
    all ranks fsync and meet, then rank 0 writes the completion marker and
    only then points ``latest`` at the tag (both atomically). A kill at any
    moment leaves ``latest`` on a complete checkpoint. Load takes the newest
    tag that has the marker, whatever ``latest`` says.
    """

    def __init__(self, run_dir: Path, engine, *, rank: int, world: int, keep_last: int, faults: Faults | None = None):
        self.dir = run_dir / CHECKPOINT_DIR
        self.engine = engine
        self.rank = rank
        self.world = world
        self.keep_last = keep_last
        self.faults = faults or Faults("")

    @staticmethod
    def complete(directory: Path) -> list[tuple[int, str]]:
        """(step, tag) of every complete checkpoint, oldest first."""
        out = []
        if directory.is_dir():
            for marker in directory.glob(f"step_*/{MARKER_FILE}"):
                try:
                    info = json.loads(marker.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError):
                    continue  # a marker is written atomically; an unreadable one is not ours
                out.append((int(info["step"]), marker.parent.name))
        return sorted(out)

    def latest(self) -> str | None:
        """The newest complete tag, as rank 0 sees it (every rank gets the same answer)."""
        import torch.distributed as td

        done = self.complete(self.dir) if self.rank == 0 else []
        found = [done[-1][1] if done else None]
        td.broadcast_object_list(found, src=0)
        return found[0]

    def save(self, step: int, client_state: dict, marker: dict) -> str:
        import torch.distributed as td

        tag = tag_for(step)
        target = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if target.exists():  # left by a save that was killed; never marked, never loaded
                shutil.rmtree(target)
        td.barrier()
        self.engine.save(self.dir, tag, client_state)
        _fsync_tree(target, self.rank, self.world)
        td.barrier()
        if self.rank == 0:
            if self.faults.kill_in_save == step:
                self.faults.kill()
            atomic_write_json(target / MARKER_FILE, {"tag": tag, **marker})
            fsync_path(target)
            atomic_write_text(self.dir / LATEST_FILE, tag)
            fsync_path(self.dir)
            self.prune()
        td.barrier()
        return tag

    def prune(self) -> None:
        """Drop unmarked leftovers, and complete checkpoints beyond --keep-last (oldest first)."""
        complete = self.complete(self.dir)
        marked = {tag for _, tag in complete}
        for d in self.dir.glob("step_*"):
            if d.is_dir() and d.name not in marked:
                shutil.rmtree(d, ignore_errors=True)
        if self.keep_last:
            for _, tag in complete[: -self.keep_last]:
                shutil.rmtree(self.dir / tag, ignore_errors=True)

    def load(self, tag: str) -> dict:
        check_checkpoint_files(self.dir / tag, rank=self.rank, world=self.world)
        client = self.engine.load(self.dir, tag)
        if "clova" not in client:
            raise CollectiveError(f"{self.dir / tag}: not written by clova train (no client state)")
        return client["clova"]


def newest_checkpoint(run_dir: Path) -> dict | None:
    """The completion marker of the newest complete checkpoint, or None."""
    complete = Checkpointer.complete(run_dir / CHECKPOINT_DIR)
    if not complete:
        return None
    return json.loads((run_dir / CHECKPOINT_DIR / complete[-1][1] / MARKER_FILE).read_text(encoding="utf-8"))
