"""Tokens/s and peak memory of `clova train` in each parallel mode on 2 local ranks, same model, batch and data, side by side.

Each configuration is one real `clova train` run (DeepSpeed's CPU accelerator
with gloo here, or the GPUs where there are some) on the Korean text shipped
with konlpy; the figures are rank 0's median tokens/s over the steps after the
first two (warm-up, compilation) and its peak memory. ZeRO-3 plain is the
reference every ratio is taken against. By default a small grid runs
(every mode; activation checkpointing, --compile and --tensor-parallel 2 on a subset); ``--all``
runs every mode x checkpointing x compile x tensor parallel 1 or 2.

    python benchmarks/bench_parallel.py [--model tiny] [--seq-len 128] [--steps 6] [--all]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("zero1", "zero2", "zero3", "pipeline")
# (mode, activation checkpointing, --compile, --tensor-parallel)
DEFAULT_GRID = [("zero1", False, False, 1), ("zero2", False, False, 1), ("zero3", False, False, 1), ("pipeline", False, False, 1),
                ("zero3", True, False, 1), ("pipeline", True, False, 1), ("zero1", False, True, 1),
                ("zero1", False, False, 2), ("zero3", False, False, 2), ("pipeline", False, False, 2)]


def make_shards(work: Path) -> Path:
    import konlpy

    from clova_train.shards.build import tokenize_corpus
    from clova_train.shards.format import ShardConfig
    from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

    corpus = Path(konlpy.__file__).parent / "data" / "corpus"
    files = [corpus / "kolaw" / "constitution.txt", *sorted((corpus / "kobill").glob("*.txt"))]
    train_tokenizer(files, work / "tok", TokenizerConfig(vocab_size=2000), show_progress=False)
    tokenize_corpus(files, work / "tok", work / "shards", ShardConfig(valid_fraction=0.05, workers=1), show_progress=False)
    return work / "shards"


def run_one(work: Path, shards: Path, mode: str, ckpt: bool, compiled: bool, tp: int, args) -> dict:
    out = work / f"{mode}-{int(ckpt)}-{int(compiled)}-tp{tp}"
    cmd = [sys.executable, "-c", "from clova_train.cli import app; app()", "train", "--model", args.model, "--data", str(shards),
           "--out", str(out), "--seq-len", str(args.seq_len), "--global-batch", str(args.global_batch), "--micro-batch", str(args.micro_batch),
           "--steps", str(args.steps), "--save-every", str(10**6), "--eval-every", "0", "--no-tensorboard", "--nproc-per-node", "2",
           "--parallel", mode, "--activation-checkpointing" if ckpt else "--no-activation-checkpointing", "--compile" if compiled else "--no-compile",
           "--tensor-parallel", str(tp)]
    if mode == "pipeline":
        cmd += ["--pipeline-stages", str(2 // tp)]  # the 2 ranks: 2 stages, or 1 stage of a tensor-parallel pair
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = recs[2:] or recs
    return {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in timed), "peak_gb": max(x["memory_gb"] for x in recs),
            "loss_1": recs[0]["loss"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--all", action="store_true", help="every mode x activation checkpointing x --compile")
    args = p.parse_args(argv)
    grid = list(itertools.product(MODES, (False, True), (False, True), (1, 2))) if args.all else DEFAULT_GRID
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = make_shards(work)
        results = {cfg: run_one(work, shards, *cfg, args) for cfg in grid}
    ref = results[("zero3", False, False, 1)]["tokens_per_s"]
    print(f"{args.model}, 2 ranks, {args.global_batch} x {args.seq_len} tokens per step, micro-batch {args.micro_batch}, {args.steps} steps")
    print(f"{'mode':<9} {'tp':<3} {'ckpt':<5} {'compile':<8} {'tokens/s':>10} {'vs zero3':>9} {'peak GiB':>9} {'loss@1':>8}")
    for (mode, ckpt, compiled, tp), r in results.items():
        print(f"{mode:<9} {tp:<3} {'on' if ckpt else 'off':<5} {'on' if compiled else 'off':<8} {r['tokens_per_s']:>10,.0f} "
              f"{r['tokens_per_s'] / ref:>8.2f}x {r['peak_gb']:>9.2f} {r['loss_1']:>8.4f}")


if __name__ == "__main__":
    main()
