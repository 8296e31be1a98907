"""The CLI's cold start: `clova --help` and argument errors vs the imports they used to wait for, side by side.

Each case runs as a fresh process (the way a user types it), ``--runs`` times;
the median wall time is printed beside two references measured in the same run:
a bare interpreter (the floor) and ``import torch, deepspeed, transformers``
(what every mistake cost when arguments were checked after the heavy imports).
Target: every case under 1 s. ``--src DIR`` times another checkout's
``src`` (e.g. the main branch's, for the "before" figure).

Run: ``python benchmarks/bench_cli.py [--runs 5] [--src /path/to/other/src]`` (under a minute).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLOVA = "from clova_train.cli import app; app()"
CASES = {
    "clova --help": ["--help"],
    "clova plan --model 7b (typo'd preset)": ["plan", "--model", "7b"],
    "clova train --model 7bb ... (typo'd preset)": ["train", "--model", "7bb", "--data", "shards/", "--out", "runs/x"],
    "clova generate missing/ (missing dir)": ["generate", "missing/", "국회는"],
    "clova serve missing/ (missing dir)": ["serve", "missing/"],
    "clova export missing/ (missing dir)": ["export", "missing/", "--out", "hf/"],
}
REFERENCES = {
    "python -c pass (floor)": "pass",
    "import torch, deepspeed, transformers": "import torch, deepspeed, transformers",
}


def timed(cmd: list[str], env: dict, cwd: str, runs: int) -> float:
    """Median wall seconds of ``cmd`` over ``runs`` fresh processes (one unmeasured warm-up for the page cache)."""
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src", help="the clova_train source to time")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.src.resolve()), "COLUMNS": "100"}
    with tempfile.TemporaryDirectory() as cwd:
        refs = {name: timed([sys.executable, "-c", code], env, cwd, args.runs) for name, code in REFERENCES.items()}
        heavy = refs["import torch, deepspeed, transformers"]
        print(f"clova_train from {args.src}; median of {args.runs} fresh processes each")
        for name, seconds in refs.items():
            print(f"  {name:<48} {seconds:6.2f} s")
        worst = 0.0
        for name, argv in CASES.items():
            seconds = timed([sys.executable, "-c", CLOVA, *argv], env, cwd, args.runs)
            worst = max(worst, seconds)
            print(f"  {name:<48} {seconds:6.2f} s   {seconds / heavy:5.2f} x the heavy imports")
    print(f"slowest case {worst:.2f} s: {'under' if worst < 1 else 'OVER'} the 1 s target")


if __name__ == "__main__":
    main()
