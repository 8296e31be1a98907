"""A training rank as a process: ``python -m clova_train.training.worker RUN_DIR/launch.json``.

Started by :func:`~clova_train.training.launch.spawn_local` or DeepSpeed's
launcher; it reads the resolved run and runs the loop on this rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from clova_train.training.config import RunSpec
from clova_train.training.launch import worker_main
from clova_train.training.loop import WORKER_MODULE, run_worker


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {WORKER_MODULE} RUN_DIR/launch.json", file=sys.stderr)
        return 2
    spec = RunSpec.from_json(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    return worker_main(spec, run_worker)


if __name__ == "__main__":
    code = main()
    # Every file the run writes is closed by now; interpreter teardown (gloo,
    # torch's compile workers) adds seconds per worker and nothing else.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
