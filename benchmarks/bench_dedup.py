"""`clova dedup` on two real Korean corpora with planted near-duplicates: recall, false removals, speed, the curve.

Corpora: konlpy's constitution and bills (runs of paragraphs that share
little with one another, plus sentence mixes of them) and LibreOffice's
Korean help pages (Debian's libreoffice-help-ko: Korean full of English UI
terms). Base documents are those the default quality recipe keeps that share at
most half of their word 3-grams with any other (``--max-overlap``), so a
removed one is a dedup mistake. Planted copies of random base documents get
a sentence deleted or inserted, 1%, 2% or 3% of their syllables changed, two
paragraphs swapped, or a signature appended.

For each corpus it prints, for the defaults and for the previous ones
(FineWeb's morpheme 5-grams, 14 x 8, 0.8; Hangul share >= 0.5 and no language
model): recall per kind of copy (removed, its own original named as kept),
the share of base documents removed as duplicates, candidate pairs, and MB per
CPU-second of the whole run (this process and its workers, so a busy shared
machine does not skew it) beside an exact-hash dedup pass. ``--filters`` runs
the default recipe over each whole corpus and prints the share each filter
removes (``--samples DIR`` keeps the removed documents to read). ``--curve`` adds
recall against false removals for a range of thresholds, computed from the
same minhash signatures and LSH bands as the run, and ``--png`` draws it.

    python benchmarks/bench_dedup.py --curve --filters --png docs/dedup_curve.png   # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import resource
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import zstandard

from clova_train.dedup.config import DedupConfig
from clova_train.dedup.plant import distinct, distinct_documents, plant, sentence_mixes
from clova_train.dedup.realtext import help_pages
from clova_train.dedup.run import dedup_corpus
from clova_train.dedup.stages import KoreanSignature
from clova_train.demo import konlpy_corpus
from clova_train.text.quality import QualityRecipe, check_document
from clova_train.text.readers import iter_documents, normalize, strip_control

PREVIOUS_MINHASH = DedupConfig(ngram=5, bands=14, rows=8, threshold=0.8)
PREVIOUS_RECIPE = QualityRecipe(min_hangul_share=0.5, language_model="", max_top_ngram_char_fraction={"2": 0.20, "3": 0.18, "4": 0.16},
                                max_dup_ngram_char_fraction={"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10})
RUNS = {  # name: (dedup settings, quality recipe)
    "default": (DedupConfig(), QualityRecipe()),
    "previous": (PREVIOUS_MINHASH, PREVIOUS_RECIPE),  # everything as before this change
    "previous MinHash": (PREVIOUS_MINHASH, QualityRecipe()),  # the same documents reach MinHash as with the defaults
}
CURVE = {  # label: settings whose signatures the curve is computed from
    "morpheme 3-grams, 20x5 (default)": DedupConfig(),
    "morpheme 5-grams, 14x8 (previous)": DedupConfig(ngram=5, bands=14, rows=8),
    "eojeol 3-grams, 20x5": DedupConfig(shingle="eojeol"),
}
THRESHOLDS = [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]


def base_documents(corpus: str, mixes: int, max_overlap: float) -> list[str]:
    recipe = QualityRecipe()
    if corpus == "konlpy":
        docs = distinct_documents(konlpy_corpus(), min_chars=1000, max_overlap=max_overlap)
        base = [d for d in docs if check_document(d, recipe) is None]
        return base + sentence_mixes(base, mixes)
    pages = [p for p in help_pages("ko", min_chars=500) if check_document(p, recipe) is None]
    return distinct(pages, max_overlap=max_overlap)


def raw_documents(corpus: str) -> list[str]:
    """Every document of a corpus, before any selection: konlpy's paragraphs joined into runs of 300+ characters
    (most single paragraphs are headings or article numbers), every Korean help page with text."""
    if corpus == "konlpy":
        return distinct_documents(konlpy_corpus(), min_chars=300, max_overlap=1.0)
    return help_pages("ko", min_chars=1)


def filter_report(corpus: str, tmp: Path, samples: Path | None) -> dict:
    """Share of a real corpus each filter removes with the default recipe (a default that removes genuine text is wrong)."""
    docs = raw_documents(corpus)
    data = tmp / f"{corpus}-raw.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    dedup_corpus([data], tmp / "raw", DedupConfig(samples_per_reason=10), show_progress=False)
    removed = json.loads((tmp / "raw" / "manifest.json").read_text())["totals"]["removed"]
    if samples:
        samples.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / "raw" / "samples.jsonl", samples / f"{corpus}.jsonl")
    shutil.rmtree(tmp / "raw")
    return {"documents": len(docs), "removed_share": {k: round(v / len(docs), 4) for k, v in removed.items()}}


def exact_dedup(path: Path) -> int:
    """The reference: read, clean and hash every document, keep the first of each hash."""
    seen = set()
    for doc in iter_documents(path):
        seen.add(hashlib.blake2b(normalize(strip_control(doc.text)).encode("utf-8"), digest_size=16).digest())
    return len(seen)


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(data: Path, rows: list, cfg: DedupConfig, recipe: QualityRecipe, out: Path) -> dict:
    c = cpu_seconds()
    dedup_corpus([data], out, cfg, recipe, show_progress=False)
    cpu = cpu_seconds() - c
    removed = {}
    with open(out / "duplicates.jsonl.zst", "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as z:
        for rec in map(json.loads, z.read().decode().splitlines()):
            removed[int(rec["id"].rsplit("line ", 1)[1]) - 1] = int(rec["kept_id"].rsplit("line ", 1)[1]) - 1
    manifest = json.loads((out / "manifest.json").read_text())
    kinds = Counter(k for _, _, k in rows if k)
    found = Counter(k for i, (_, orig, k) in enumerate(rows) if k and removed.get(i) == orig)
    n_base = sum(k is None for _, _, k in rows)
    shutil.rmtree(out)
    return {
        "recall": sum(found.values()) / sum(kinds.values()),
        "recall_by_kind": {k: round(found[k] / kinds[k], 3) for k in sorted(kinds)},
        "base_removed_as_duplicate": sum(i in removed for i, (_, _, k) in enumerate(rows) if k is None) / n_base,
        "removed_by_reason": manifest["totals"]["removed"],
        "candidate_pairs": manifest["totals"]["candidate_pairs"],
        "cpu_seconds": cpu,
        "mb_per_cpu_s": data.stat().st_size / 1e6 / cpu,
    }


def curve(rows: list, cfg: DedupConfig, work: Path) -> dict:
    """Recall and false removals per threshold, from the run's own shingles, minhashes and LSH bands."""
    sig = KoreanSignature(str(work), cfg)
    sigs = np.stack([np.array(sig.get_signature(sig.get_shingles(t)), dtype=np.uint64).reshape(-1) for t, _, _ in rows])
    bands = sigs.reshape(len(rows), cfg.bands, cfg.rows)
    base = [i for i, (_, _, k) in enumerate(rows) if k is None]
    copies = [(i, o) for i, (_, o, k) in enumerate(rows) if k is not None]

    def agree(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(share of equal minhashes, any band equal) for every pair of a row of ``a`` with a row of ``b``."""
        eq = sigs[a][:, None, :] == sigs[b][None, :, :]
        cand = (bands[a][:, None] == bands[b][None, :]).all(-1).any(-1)
        return eq.mean(-1), cand

    j_copy = np.array([agree(np.array([i]), np.array([o]))[0][0, 0] for i, o in copies])
    c_copy = np.array([agree(np.array([i]), np.array([o]))[1][0, 0] for i, o in copies])
    b = np.array(base)
    worst = np.zeros(len(base))  # each base document's highest verified agreement with another base document
    for s in range(0, len(b), 64):
        j, cand = agree(b[s : s + 64], b)
        j = np.where(cand, j, 0.0)
        j[np.arange(j.shape[0]), np.arange(s, s + j.shape[0])] = 0.0
        worst[s : s + 64] = j.max(1)
    return {
        f"{t:.2f}": {"recall": float(np.mean(c_copy & (j_copy >= t))), "false_removals": float(np.mean(worst >= t) / 2)}
        for t in THRESHOLDS
    }  # a falsely matched pair removes one of its two documents: half the documents that have one


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, (corpus, by_setting) in zip(axes[0], curves.items()):
        for label, pts in by_setting.items():
            ts = sorted(pts, key=float)
            ax.plot([float(t) for t in ts], [pts[t]["recall"] for t in ts], marker="o", label=f"{label}: recall")
            ax.plot([float(t) for t in ts], [pts[t]["false_removals"] for t in ts], ls="--", marker="x", label=f"{label}: false removals")
        ax.axhline(0.9, color="grey", lw=0.5)
        ax.axvline(DedupConfig().threshold, color="grey", lw=0.5)
        ax.set_title(f"{corpus}: planted copies vs distinct documents")
        ax.set_xlabel("threshold (share of equal minhashes)")
        ax.set_ylabel("share")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", default="konlpy,help-ko")
    ap.add_argument("--planted", type=int, default=350, help="planted near-duplicates per corpus (50 of each kind)")
    ap.add_argument("--mixes", type=int, default=300, help="konlpy: more distinct documents, each a random draw of real sentences")
    ap.add_argument("--max-overlap", type=float, default=0.5, help="base documents share at most this of their word 3-grams")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--curve", action="store_true", help="also the recall / false-removal curve over thresholds")
    ap.add_argument("--png", type=Path, help="draw the curve here")
    ap.add_argument("--filters", action="store_true", help="also the share of each whole corpus every filter removes")
    ap.add_argument("--samples", type=Path, help="with --filters: copy each corpus's samples.jsonl (removed documents) here")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_dedup_"))
    results, curves = {}, {}
    for corpus in args.corpora.split(","):
        base = base_documents(corpus, args.mixes, args.max_overlap)
        rows = plant(base, args.planted, seed=1)
        data = tmp / f"{corpus}.jsonl"
        data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t, _, _ in rows), encoding="utf-8")
        size = data.stat().st_size
        print(f"\n{corpus}: {len(base)} distinct documents + {args.planted} planted copies, {size / 1e6:.2f} MB")
        c = cpu_seconds()
        exact_dedup(data)
        exact = size / 1e6 / (cpu_seconds() - c)
        res = {"documents": len(rows), "bytes": size, "exact_mb_per_cpu_s": exact}
        for name, (cfg, recipe) in RUNS.items():
            cfg = dataclasses.replace(cfg, workers=args.workers)
            r = res[name] = run(data, rows, cfg, recipe, tmp / "out")
            print(
                f"  {name}: recall {r['recall']:.3f} {r['recall_by_kind']}\n"
                f"    base documents removed as duplicates {r['base_removed_as_duplicate']:.2%}; "
                f"candidate pairs {r['candidate_pairs']:,}; removed {r['removed_by_reason']}\n"
                f"    {r['mb_per_cpu_s']:.3f} MB per CPU-second ({r['cpu_seconds']:.1f} CPU s)"
            )
        speed = {k: res["default"]["mb_per_cpu_s"] / res[k]["mb_per_cpu_s"] for k in ("previous", "previous MinHash")}
        print(f"  speed of the defaults: {speed['previous MinHash']:.2f}x the previous MinHash settings on the same documents, "
              f"{speed['previous']:.2f}x the previous run (which dropped more as low_hangul); exact-hash reference {exact:.1f} MB per CPU-second")
        if args.curve:
            curves[corpus] = {label: curve(rows, cfg, tmp / "sig") for label, cfg in CURVE.items()}
            for label, pts in curves[corpus].items():
                print(f"  curve {label}: " + "  ".join(f"t={t} {p['recall']:.2f}/{p['false_removals']:.2%}" for t, p in pts.items()))
            res["curve"] = curves[corpus]
        if args.filters:
            res["filters"] = filter_report(corpus, tmp, args.samples)
            print(f"  filters on all {res['filters']['documents']} documents: {res['filters']['removed_share']}")
        results[corpus] = res
    results["peak_rss_mib"] = max(resource.getrusage(r).ru_maxrss for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
    print(f"\npeak RSS {results['peak_rss_mib']:.0f} MiB")
    if args.png and curves:
        plot(curves, args.png)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
