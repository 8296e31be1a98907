"""Off the training thread: the next global batch built in the background (pinned on CUDA), and the optimizer kernel chosen up front."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch


class Prefetcher:
    """A train stream whose next batch is built in a background thread while the current step runs.

    It reads like the stream it wraps (``next_batch``, ``state_dict``,
    ``position``, ``load_state_dict``, ``describe``), and its state is the
    consumer's: after ``next_batch`` returned batch b, ``state_dict()`` is the
    stream's state right after b, whatever the thread has built since. With
    ``pin`` the micro-batches are copied to page-locked memory, so the
    engine's ``.to(device, non_blocking=True)`` overlaps the copy.
    """

    def __init__(self, stream, *, pin: bool = False):
        self.stream = stream
        self.pin = pin
        self._state = stream.state_dict()
        self._position = stream.position
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clova-prefetch")
        self._next: Future | None = None

    def _build(self):
        batch = self.stream.next_batch()
        if self.pin:
            batch = [mb.pin_memory() for mb in batch]
        return batch, self.stream.state_dict(), self.stream.position

    def next_batch(self) -> list[torch.Tensor]:
        ahead = self._next or self._pool.submit(self._build)
        batch, self._state, self._position = ahead.result()
        self._next = self._pool.submit(self._build)
        return batch

    def _drain(self) -> None:
        if self._next is not None:
            self._next.result()
            self._next = None

    def state_dict(self) -> dict:
        return dict(self._state)

    @property
    def position(self) -> int:
        return self._position

    def load_state_dict(self, state: dict) -> None:
        self._drain()
        self.stream.load_state_dict(state)
        self._state, self._position = self.stream.state_dict(), self.stream.position

    def describe(self, state: dict) -> str:
        return self.stream.describe(state)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


FUSED_ADAM_FIX = "DS_BUILD_FUSED_ADAM=1 pip install --no-build-isolation --force-reinstall --no-deps deepspeed (`make install` does this when nvcc is on PATH)"


def _stale_extension_lock() -> Path | None:
    """A lock torch left in its extensions dir for fused_adam: a JIT build would wait on it forever."""
    from torch.utils.cpp_extension import _get_build_directory

    try:
        lock = Path(_get_build_directory("fused_adam", verbose=False)) / "lock"
    except Exception:  # noqa: BLE001 - no extensions dir is no lock
        return None
    return lock if lock.exists() else None


def optimizer_kernel(ds_config: dict, cuda: bool) -> str:
    """Decide which Adam kernel runs, before DeepSpeed builds it; one line saying which (and, if needed, how to get FusedAdam).

    On CUDA DeepSpeed's FusedAdam is used when its op is pre-built, or can be
    JIT-compiled (nvcc present, no stale build lock). Otherwise the config
    switches to torch's fused AdamW, which needs no compiler, rather than
    hang or crash on the first step. CPU runs keep torch's AdamW.
    """
    params = ds_config["optimizer"]["params"]
    if not cuda or params.get("torch_adam"):
        return "optimizer: torch AdamW" + (" (fused)" if params.get("fused") else "")
    zero = ds_config.get("zero_optimization") or {}
    if (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme"):
        return "optimizer: DeepSpeed CPU Adam (optimizer state offloaded)"
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("fused_adam"):
        return "optimizer: DeepSpeed FusedAdam (pre-built op)"
    lock = _stale_extension_lock()
    nvcc = shutil.which("nvcc") or (os.environ.get("CUDA_HOME") and shutil.which(str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")))
    if nvcc and lock is None:
        return f"optimizer: DeepSpeed FusedAdam, JIT-compiled with {nvcc} on first use (pre-build it once: {FUSED_ADAM_FIX})"
    params.update(torch_adam=True, fused=True)
    why = f"a stale build lock {lock} would hang its JIT build (delete it)" if lock else "it is not pre-built and there is no nvcc to compile it"
    return f"optimizer: torch fused AdamW, because DeepSpeed FusedAdam cannot load: {why}; to fix: {FUSED_ADAM_FIX}"
