"""Checkpoints that become visible only when complete, with the RNG and sampler state to resume exactly."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from clova_train.core.errors import ClovaError
from clova_train.core.files import atomic_write_json, atomic_write_text, fsync_path
from clova_train.training.parallel.distributed import CollectiveError, lost_peer_reason
from clova_train.training.checkpoints.markers import complete_steps, read_marker, read_markers
from clova_train.training.rundir import CHECKPOINT_DIR, LATEST_FILE, MARKER_FILE
from clova_train.training.checkpoints.trust import check_checkpoint_files


class Faults:
    """Fault injection for the fault-tolerance tests, from CLOVA_FAULT (e.g. "kill_at_step=6;nan_at_steps=3,4").

    kill_at_step=N: rank 0 kills itself (SIGKILL) after step N is logged.
    kill_in_save=N: rank 0 kills itself after DeepSpeed wrote step N's files, before the completion marker.
    full_in_save=N: the last rank's disk is full (ENOSPC) after DeepSpeed wrote step N's files.
    nan_at_steps=A,B: every rank's loss becomes NaN at those steps.
    """

    def __init__(self, spec: str | None = None):
        spec = os.environ.get("CLOVA_FAULT", "") if spec is None else spec
        self.kill_at_step = self.kill_in_save = self.full_in_save = None
        self.nan_at_steps: set[int] = set()
        for item in filter(None, (s.strip() for s in spec.split(";"))):
            key, _, value = item.partition("=")
            if key == "kill_at_step":
                self.kill_at_step = int(value)
            elif key == "kill_in_save":
                self.kill_in_save = int(value)
            elif key == "full_in_save":
                self.full_in_save = int(value)
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


class PeerLost(ClovaError):
    """This rank's collective failed because a peer exited: said in one line, but the peer's exit (a kill, a user error) is the run's."""

    exit_code = 1


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode()


def rng_to_json(state: dict) -> dict:
    """An RNG state as JSON (read back without unpickling anything); the generators' words as base64."""
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return {
        "python": [version, _b64(np.asarray(internal, dtype=np.uint32)), gauss],
        "numpy": [kind, _b64(np.asarray(keys, dtype=np.uint32)), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(state["torch"].numpy()),
        "cuda": [_b64(t.numpy()) for t in state["cuda"]] if state.get("cuda") is not None else None,
    }


def rng_from_json(d: dict) -> dict:
    words = lambda s, dtype: np.frombuffer(base64.b64decode(s), dtype=dtype)  # noqa: E731
    tensor = lambda s: torch.from_numpy(words(s, np.uint8).copy())  # noqa: E731
    version, internal, gauss = d["python"]
    kind, keys, pos, has_gauss, cached = d["numpy"]
    return {
        "python": (version, tuple(int(w) for w in words(internal, np.uint32)), gauss),
        "numpy": (kind, words(keys, np.uint32).copy(), pos, has_gauss, cached),
        "torch": tensor(d["torch"]),
        "cuda": [tensor(s) for s in d["cuda"]] if d.get("cuda") is not None else None,
    }


def rng_file(rank: int) -> str:
    """Each rank's own RNG state, beside DeepSpeed's files (which only some ranks write under pipeline parallelism)."""
    return f"clova_rng_rank_{rank:05d}.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class _Recorder:
    """DeepSpeed's checkpoint engine, noting every file this rank writes (to fsync them, and to count the bytes)."""

    def __init__(self, inner):
        self.inner, self.paths = inner, []

    def save(self, state_dict, path):
        self.paths.append(Path(path))
        return self.inner.save(state_dict, path)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def damage(directory: Path, marker: dict) -> str | None:
    """What is wrong with a complete checkpoint's files, by the sizes its marker recorded; None when intact."""
    for name, size in (marker.get("files") or {}).items():
        path = directory / name
        try:
            got = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if got != size:
            return f"{path} has {got:,} bytes, the completion marker recorded {size:,}"
    return None


class Checkpointer:
    """DeepSpeed checkpoints that become visible only when complete.

    Save: DeepSpeed writes RUN_DIR/checkpoints/<tag>/ (every rank its shards)
    and each rank its RNG state; each rank fsyncs the files it wrote (on
    Lustre or NFS an fsync of another node's file makes nothing durable),
    all meet, then rank 0 writes the completion marker (with every file's
    size) and only then points ``latest`` at the tag (both atomically). A
    kill at any moment leaves ``latest`` on a complete checkpoint. Load takes
    the newest tag that has the marker, whatever ``latest`` says.
    """

    def __init__(self, run_dir: Path, engine, *, rank: int, world: int, keep_last: int, keep_every: int = 0,
                 faults: Faults | None = None):
        self.dir = run_dir / CHECKPOINT_DIR
        self.engine = engine
        self.rank = rank
        self.world = world
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.faults = faults or Faults("")

    @staticmethod
    def markers(directory: Path) -> tuple[list[tuple[int, str]], set[str]]:
        """(step, tag) of every complete checkpoint, oldest first; and the tags whose marker exists but did not read."""
        markers, unread = read_markers(directory)
        return complete_steps(markers), unread

    @classmethod
    def complete(cls, directory: Path) -> list[tuple[int, str]]:
        """(step, tag) of every complete checkpoint, oldest first."""
        return cls.markers(directory)[0]

    def marker(self, tag: str) -> dict:
        return read_marker(self.dir, tag)

    def latest(self, resume_step: int | None = None) -> str | None:
        """The tag to resume from, as rank 0 decides it (every rank gets the same answer, or the same error).

        The newest complete checkpoint, if its files have the sizes its marker
        recorded; a damaged one is named, and the run continues from an older
        one only when asked (``--resume-step N``), which discards the newer ones.
        """
        import torch.distributed as td

        found: list = [None, None]
        if self.rank == 0:
            try:
                found[0] = self._choose(resume_step)
            except ClovaError as e:
                found[1] = str(e)
        td.broadcast_object_list(found, src=0)
        if found[1]:
            raise CollectiveError(found[1])
        return found[0]

    def _choose(self, resume_step: int | None) -> str | None:
        self.prune()  # unmarked leftovers of a save that was cut short go first
        done = self.complete(self.dir)
        damaged = {t: self._damage(t) for _, t in done}
        intact = [(s, t) for s, t in done if damaged[t] is None]
        if resume_step is None:
            if not done:
                return None
            step, tag = done[-1]
            why = damaged[tag]
            if why is None:
                return tag
            older = f"the newest intact one is step {intact[-1][0]}: continue from it with --resume-step {intact[-1][0]}" if intact else "no older checkpoint is intact: start a new --out"
            raise ClovaError(f"checkpoint {tag} is damaged ({why}); {older} (later checkpoints are then discarded)")
        chosen = [t for s, t in intact if s == resume_step]
        if not chosen:
            steps = ", ".join(str(s) for s, _ in intact) or "none"
            raise ClovaError(f"{self.dir}: no intact complete checkpoint at step {resume_step}; intact steps: {steps}")
        for s, t in done:
            if s > resume_step:  # another trajectory now; a restart must not return to it
                shutil.rmtree(self.dir / t)
        return chosen[0]

    def _damage(self, tag: str) -> str | None:
        try:
            return damage(self.dir / tag, self.marker(tag))
        except (OSError, ValueError) as e:
            return f"its marker did not read: {e}"

    def save(self, step: int, client_state: dict, marker: dict) -> dict:
        """Write checkpoint ``step``; returns its tag, the seconds it took and its bytes on disk (all ranks)."""
        import torch.distributed as td

        tag = tag_for(step)
        target = self.dir / tag
        t0 = time.perf_counter()
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if target.exists():  # left by a save that was killed; never marked, never loaded
                shutil.rmtree(target)
        td.barrier()
        ds = self.engine.ds
        recorder = ds.checkpoint_engine = _Recorder(ds.checkpoint_engine)
        with self._failures(tag):
            try:
                self.engine.save(self.dir, tag, client_state)
            finally:
                ds.checkpoint_engine = recorder.inner
            mine = [*recorder.paths, target / rng_file(self.rank)]
            atomic_write_json(mine[-1], rng_to_json(rng_state()))
            for p in mine:
                fsync_path(p)
            if self.faults.full_in_save == step and self.rank == self.world - 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(mine[0]))
            td.barrier()
            if self.rank == 0:
                if self.faults.kill_in_save == step:
                    self.faults.kill()
                files = {p.name: p.stat().st_size for p in sorted(target.iterdir()) if p.is_file()}
                atomic_write_json(target / MARKER_FILE, {"tag": tag, **marker, "files": files})
                fsync_path(target)
                atomic_write_text(self.dir / LATEST_FILE, tag)
                fsync_path(self.dir)
                self.prune()
            td.barrier()
        nbytes = torch.tensor([sum(p.stat().st_size for p in mine)], dtype=torch.float64)
        td.all_reduce(nbytes)
        return {"tag": tag, "seconds": time.perf_counter() - t0, "bytes": int(nbytes.item())}

    @contextlib.contextmanager
    def _failures(self, tag: str):
        """A full disk, or a peer that left mid-save, as one line per rank: what is intact and how to go on.

        The unfinished tag has no completion marker, so nothing loads it, and the
        next start deletes it (``prune``).
        """
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            what = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
            raise ClovaError(f"{e.filename or self.dir / tag}: {what} while saving checkpoint {tag}; {self._intact()}; "
                             f"free space (or lower --keep-last) and rerun with --resume") from None
        except RuntimeError as e:  # gloo/NCCL: a peer rank exited mid-save (its own line says why), or hung
            if "clova" in type(e).__module__:
                raise
            why = lost_peer_reason(e, during=" while saving") or "another rank stopped while saving (its line says why)"
            raise PeerLost(f"checkpoint {tag} not saved: {why}; {self._intact()}") from None

    def _intact(self) -> str:
        done = self.complete(self.dir)
        return f"checkpoint {done[-1][1]} is complete and intact, --resume continues from it" if done else "no checkpoint is complete yet"

    def prune(self) -> None:
        """Drop unmarked leftovers, and complete checkpoints beyond --keep-last (oldest first) that are no --keep-every milestone.

        A checkpoint whose marker exists but could not be read is kept (a
        transient read error must not cost a complete checkpoint), and so is
        the newest complete one, whatever the settings.
        """
        complete, unread = self.markers(self.dir)
        marked = {tag for _, tag in complete} | unread
        for d in self.dir.glob("step_*"):
            if d.is_dir() and d.name not in marked and not (d / MARKER_FILE).exists():
                shutil.rmtree(d, ignore_errors=True)
        if self.keep_last:
            for step, tag in complete[: -self.keep_last]:
                if not (self.keep_every and step % self.keep_every == 0):
                    shutil.rmtree(self.dir / tag, ignore_errors=True)

    def load(self, tag: str) -> dict:
        """The run's state from checkpoint ``tag`` of this very layout (DeepSpeed loads the shards), with this rank's RNG."""
        check_checkpoint_files(self.dir / tag, rank=self.rank, world=self.world)  # before DeepSpeed's torch.load
        client = self.engine.load(self.dir, tag)
        if "clova" not in client:
            raise CollectiveError(f"{self.dir / tag}: not written by clova train (no client state)")
        state = dict(client["clova"])
        path = self.dir / tag / rng_file(self.rank)
        if "rng" not in state:
            state["rng"] = rng_from_json(json.loads(path.read_text(encoding="utf-8")))
        elif isinstance(state["rng"], list):  # written before each rank kept its own
            state["rng"] = state["rng"][self.rank]
        return state
