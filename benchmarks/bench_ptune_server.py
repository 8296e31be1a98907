"""`clova ptune --server` against local `clova ptune`: seconds per epoch, the ratio, how far the vectors land apart.

Builds a randomly initialised model of a preset (default ``small``) with a
morpheme-aware tokenizer trained on the konlpy text (as bench_serve does), an
NSMC-style task of reviews made of words about rights (label 1) or about
institutions (label 0), and then p-tunes one epoch with the same settings
and seed two ways, alternating for ``--rounds`` rounds (each side keeps its
fastest, so load from elsewhere falls on both alike):

- local: ``ptune`` with the model in this process;
- server: ``ptune_remote`` against a ``clova serve`` child (one worker), the
  loss and input gradients over HTTP from ``/v1/ptune/gradients``.

Torch runs on one thread on both sides. Prints seconds per epoch, the ratio
server/local (the cost of HTTP, JSON vectors and the server's queue), and
the largest difference between the two runs' trained vectors.

Run: ``python benchmarks/bench_ptune_server.py [--preset small] [--train 64] [--rounds 3]`` (a minute or two on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_serve import build_model, start_server  # noqa: E402
from clova_train.evaluation.prompts import VECTORS_FILE  # noqa: E402
from clova_train.evaluation.ptune import PTuneConfig, ptune  # noqa: E402
from clova_train.inference.generate import load_model  # noqa: E402
from clova_train.studio.remote import ptune_remote  # noqa: E402

RIGHTS = ["자유", "권리", "평등", "행복", "교육"]
INSTITUTIONS = ["대통령", "국회", "정부", "법원", "선거"]


def write_task(path: Path, n: int, rng: random.Random) -> str:
    rows = ["id\tdocument\tlabel"]
    for i in range(n):
        words = [rng.choice(RIGHTS if i % 2 else INSTITUTIONS) for _ in range(rng.randint(3, 6))]
        rows.append(f"{i}\t{' '.join(words)}\t{i % 2}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = Path(tempfile.mkdtemp(prefix="bench_ptune_server-"))
    proc = None
    try:
        model_dir = build_model(d, args.preset)
        model, tok = load_model(model_dir, device="cpu")
        rng = random.Random(0)
        template = d / "template.json"
        template.write_text(json.dumps({"query": "{document}\n답:", "verbalizers": {"0": "법률", "1": "국민"}, "ptune_query": "{prompt}{document}{prompt}"}, ensure_ascii=False))
        base = dict(task="nsmc", train=write_task(d / "train.tsv", args.train, rng), valid=write_task(d / "valid.tsv", 32, rng),
                    template=str(template), prompt_tokens=8, hidden_size=64, epochs=1, batch_size=args.batch_size)  # fmt: skip

        proc, url = start_server(model_dir, d / "server.log")
        local_s = remote_s = float("inf")
        for r in range(args.rounds + 1):  # round 0 warms both sides up and is not timed
            t = time.perf_counter()
            ptune(model, tok, PTuneConfig(**base, out=str(d / f"local{r}")), show_progress=False)
            local_s = min(local_s, time.perf_counter() - t) if r else local_s
            t = time.perf_counter()
            ptune_remote(url, "", PTuneConfig(**base, out=str(d / f"remote{r}")), show_progress=False)
            remote_s = min(remote_s, time.perf_counter() - t) if r else remote_s
        from safetensors.torch import load_file

        mine, theirs = (load_file(str(d / name / VECTORS_FILE))["vectors"] for name in ("local0", "remote0"))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)

    steps = -(-args.train // args.batch_size)
    print(f"model: preset {args.preset}, random init; {args.train} train and 32 validation examples, batch {args.batch_size} "
          f"({steps} steps and two validations per epoch), 8 vectors, lstm encoder of width 64; torch on 1 thread; best of {args.rounds}")  # fmt: skip
    print(f"{'':28}{'s/epoch':>10}")
    print(f"{'local clova ptune':28}{local_s:10.2f}")
    print(f"{'clova ptune --server':28}{remote_s:10.2f}")
    print(f"ratio server/local (1: no overhead): {remote_s / local_s:.3f}")
    print(f"largest difference between the trained vectors: {(mine - theirs).abs().max().item():.2e} (largest entry {mine.abs().max().item():.3f})")


if __name__ == "__main__":
    main()
