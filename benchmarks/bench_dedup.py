"""`clova dedup` on real Korean text with planted near-duplicates, next to the exact-hash path, in one process run.

Base documents are runs of konlpy's constitution and bill paragraphs that
share little with one another; planted copies get a sentence deleted or
inserted, 1% of their syllables changed, two paragraphs swapped, or a
signature line appended. Reports, per shingle unit: recall of the planted
copies (removed, with their original named as kept), the share of base
documents wrongly removed as duplicates, MB/s per core of dedup and of the
exact-dedup reference (read, clean, hash, set: what `clova tokenize` does),
and peak memory. Speed is per CPU-second (this process and its
workers), so a busy shared machine does not skew it.

    python benchmarks/bench_dedup.py                 # small: about 1 minute on 2 cores
    python benchmarks/bench_dedup.py --planted 1000 --mixes 5000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import zstandard

from clova_train.dedup.config import DedupConfig
from clova_train.dedup.plant import distinct_documents, plant, sentence_mixes
from clova_train.dedup.run import dedup_corpus
from clova_train.demo import konlpy_corpus
from clova_train.text.quality import QualityRecipe, check_document
from clova_train.text.readers import iter_documents, normalize, strip_control


def exact_dedup(path: Path) -> tuple[int, float]:
    """The reference: read, clean and hash every document, keep the first of each hash."""
    t = time.perf_counter()
    seen, kept = set(), 0
    for doc in iter_documents(path):
        key = hashlib.blake2b(normalize(strip_control(doc.text)).encode("utf-8"), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            kept += 1
    return kept, time.perf_counter() - t


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: the machine may be shared, wall time is not ours alone."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--planted", type=int, default=100, help="planted near-duplicates")
    ap.add_argument("--mixes", type=int, default=300, help="more distinct documents, each a random draw of real sentences")
    ap.add_argument("--min-chars", type=int, default=1000, help="shortest real base document")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shingles", default="morpheme,eojeol")
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    recipe = QualityRecipe()
    base = [d for d in distinct_documents(konlpy_corpus(), min_chars=args.min_chars) if check_document(d, recipe) is None]
    n_real = len(base)
    base += sentence_mixes(base, args.mixes)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dedup_"))
    planted = plant(base, args.planted)
    kinds = [k for _, _, k in planted]
    originals = [o for _, o, _ in planted]
    data = tmp / "corpus.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for text, _, _ in planted:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    size = data.stat().st_size
    print(f"{n_real} distinct konlpy documents + {args.mixes} sentence mixes, {args.planted} planted near-duplicates; {size / 1e6:.2f} MB")

    c = cpu_seconds()
    kept_exact, t_exact = exact_dedup(data)
    t_exact = cpu_seconds() - c
    results = {"documents": len(planted), "bytes": size, "exact": {"kept": kept_exact, "cpu_seconds": t_exact, "mb_per_s_per_core": size / 1e6 / t_exact}}
    for unit in args.shingles.split(","):
        out = tmp / f"out-{unit}"
        t, c = time.perf_counter(), cpu_seconds()
        dedup_corpus([data], out, DedupConfig(shingle=unit, ngram=args.ngram, workers=args.workers), show_progress=False)
        secs, cpu = time.perf_counter() - t, cpu_seconds() - c
        removed = {}
        with open(out / "duplicates.jsonl.zst", "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as z:
            for line in z.read().decode().splitlines():
                rec = json.loads(line)
                removed[int(rec["id"].rsplit("line ", 1)[1]) - 1] = rec
        manifest = json.loads((out / "manifest.json").read_text())
        found, by_kind, base_removed = 0, Counter(), 0
        total_kind = Counter(k for k in kinds if k)
        for idx, kind in enumerate(kinds):
            if kind is None:
                base_removed += idx in removed
                continue
            orig_line = originals[idx] + 1
            rec = removed.get(idx)
            if rec and rec["kept_id"].endswith(f":line {orig_line}"):
                found += 1
                by_kind[kind] += 1
        n_base = len(base)
        results[unit] = {
            "recall": found / args.planted,
            "recall_by_edit": {k: round(by_kind[k] / total_kind[k], 3) for k in sorted(total_kind)},
            "distinct_removed_as_duplicate": base_removed / n_base,
            "removed_by_reason": manifest["totals"]["removed"],
            "seconds": secs,
            "cpu_seconds": cpu,
            "mb_per_s_per_core": size / 1e6 / cpu,
        }
        shutil.rmtree(out)
    results["peak_rss_mib"] = peak_mib()
    for unit in args.shingles.split(","):
        r = results[unit]
        print(
            f"{unit:9s} {args.ngram}-grams: recall {r['recall']:.3f} {r['recall_by_edit']}; distinct removed {r['distinct_removed_as_duplicate']:.2%}; "
            f"{r['mb_per_s_per_core']:.3f} MB/s per CPU-second ({r['cpu_seconds']:.1f} CPU s, {r['seconds']:.1f} s wall)"
        )
    e = results["exact"]
    print(f"exact-hash reference: {e['mb_per_s_per_core']:.2f} MB/s per CPU-second ({e['cpu_seconds']:.2f} CPU s); "
          + ", ".join(f"{u} dedup is {e['mb_per_s_per_core'] / results[u]['mb_per_s_per_core']:.0f}x slower" for u in args.shingles.split(",")))
    print(f"peak RSS {results['peak_rss_mib']:.0f} MiB (this process or its largest worker)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
