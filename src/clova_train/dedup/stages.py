"""The datatrove pipeline steps of `clova dedup`, one task per input file (bucket and count stages: one per partition).

Stages, each a datatrove executor run whose completed tasks are skipped on a
rerun (datatrove's completion markers), so a killed run continues:

1. read: an input through :func:`iter_documents`, cleaned as `clova tokenize`
   cleans (control characters out, NFC), the per-document quality filters;
   the line keys of the survivors go to hash partitions.
2. count: per partition, lines found in ``boilerplate_min_docs`` documents.
3. signature: boilerplate lines stripped, then datatrove's MinHash signature
   step with Korean shingles; the full signatures are kept for verification.
4. buckets: datatrove's MinhashDedupBuckets (candidate pairs per band).
5. cluster: candidate pairs verified against ``threshold``, union-find where
   the earliest document of a cluster (input order, then position) is kept.
6. write: the kept documents of each input, in input order, as one part.

Every file a step writes appears under its final name only when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
from datatrove.data import Document as DtDocument
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.word_tokenizers import WordTokenizer

from clova_train.core.files import atomic_write_json, file_sha256, fsync_path
from clova_train.dedup.config import DedupConfig
from clova_train.text.quality import QualityRecipe, check_document, line_keys, strip_boilerplate
from clova_train.text.readers import SkipCounts, input_size, iter_documents, normalize, strip_control, too_long

# Test hook: when this stage's task of this rank starts (e.g. "signature:1"), SIGKILL goes to the whole
# process group, as a killed job's processes all die at once; run the command in its own session.
EXIT_AT_ENV = "CLOVA_TEST_DEDUP_EXIT_AT"
# datatrove's default normalisation NFD-decomposes text and drops combining marks, which turns every
# Hangul syllable into jamo; Korean keeps its syllables (the text is already NFC).
_NORM = TextNormConfig(norm_unicode_diacritics=False)
SAMPLE_CHARS = 2000


def _maybe_die(stage: str, rank: int) -> None:
    if os.environ.get(EXIT_AT_ENV) == f"{stage}:{rank}":
        os.killpg(os.getpgrp(), signal.SIGKILL)


# ------------------------------------------------------------------ small file helpers


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _commit(tmp: Path, path: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, path)


class JsonlZstWriter:
    """zstd-compressed JSON lines under a temporary name, renamed into place when the block ends without error."""

    def __init__(self, path: Path):
        self.path = path
        self.n = 0

    def __enter__(self) -> "JsonlZstWriter":
        import zstandard

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _tmp(self.path)
        self._raw = open(self._tmp, "wb")
        self._z = zstandard.ZstdCompressor(level=3).stream_writer(self._raw, closefd=False)
        return self

    def write(self, rec: dict) -> None:
        self._z.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        self.n += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._z.close()
        self._raw.close()
        if exc_type is None:
            _commit(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def write_jsonl_zst(path: Path, records: Iterator[dict]) -> int:
    """Write records as zstd-compressed JSON lines, atomically; return how many."""
    with JsonlZstWriter(path) as w:
        for rec in records:
            w.write(rec)
    return w.n


def read_jsonl_zst(path: Path) -> Iterator[dict]:
    """Records written by :func:`write_jsonl_zst` (this run's own files)."""
    import zstandard

    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as z:
        for line in io.TextIOWrapper(z, encoding="utf-8"):
            yield json.loads(line)


def save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path).with_suffix(".npy")
    np.save(tmp, array)
    _commit(tmp, path)


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


# ------------------------------------------------------------------ removed-document bookkeeping


class Removed:
    """Removed documents of one task counted by reason, with a seeded sample per reason.

    The sample keeps the documents with the smallest blake2b(seed, id), so it
    is the same for any grouping of documents into tasks and merges exactly.
    """

    def __init__(self, seed: int, per_reason: int):
        self.seed = seed
        self.per_reason = per_reason
        self.counts: dict[str, int] = {}
        self.samples: dict[str, list] = {}

    def add(self, reason: str, doc_id, text: str, kept_id=None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if not self.per_reason:
            return
        key = hashlib.blake2b(f"{self.seed}\0{doc_id}".encode(), digest_size=8).hexdigest()
        bucket = self.samples.setdefault(reason, [])
        if len(bucket) >= self.per_reason and key >= bucket[-1]["key"]:
            return
        rec = {"key": key, "reason": reason, "id": doc_id, "text": text[:SAMPLE_CHARS]}
        if kept_id is not None:
            rec["kept_id"] = kept_id
        bucket.append(rec)
        bucket.sort(key=lambda r: r["key"])
        del bucket[self.per_reason :]

    def to_dict(self) -> dict:
        return {"counts": self.counts, "samples": self.samples}


# ------------------------------------------------------------------ 1. read


class ReadStep(PipelineStep):
    """Task r: read input r, clean, apply the per-document filters, partition the survivors' line keys."""

    name = "clova read + quality"
    type = "clova"

    def __init__(self, work: str, inputs: list[str], names: list[str], cfg: DedupConfig, recipe: QualityRecipe):
        super().__init__()
        self.work, self.inputs, self.names, self.cfg, self.recipe = Path(work), inputs, names, cfg, recipe

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        _maybe_die("read", rank)
        cfg, path = self.cfg, self.inputs[rank]
        skips = SkipCounts()
        removed = Removed(cfg.seed, cfg.samples_per_reason)
        parts: list[list[np.ndarray]] = [[] for _ in range(cfg.line_partitions)]
        yielded = 0

        def survivors() -> Iterator[dict]:
            nonlocal yielded
            docs = iter_documents(path, text_key=cfg.text_key, doc_sep=cfg.doc_sep, on_error=cfg.on_error, skips=skips, fields=True)
            for doc in docs:
                if too_long(doc.text, cfg.max_chars, path, doc.where, cfg.on_error, skips):
                    continue
                yielded += 1
                doc_id = document_id(doc.fields, f"{self.names[rank]}:{doc.where}")
                text = normalize(strip_control(doc.text), "NFC")
                reason = check_document(text, self.recipe)
                if reason is not None:
                    removed.add(reason, doc_id, text)
                    continue
                keys = np.array(line_keys(text, self.recipe), dtype=np.int64)
                for p in range(cfg.line_partitions):
                    mine = keys[keys % cfg.line_partitions == p]
                    if mine.size:
                        parts[p].append(mine)
                yield {"id": doc_id, "text": text, "fields": jsonable(doc.fields)}

        kept = write_jsonl_zst(self.work / "docs" / f"{rank:05d}.jsonl.zst", survivors())
        for p, arrays in enumerate(parts):
            save_npy(self.work / "lines" / f"{p:03d}" / f"{rank:05d}.npy", np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
        save_json(
            self.work / "read" / f"{rank:05d}.json",
            {
                "path": path,
                "bytes": input_size(Path(path)),
                "sha256": file_sha256(path),
                "documents_read": yielded + skips.total,
                "passed": kept,
                "reader_skips": skips.to_dict(),
                "removed": removed.to_dict(),
            },
        )


# ------------------------------------------------------------------ 2. count


class CountLinesStep(PipelineStep):
    """Task p: the line keys of partition p found in at least ``boilerplate_min_docs`` documents."""

    name = "clova boilerplate lines"
    type = "clova"

    def __init__(self, work: str, n_inputs: int, recipe: QualityRecipe):
        super().__init__()
        self.work, self.n_inputs, self.recipe = Path(work), n_inputs, recipe

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        _maybe_die("count", rank)
        arrays = [np.load(self.work / "lines" / f"{rank:03d}" / f"{r:05d}.npy") for r in range(self.n_inputs)]
        keys = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        uniq, counts = np.unique(keys, return_counts=True)
        save_npy(self.work / "boilerplate" / f"{rank:03d}.npy", uniq[counts >= self.recipe.boilerplate_min_docs])


# ------------------------------------------------------------------ 3. signature


def load_boilerplate(work: Path, partitions: int) -> np.ndarray:
    arrays = [np.load(work / "boilerplate" / f"{p:03d}.npy") for p in range(partitions)]
    return np.sort(np.concatenate(arrays)) if arrays else np.zeros(0, np.int64)


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class BoilerplateStep(PipelineStep):
    """Task r: strip boilerplate lines from input r's survivors and hand them on as datatrove documents."""

    name = "clova boilerplate"
    type = "clova"

    def __init__(self, work: str, cfg: DedupConfig, recipe: QualityRecipe):
        super().__init__()
        self.work, self.cfg, self.recipe = Path(work), cfg, recipe

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        _maybe_die("signature", rank)
        boilerplate = load_boilerplate(self.work, self.cfg.line_partitions)
        removed = Removed(self.cfg.seed, self.cfg.samples_per_reason)
        hashes: list[int] = []
        ids: list[str] = []
        stripped = 0
        with JsonlZstWriter(self.work / "survivors" / f"{rank:05d}.jsonl.zst") as w:
            for rec in read_jsonl_zst(self.work / "docs" / f"{rank:05d}.jsonl.zst"):
                text, n = strip_boilerplate(rec["text"], boilerplate, self.recipe)
                if text is None:
                    removed.add("boilerplate", rec["id"], rec["text"])
                    continue
                stripped += n
                hashes.append(text_hash(text))
                ids.append(rec["id"])
                w.write({**rec, "text": text})
                yield DtDocument(text=text, id=str(rec["id"]))
        save_npy(self.work / "hashes" / f"{rank:05d}.npy", np.array(hashes, dtype=np.uint64))
        save_json(self.work / "ids" / f"{rank:05d}.json", ids)
        save_json(self.work / "filtered" / f"{rank:05d}.json", {"lines_stripped": stripped, "removed": removed.to_dict()})


class KoreanWords(WordTokenizer):
    """datatrove's word-tokenizer interface over MeCab-ko morphemes or eojeols (its own Korean choice, Kiwi, is not ours)."""

    def __init__(self, unit: str):
        super().__init__("ko")
        self.unit = unit
        self._segmenter = None

    def word_tokenize(self, text: str) -> list[str]:
        if self.unit == "eojeol":
            return text.split()
        if self._segmenter is None:
            from clova_train.tokenizer.morph import MorphSegmenter

            self._segmenter = MorphSegmenter()
        return [m for m in (p.strip() for p in self._segmenter.segment(text)) if m]

    def sent_tokenize(self, text: str) -> list[str]:
        return [line for line in text.split("\n") if line.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for line in text.split("\n"):
            spans.append((start, start + len(line)))
            start += len(line) + 1
        return spans


class KoreanSignature(MinhashDedupSignature):
    """datatrove's signature step with morpheme or eojeol shingles, also keeping each document's full signature."""

    def __init__(self, work: str, cfg: DedupConfig):
        super().__init__(output_folder=str(Path(work) / "sigs"), config=minhash_config(cfg), language=KoreanWords(cfg.shingle))
        self.work = Path(work)
        self._full: list[np.ndarray] = []

    def tokens(self, text: str) -> list[str]:
        """The shingle units of ``text`` after datatrove's simplification (Hangul kept as syllables)."""
        return self.word_tokenizer.word_tokenize(simplify_text(text, _NORM))

    def get_shingles(self, text: str) -> np.ndarray:
        toks = self.tokens(text) or [text]
        n = min(self.config.n_grams, len(toks))  # a short document is one shingle, not none
        grams = {" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)}
        return np.fromiter((self._hash_func(g.encode("utf-8")) for g in sorted(grams)), dtype=np.uint64).reshape((-1, 1))

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        sig = super().get_signature(shingles)
        self._full.append(np.array(sig, dtype=np.uint64).reshape(-1))
        return sig

    def run(self, data, rank: int = 0, world_size: int = 1):
        self._full = []
        super().run(data, rank, world_size)
        full = np.stack(self._full) if self._full else np.zeros((0, self.num_hashes), np.uint64)
        save_npy(self.work / "fullsig" / f"{rank:05d}.npy", full)


def minhash_config(cfg: DedupConfig) -> MinhashConfig:
    return MinhashConfig(n_grams=cfg.ngram, num_buckets=cfg.bands, hashes_per_bucket=cfg.rows, seed=cfg.seed)


# ------------------------------------------------------------------ 5. cluster


class ClusterStep(PipelineStep):
    """One task: verify candidate pairs, union them, keep the earliest document of each cluster."""

    name = "clova cluster"
    type = "clova"

    def __init__(self, work: str, n_inputs: int, cfg: DedupConfig):
        super().__init__()
        self.work, self.n_inputs, self.cfg = Path(work), n_inputs, cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        _maybe_die("cluster", rank)
        sigs = [np.load(self.work / "fullsig" / f"{r:05d}.npy", mmap_mode="r") for r in range(self.n_inputs)]
        hashes = [np.load(self.work / "hashes" / f"{r:05d}.npy", mmap_mode="r") for r in range(self.n_inputs)]
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            root = x
            while parent.get(root, root) != root:
                root = parent[root]
            while x != root:  # path compression
                parent[x], x = root, parent[x]
            return root

        for f in sorted((self.work / "buckets").glob("*.dups")):
            with open(f, "rb") as fh:
                for f1, d1, f2, d2 in read_tuples_from_file(fh, "4I"):
                    if np.count_nonzero(sigs[f1][d1] == sigs[f2][d2]) < self.cfg.threshold * sigs[f1].shape[1]:
                        continue  # an LSH candidate below the threshold: not a near-duplicate
                    a, b = find(f1 << 32 | d1), find(f2 << 32 | d2)
                    if a != b:  # the earlier document is the root: it is the one kept
                        parent[max(a, b)] = min(a, b)
                        parent.setdefault(min(a, b), min(a, b))
        removals: list[list] = [[] for _ in range(self.n_inputs)]
        for node in sorted(parent):
            root = find(node)
            if root != node:
                r, i, kr, ki = node >> 32, node & 0xFFFFFFFF, root >> 32, root & 0xFFFFFFFF
                exact = hashes[r][i] == hashes[kr][ki]
                removals[r].append((i, "exact_duplicate" if exact else "near_duplicate", kr, ki))
        kept_ids = self._kept_ids(removals)
        for r, rows in enumerate(removals):
            save_json(self.work / "removals" / f"{r:05d}.json", [[i, why, kept_ids[(kr, ki)]] for i, why, kr, ki in rows])

    def _kept_ids(self, removals: list[list]) -> dict[tuple[int, int], str]:
        wanted: dict[int, set[int]] = {}
        for rows in removals:
            for _, _, kr, ki in rows:
                wanted.setdefault(kr, set()).add(ki)
        out = {}
        for r, idx in wanted.items():
            ids = json.loads((self.work / "ids" / f"{r:05d}.json").read_text(encoding="utf-8"))
            out.update({(r, i): ids[i] for i in idx})
        return out


# ------------------------------------------------------------------ 6. write


class WriteStep(PipelineStep):
    """Task r: input r's kept documents as DIR/part-r.jsonl.zst, its removed duplicates listed with the kept id."""

    name = "clova write"
    type = "clova"

    def __init__(self, work: str, out_dir: str, cfg: DedupConfig):
        super().__init__()
        self.work, self.out_dir, self.cfg = Path(work), Path(out_dir), cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        _maybe_die("write", rank)
        rows = json.loads((self.work / "removals" / f"{rank:05d}.json").read_text(encoding="utf-8"))
        drop = {i: (why, kept) for i, why, kept in rows}
        removed = Removed(self.cfg.seed, self.cfg.samples_per_reason)
        dups: list[dict] = []

        def kept() -> Iterator[dict]:
            for i, rec in enumerate(read_jsonl_zst(self.work / "survivors" / f"{rank:05d}.jsonl.zst")):
                if i in drop:
                    why, kept_id = drop[i]
                    removed.add(why, rec["id"], rec["text"], kept_id)
                    dups.append({"id": rec["id"], "reason": why, "kept_id": kept_id})
                    continue
                yield output_record(rec)

        n = write_jsonl_zst(self.out_dir / part_name(rank), kept())
        write_jsonl_zst(self.work / "duplicates" / f"{rank:05d}.jsonl.zst", iter(dups))
        save_json(self.work / "written" / f"{rank:05d}.json", {"kept": n, "removed": removed.to_dict()})


def jsonable(value):
    """A parquet or `datasets` value as JSON can hold it (dates and other objects as their string)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def document_id(fields: dict | None, generated: str):
    """The input row's own ``id`` when it has one (any JSON scalar), else ``INPUT:line N``."""
    own = (fields or {}).get("id")
    return own if isinstance(own, (str, int, float)) and not isinstance(own, bool) else generated


def output_record(rec: dict) -> dict:
    """A kept document as written: the input row's fields in their order, its cleaned text, its id."""
    out = dict(rec["fields"] or {})
    out["text"] = rec["text"]
    out["id"] = rec["id"]
    return out


def part_name(rank: int) -> str:
    return f"part-{rank:05d}.jsonl.zst"


def count_pairs(work: Path) -> int:
    """Candidate pairs the bucket stage found (for the report)."""
    size = struct.calcsize("<4I")
    return sum(f.stat().st_size // size for f in (work / "buckets").glob("*.dups"))
