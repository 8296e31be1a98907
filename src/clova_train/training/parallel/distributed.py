"""Processes: joining the process group, the accelerator, and the one error every rank raises alike."""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

from clova_train.core.errors import ClovaError


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def quiet_deepspeed() -> None:
    """DeepSpeed logs every config key at INFO; our progress line says what matters."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor).*")
    # The pipeline engine's p2p broadcasts run inside autograd; its gradients are checked against ZeRO-3 in the tests.
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")


def select_accelerator() -> None:
    """Pin DeepSpeed to the CPU accelerator when there is no GPU (it must be set before the import)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


DEFAULT_COLLECTIVE_TIMEOUT = 1800  # seconds; DeepSpeed's own default


def collective_timeout(env=None) -> timedelta:
    """How long a rank waits in one collective for a peer (CLOVA_COLLECTIVE_TIMEOUT seconds, default 30 minutes).

    A peer that dies closes its sockets and its partners fail at once; a
    node that hangs or drops off the network answers nothing, and only this
    bounds the wait. It must outlast the slowest checkpoint save.
    """
    env = os.environ if env is None else env
    raw = env.get("CLOVA_COLLECTIVE_TIMEOUT", "")
    if not raw:
        return timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise ClovaError(f"CLOVA_COLLECTIVE_TIMEOUT={raw!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


# Launchers name a node's process count differently: torchrun, DeepSpeed's launcher, Slurm.
LOCAL_WORLD_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


def local_layout(env, device_count: int, world: int) -> tuple[int, int, int]:
    """(local rank, local world size, CUDA device index) from a launcher's environment.

    The device is ``local_rank % device_count``: under Slurm's one-GPU-per-task
    binding every task sees a single device 0. Slurm writes
    SLURM_NTASKS_PER_NODE as "8" or, on uneven nodes, "8(x2),4"; the first
    count is this layout's. Without any of them, all ranks share one node.
    """
    local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    local_world = world
    for var in LOCAL_WORLD_VARS:
        value = str(env.get(var, "")).strip()
        if value:
            local_world = int(value.split("(")[0].split(",")[0])
            break
    return local_rank, local_world, local_rank % device_count if device_count else 0


def init_distributed() -> Dist:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (set by the launcher, see launch.py)."""
    select_accelerator()
    import deepspeed
    import deepspeed.ops

    quiet_deepspeed()
    cuda = torch.cuda.is_available()
    devices = torch.cuda.device_count() if cuda else 0
    local_rank, _, gpu = local_layout(os.environ, devices, 1)
    if cuda:
        torch.cuda.set_device(gpu)
    else:
        # The CPU accelerator would JIT-compile a shared-memory all-reduce for
        # its torch backend; gloo is enough for CPU runs and needs no compiler.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False, timeout=collective_timeout())
    import torch.distributed as td

    _, local_world, _ = local_layout(os.environ, devices, td.get_world_size())
    if cuda:
        # DeepSpeed's engines take LOCAL_RANK as the device index; with one visible GPU per task that index is 0.
        os.environ["LOCAL_RANK"] = str(gpu)
    return Dist(
        rank=td.get_rank(),
        world=td.get_world_size(),
        local_rank=local_rank,
        local_world=local_world,
        device=torch.device("cuda", gpu) if cuda else torch.device("cpu"),
    )


class CollectiveError(ClovaError):
    """Raised identically on every rank (after a collective); only rank 0 prints it."""


# What gloo and NCCL say when the rank at the other end died, hung or left the network.
_PEER_LOST = re.compile(r"Connection (reset|closed) by peer|Timed out waiting|Socket Timeout|Broken pipe"
                        r"|NCCL communicator was aborted|Watchdog caught collective operation timeout")


def lost_peer_reason(error: BaseException, during: str = "") -> str | None:
    """Why a collective failed, for a user, when the rank at the other end was lost (None for any other error)."""
    text = str(error).strip()
    if not _PEER_LOST.search(text):
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0])  # gloo's C++ source path says nothing to a user
    detail = detail.split(". This is typically")[0][:160]
    return (f"lost contact with another rank{during} ({detail}): a node died, hung or left the network "
            f"(collective timeout {collective_timeout().total_seconds():g} s, CLOVA_COLLECTIVE_TIMEOUT)")
