"""A training rank: ``python -m clova_train.training.worker RUN_DIR/launch.json``, or :func:`run_rank` in place.

Started by :func:`~clova_train.training.launch.spawn_local` or DeepSpeed's
launcher, it reads the resolved run; under srun or torchrun, where the
launching process already is a rank, :func:`~clova_train.training.train.train`
calls :func:`run_rank` itself. Either way the rank runs the loop once and
turns a user error into one line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rich.markup import escape

from clova_train.core.errors import ClovaError
from clova_train.core.progress import console
from clova_train.training.checkpoints.markers import newest_checkpoint
from clova_train.training.launch import pin_cpu_threads
from clova_train.training.parallel.distributed import CollectiveError, lost_peer_reason
from clova_train.training.run.config import RunSpec
from clova_train.training.trainer.loop import run_worker

# This module's name, which the launcher starts on every rank.
WORKER_MODULE = "clova_train.training.worker"


def lost_peer_message(error: BaseException, run_dir: Path) -> str | None:
    """One line for a collective that failed because another rank died or stopped answering; None for other errors."""
    reason = lost_peer_reason(error)
    if reason is None:
        return None
    marker = newest_checkpoint(Path(run_dir))
    where = f"the last complete checkpoint is {marker['tag']}" if marker else "there is no complete checkpoint yet"
    return f"{reason}. See that rank's log; {where}, and resubmitting the job continues from it"


def run_rank(spec: RunSpec) -> int:
    """One rank: run the loop, print a user error once (rank 0 for collective ones), return the exit code."""
    pin_cpu_threads()
    rank = int(os.environ.get("RANK", 0))
    try:
        run_worker(spec)
        return 0
    except ClovaError as e:
        if rank == 0 or not isinstance(e, CollectiveError):
            who = "" if rank == 0 else f"[rank {rank}] "
            # Messages quote paths and peers' errors, whose brackets are not markup.
            console.print(f"[bold red]error:[/] {escape(who + str(e))}", highlight=False, soft_wrap=True)
        return getattr(e, "exit_code", 2)
    except RuntimeError as e:
        lost = lost_peer_message(e, spec.run_dir)
        if lost is None:
            raise
        console.print(f"[bold red]error:[/] {escape(f'[rank {rank}] ' + lost)}", highlight=False, soft_wrap=True)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {WORKER_MODULE} RUN_DIR/launch.json", file=sys.stderr)
        return 2
    spec = RunSpec.from_json(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    return run_rank(spec)


if __name__ == "__main__":
    code = main()
    # Every file the run writes is closed by now; interpreter teardown (gloo,
    # torch's compile workers) adds seconds per worker and nothing else.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
