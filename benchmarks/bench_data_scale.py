"""Data at scale: memory-mapped sample indices vs the in-RAM sampler of commit 868b3f8, side by side.

For synthetic shard dirs of 1e6 and 1e7 short documents (``--huge`` adds 1e8),
written directly with IndexedDatasetWriter plus a manifest (no tokenizer), it
measures in fresh processes:

* the index build: time, and the peak RSS of the building process;
* a non-building rank (rank 3 of 8) that maps the cache and draws its first
  batch: peak RSS and time to the first batch; the reference is the old
  sampler, where every rank builds every index in RAM;
* index bytes per document and per sample;
* a start-up over 3,000 shards under a soft limit of 1,024 open files.

Run: ``python benchmarks/bench_data_scale.py [--docs 1e6,1e7] [--huge]``.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BEFORE = "868b3f8"
SEQ_LEN, GLOBAL_BATCH, WORLD, RANK = 2048, 1024, 8, 3

# A rank in a fresh interpreter: open the data, draw one batch, report its own peak RSS.
RANK_CODE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from clova_train.training.data import sampler
paths, cache, nofile = json.loads(sys.argv[1])
if nofile:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    if hasattr(sampler, "prepare_indices"):
        data = sampler.DataConfig(paths=paths, weights=[1.0] * len(paths), cache=cache, cache_timeout=60)
        datasets, _ = sampler.prepare_indices(data, %(seq)d, 1234, %(gb)d, build=False)
    else:
        datasets = sampler.open_train_data(paths, %(seq)d, 1234)
    stream = sampler.TrainStream(datasets, [1.0] * len(paths), global_batch=%(gb)d, micro_batch=1, rank=%(rank)d, world=%(world)d)
    batch = stream.next_batch()
    out = {"ok": True, "first_batch_s": time.perf_counter() - t0, "micro_batches": len(batch)}
except Exception as e:
    out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:160]}
out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
# Private memory (what a rank really holds); mapped shard and index pages are page cache, shared and reclaimable.
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
out["anon_mb"] = int(status["RssAnon"].split()[0]) / 1024
print(json.dumps(out))
""" % {"seq": SEQ_LEN, "gb": GLOBAL_BATCH, "rank": RANK, "world": WORLD}

BUILD_CODE = r"""
import json, resource, sys, time
from clova_train.shards.format import read_manifest
from clova_train.shards.index import build_indices, epochs_needed
paths, cache, nofile = json.loads(sys.argv[1])
tokens = [sum(r["tokens"] for r in read_manifest(p)["shards"] if r["split"] == "train") for p in paths]
epochs = [epochs_needed((t - 1) // %(seq)d, 1 / len(paths), %(gb)d) for t in tokens]  # what one global batch reaches
if nofile:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
t0 = time.perf_counter()
s = build_indices(paths, cache, seq_len=%(seq)d, seed=1234, epochs=epochs)
print(json.dumps({"seconds": time.perf_counter() - t0, "built": s["built"], "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""" % {"seq": SEQ_LEN, "gb": GLOBAL_BATCH}


def write_shard_dir(path: Path, n_docs: int, shards: int, seed: int = 0) -> Path:
    """``n_docs`` documents of 1-30 tokens plus EOD, in ``shards`` train shards and one small valid shard."""
    from clova_train.shards.format import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    records = []
    parts = [("train", f"train-{i:05d}", len(c)) for i, c in enumerate(np.array_split(np.arange(n_docs), shards))]
    for split, prefix, n in parts + [("valid", "valid-00000", max(1, n_docs // 1000))]:
        lengths = rng.integers(2, 32, n).astype(np.int32)
        tokens = rng.integers(1, 50000, int(lengths.sum())).astype(np.uint16)
        tokens[np.cumsum(lengths) - 1] = 0  # every document ends with EOD
        with IndexedDatasetWriter(path / prefix, np.uint16) as w:
            w.add_documents(tokens, lengths)
            info = w.finalize()
        records.append({"prefix": prefix, "split": split, "dtype": "uint16", **info})
    man = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "shards": records,
           "tokenizer": {"hash": "synthetic", "eod_id": 0, "vocab_size": 50000}}
    (path / MANIFEST).write_text(json.dumps(man))
    return path


def run(code: str, src: Path, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], env=env, capture_output=True, text=True, timeout=1800)
    lines = r.stdout.strip().splitlines()
    if r.returncode or not lines:
        return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(lines[-1])


def before_src(tmp: Path) -> Path | None:
    """The library as of commit 868b3f8 (today's in-RAM sampler), extracted with git archive."""
    dest = tmp / "before"
    dest.mkdir()
    r = subprocess.run(f"git -C {REPO} archive {BEFORE} src | tar -x -C {dest}", shell=True, capture_output=True)
    return dest / "src" if r.returncode == 0 else None


def index_bytes(cache: Path) -> tuple[float, float]:
    """Bytes per document (order + starts) and per sample (windows) of one train epoch's entry."""
    entry = next(p.parent for p in sorted(cache.rglob("order.npy")))
    nbytes = {f.stem: np.load(f, mmap_mode="r") for f in entry.glob("*.npy")}
    docs, samples = len(nbytes["order"]), len(nbytes["windows"])
    return (nbytes["order"].nbytes + nbytes["starts"].nbytes) / docs, nbytes["windows"].nbytes / max(1, samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default="1e6,1e7", help="comma-separated document counts")
    ap.add_argument("--huge", action="store_true", help="add 1e8 documents (about 3.4 GB of shards, minutes)")
    ap.add_argument("--many-shards", type=int, default=3000, help="shards of the open-file start-up test")
    args = ap.parse_args()
    counts = [int(float(x)) for x in args.docs.split(",")] + ([100_000_000] if args.huge else [])
    after = REPO / "src"
    with tempfile.TemporaryDirectory(prefix="bench-data-scale-") as tmp:
        tmp = Path(tmp)
        old = before_src(tmp)
        rows = []
        for n in counts:
            t0 = time.perf_counter()
            d = write_shard_dir(tmp / f"d{n}", n, shards=max(1, n // 2_000_000))
            made = time.perf_counter() - t0
            cache = tmp / f"cache{n}"
            build = run(BUILD_CODE, after, [str(d)], str(cache), 0)
            rank = run(RANK_CODE, after, [str(d)], str(cache), 0)
            ref = run(RANK_CODE, old, [str(d)], "", 0) if old else {"ok": False, "error": "no git checkout"}
            per_doc, per_sample = index_bytes(cache)
            rows.append((n, build, rank, ref))
            print(f"{n:>11,} docs ({made:.0f} s to write): index built in {build.get('seconds', float('nan')):.1f} s, builder peak "
                  f"{build.get('rss_mb', float('nan')):.0f} MB; index files {per_doc:.1f} B/document + {per_sample:.1f} B/sample "
                  f"(goal <= 12 + 8)")
            nan = float("nan")
            print(f"{'':>11} non-building rank: peak RSS {rank.get('rss_mb', nan):.0f} MB (private {rank.get('anon_mb', nan):.0f} MB), "
                  f"first batch {rank.get('first_batch_s', nan):.1f} s | before ({BEFORE}, every rank builds in RAM): "
                  f"{ref.get('rss_mb', nan):.0f} MB (private {ref.get('anon_mb', nan):.0f} MB), {ref.get('first_batch_s', nan):.1f} s | "
                  f"private memory before/after {ref.get('anon_mb', nan) / rank.get('anon_mb', nan):.2f}x")
        if len(rows) > 1:
            (n0, _, r0, f0), (n1, _, r1, f1) = rows[0], rows[-1]
            grow = lambda a, b, k: b.get(k, float("nan")) - a.get(k, float("nan"))  # noqa: E731
            print(f"growth of a non-building rank from {n0:,} to {n1:,} docs: private {grow(r0, r1, 'anon_mb'):+.0f} MB, "
                  f"peak RSS {grow(r0, r1, 'rss_mb'):+.0f} MB (goal < 100 MB up to 1e8) | before: private "
                  f"{grow(f0, f1, 'anon_mb'):+.0f} MB, peak RSS {grow(f0, f1, 'rss_mb'):+.0f} MB")
        # Thousands of shards under the usual soft limit of 1,024 open files.
        k = args.many_shards
        d = write_shard_dir(tmp / "many", 20 * k, shards=k)
        cache = tmp / "cache-many"
        build = run(BUILD_CODE, after, [str(d)], str(cache), 1024)
        rank = run(RANK_CODE, after, [str(d)], str(cache), 1024)
        ref = run(RANK_CODE, old, [str(d)], "", 1024) if old else {"ok": False, "error": "no git checkout"}
        show = lambda r: f"ok in {r['first_batch_s']:.1f} s" if r.get("ok") else f"failed: {r.get('error')}"  # noqa: E731
        print(f"{k:,} shards under ulimit -n 1024: build {'ok' if 'seconds' in build else build.get('error')}; "
              f"rank {show(rank)} | before: {show(ref)}")


if __name__ == "__main__":
    main()
