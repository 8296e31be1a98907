"""`clova tokenize` end to end vs the tokenizer's own encode_batch, side by side.

On a generated corpus (real konlpy sentences recombined, deterministic seed,
>= 50 MB) and on the real konlpy text, this measures in one run:

- ``encode_batch``: one process encoding documents already in memory, cold
  cache (the ceiling one tokenizing core can reach);
- one worker reading, cleaning and hashing a whole input without encoding
  (the part of a worker's time that is not tokenizing; the main process no
  longer reads);
- ``clova tokenize`` end to end (reading, cleaning, dedup, tokenizing,
  writing shards, hashing) with 1 and 2 workers, each in a fresh process whose
  peak memory (main process and largest worker) is reported.

It prints MB/s of input and documents/s, the coordinating process's share of
all CPU time (with and without its start-up imports, a fixed cost that a small
corpus magnifies, and of the CPU the big corpus adds over the small one), the ratio of end-to-end to
encode_batch (target >= 0.9) and the scaling from 1 to 2 workers. Wall-clock
figures need an otherwise idle machine; the ratio "by CPU time" (encode_batch
CPU seconds over the workers' CPU seconds for the same text) does not.
Run: ``python benchmarks/bench_tokenize.py [--mb 50]`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tokenizer import generated_lines, konlpy_lines  # noqa: E402  (same corpus recipe)

from clova_train.shards.format import ShardConfig
from clova_train.shards import parts
from clova_train.tokenizer.bpe import ClovaTokenizer
from clova_train.tokenizer.training import TokenizerConfig, train_tokenizer

# Runs in a fresh interpreter so that its peak memory is the pipeline's alone
# (this process holds the whole corpus in memory for the encode_batch reference).
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
_CHILD = """
import json, re, resource, sys, time
from clova_train.shards.format import ShardConfig
from clova_train.shards.build import tokenize_corpus
inputs, tok, out, workers = json.loads(sys.argv[1])
t, m0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
r = tokenize_corpus(inputs, tok, out, ShardConfig(workers=workers), show_progress=False)
dt = time.perf_counter() - t
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": dt, "documents": r["documents_read"], "tokens": r["tokens"], "shards": r["shards"],
                  "main_rss_mb": hwm / 1024, "worker_rss_mb": kids.ru_maxrss / 1024,
                  "main_cpu": me.ru_utime + me.ru_stime,
                  "main_cpu_run": me.ru_utime + me.ru_stime - m0.ru_utime - m0.ru_stime, "workers_cpu": kids.ru_utime + kids.ru_stime}))
"""


def _spin(n: int) -> int:
    s = 0
    for i in range(n):
        s += i
    return s


def cores_free() -> float:
    """How many cores two busy processes actually get (2.0 on an idle 2-core machine)."""
    import multiprocessing as mp

    n = 5_000_000
    t = time.perf_counter()
    _spin(n)
    one = time.perf_counter() - t
    with mp.get_context("fork").Pool(2) as pool:
        t = time.perf_counter()
        pool.map(_spin, [n, n])
        two = time.perf_counter() - t
    return 2 * one / two


def encode_reference(tok_dir: Path, lines: list[str], batch: int = 1000) -> tuple[float, float]:
    """(wall, CPU) seconds; CPU counts the Rust threads too."""
    tok = ClovaTokenizer.load(tok_dir)  # fresh: cold cache, as each worker starts
    t, c = time.perf_counter(), time.process_time()
    for i in range(0, len(lines), batch):
        tok.encode_batch(lines[i : i + batch])
    return time.perf_counter() - t, time.process_time() - c


def read_clean_only(path: Path, tok_dir: Path) -> float:
    import multiprocessing as mp

    with mp.get_context("fork").Pool(1, initializer=parts.init_worker, initargs=(str(tok_dir), True, ShardConfig())) as pool:
        pool.apply(parts.lines_in, (str(path), 0, 1))  # the worker is up before the clock starts
        t = time.perf_counter()
        pool.apply(parts.read_part, (str(path), None, False, "uint16"))
        return time.perf_counter() - t


def pipeline(path: Path, tok_dir: Path, out: Path, workers: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([[str(path)], str(tok_dir), str(out), workers])],
        capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(name: str, lines: list[str], tok_dir: Path, workdir: Path) -> dict:
    path = workdir / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    mb = path.stat().st_size / 1e6
    docs = len(lines)

    t_ref, cpu_ref = encode_reference(tok_dir, lines)
    t_read = read_clean_only(path, tok_dir)
    runs = {w: pipeline(path, tok_dir, workdir / f"{name}-w{w}", w) for w in (1, 2)}
    same = all(
        (workdir / f"{name}-w1" / f.name).read_bytes() == f.read_bytes() for f in (workdir / f"{name}-w2").iterdir()
    )

    print(f"\n== {name}: {mb:.1f} MB, {docs:,} documents, {os.cpu_count()} cores")
    print(f"encode_batch (1 process, in memory)  {mb / t_ref:8.2f} MB/s {docs / t_ref:10,.0f} docs/s   CPU {cpu_ref:.1f} s")
    print(f"read+clean+hash only (1 worker)      {mb / t_read:8.2f} MB/s {docs / t_read:10,.0f} docs/s")
    for w, r in runs.items():
        s = r["seconds"]
        print(
            f"clova tokenize --workers {w}           {mb / s:8.2f} MB/s {r['documents'] / s:10,.0f} docs/s"
            f"   ratio vs encode_batch {t_ref / s:5.2f} (by CPU time {cpu_ref / r['workers_cpu']:4.2f})"
            f"   CPU main {r['main_cpu']:.1f} s + workers {r['workers_cpu']:.1f} s"
            f" (coordinator's share {r['main_cpu'] / (r['main_cpu'] + r['workers_cpu']):.0%}, without its imports"
            f" {r['main_cpu_run'] / (r['main_cpu_run'] + r['workers_cpu']):.1%}; goal < 5%)"
            f"   peak RSS main {r['main_rss_mb']:.0f} MB, largest worker {r['worker_rss_mb']:.0f} MB"
        )
    print(f"scaling 1 -> 2 workers: {runs[1]['seconds'] / runs[2]['seconds']:.2f}x   outputs byte-identical: {same}"
          f"   ({runs[1]['tokens']:,} tokens, {runs[1]['shards']} shards)")
    return runs


def marginal_share(small: dict, big: dict) -> str:
    """The coordinator's share of the CPU that the bigger corpus adds: start-up costs cancel out."""
    out = []
    for w in big:
        main = big[w]["main_cpu"] - small[w]["main_cpu"]
        work = big[w]["workers_cpu"] - small[w]["workers_cpu"]
        out.append(f"--workers {w}: {main / (main + work):.1%}")
    return "coordinator's share of the added CPU (big corpus minus the small one): " + ", ".join(out) + " (goal < 5%)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0, help="size of the generated corpus (at least 50 for the record)")
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args()
    base = konlpy_lines()
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; two busy processes get {cores_free():.2f} cores"
          " (other work on the machine skews wall-clock figures and scaling)")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        gen = generated_lines(base, args.mb, seed=0)
        (d / "sample.txt").write_text("\n".join(gen[: len(gen) // 10] + base) + "\n", encoding="utf-8")
        t = time.perf_counter()
        train_tokenizer([d / "sample.txt"], d / "tok", TokenizerConfig(vocab_size=args.vocab), show_progress=False)
        print(f"tokenizer: vocab {args.vocab} learned on {len(gen) // 10:,} generated + the konlpy lines in {time.perf_counter() - t:.1f} s")
        small = bench("konlpy (real text)", base, d / "tok", d)
        big = bench(f"generated {args.mb:g} MB", gen, d / "tok", d)
        print(marginal_share(small, big))
    print(f"\nat the end: load average {os.getloadavg()[0]:.2f}; two busy processes get {cores_free():.2f} cores")


if __name__ == "__main__":
    main()
