"""`clova train`'s entry point: resolve the request, hold the run dir, start the ranks; one way down to each rank's loop.

cli -> :func:`train` -> :func:`launch.start` (new processes run ``worker``) or, where this process
already is a rank, :func:`worker.run_rank` -> :func:`trainer.loop.run_worker`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

from clova_train.core.lock import dir_lock
from clova_train.core.progress import console
from clova_train.training import launch
from clova_train.training.checkpoints.markers import newest_checkpoint
from clova_train.training.run.config import TrainRequest
from clova_train.training.run.resolve import prepare
from clova_train.training.worker import WORKER_MODULE, run_rank


def train(req: TrainRequest, launch_cfg: launch.LaunchConfig) -> int:
    """`clova train`: resolve, check, and start the ranks; the exit code."""
    marker = newest_checkpoint(Path(req.out).resolve())  # read once: the rank count to continue on, and whether anything is left
    if launch_cfg.nproc_per_node is None and not launch_cfg.hostfile and marker and marker.get("launcher") == "local":
        # A rerun continues on as many local workers as wrote the newest checkpoint.
        launch_cfg = replace(launch_cfg, nproc_per_node=marker["world_size"])
    world, external = launch.world_size(launch_cfg)
    spec = prepare(req, world, check=not external)
    spec.checked = not external
    if req.resume and marker is None:
        console.print(f"{spec.run_dir}: no complete checkpoint yet; --resume starts the run from step 0")
    if marker and marker["step"] >= spec.train.steps:
        console.print(f"{spec.run_dir}: already trained to step {marker['step']} of {spec.train.steps}; nothing to do")
        return 0
    # One writer per run dir: the launching process holds the lock; where every process already is a rank
    # (srun, torchrun), rank 0 does.
    rank0 = not external or (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0"
    with dir_lock(spec.run_dir, "clova train", note=console.print) if rank0 else contextlib.nullcontext():
        code = launch.start(spec, launch_cfg, module=WORKER_MODULE)
        return run_rank(spec) if code is None else code
