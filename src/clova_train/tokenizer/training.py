"""Learning the tokenizer (`clova tokenizer train`) and measuring one (`clova tokenizer stats`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import Counter
import multiprocessing as mp
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from clova_train import __version__
from clova_train.tokenizer.bpe import BYTE_ALPHABET, FORMAT_VERSION, META_FILE, TOKENIZER_FILE, ClovaTokenizer, crossing_tokens
from clova_train.text.readers import (
    NORMALIZATIONS,
    SkipCounts,
    Span,
    check_inputs,
    check_read_options,
    clean,
    count_lines,
    input_size,
    iter_documents,
    spans,
)
from clova_train.core.errors import ClovaError
from clova_train.tokenizer.morph import EOJEOL, MorphSegmenter, analyzer_info
from clova_train.core.progress import console, progress_bar
from clova_train.core.files import atomic_write_json, file_sha256, replace_dir, tmp_name


# Joins repeated morphemes into one string while training, so Rust does the
# counting; a noncharacter, so real text essentially never contains it.
_TRAIN_SEP = "\uffff"
# A vocabulary under this share of the requested size is reported as a warning with its fix.
SHORT_VOCAB = 0.5


@dataclass
class TokenizerConfig:
    """How a tokenizer is learned. Loaded strictly from tokenizer/*.json recipes."""

    vocab_size: int = 51200
    """Total vocabulary, special tokens included (the model pads it to a multiple of 128)."""
    min_frequency: int = 2
    """A merge must be seen this often to be learned."""
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>", "<|pad|>"])
    """Tokens never produced from text; the first one is the end-of-document token."""
    normalization: str = "NFC"
    """Unicode normalisation applied before segmentation: NFC, NFKC or none."""
    sample_fraction: float = 1.0
    """Fraction of documents used (the paper learned its tokenizer on about 1%)."""
    seed: int = 0
    """Seed of the stable, hash-based document sample."""
    text_key: str = "text"
    """Field holding the text in jsonl, parquet and datasets inputs."""
    doc_sep: str = "line"
    """In .txt inputs, one document per line or per blank-line-separated block."""
    on_error: str = "raise"
    """raise: stop at the first bad document; skip: count it by reason and go on."""
    workers: int = 0
    """Threads for BPE training and processes reading the inputs (0: all cores); never changes the tokenizer."""

    def __post_init__(self) -> None:
        if not self.special_tokens:
            raise ClovaError("special_tokens must name at least the end-of-document token")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ClovaError(f"special_tokens has duplicates: {self.special_tokens}")
        floor = BYTE_ALPHABET + len(self.special_tokens)
        if self.vocab_size < floor + 1:
            raise ClovaError(
                f"vocab_size {self.vocab_size} is too small: the byte alphabet ({BYTE_ALPHABET}) plus "
                f"{len(self.special_tokens)} special tokens already take {floor}; use a larger --vocab-size"
            )
        if self.min_frequency < 1:
            raise ClovaError(f"min_frequency must be >= 1, not {self.min_frequency}")
        if self.normalization not in NORMALIZATIONS:
            raise ClovaError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {self.normalization!r}")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ClovaError(f"sample_fraction must be in (0, 1], not {self.sample_fraction}")
        check_read_options(self.doc_sep, self.on_error, self.workers)

    @property
    def eod_token(self) -> str:
        return self.special_tokens[0]


def _keep(text: str, fraction: float, seed: int) -> bool:
    """Stable document sample: the same text is kept or dropped on every run."""
    if fraction >= 1.0:
        return True
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(h, "little") < fraction * 2**64


def _train_stream(morphemes: Counter, batch_chars: int = 1 << 16) -> Iterator[str]:
    """Each morpheme as often as it occurred, joined by a separator Rust splits on."""
    for m, c in morphemes.items():
        reps = max(1, batch_chars // (len(m) + 1))
        unit = m + _TRAIN_SEP
        while c > 0:
            n = min(c, reps)
            yield unit * n
            c -= n


def _read_task(task: tuple[str, Span | None, TokenizerConfig]) -> tuple[Counter, SkipCounts, int, int, int]:
    """Eojeol counts of the sampled documents of one part of an input, with its skips and counts."""
    path, span, cfg = task
    skips = SkipCounts()
    eojeols: Counter = Counter()
    read = used = chars = 0
    for doc in iter_documents(Path(path), text_key=cfg.text_key, doc_sep=cfg.doc_sep, on_error=cfg.on_error, skips=skips, span=span):
        read += 1
        if not _keep(doc.text, cfg.sample_fraction, cfg.seed):
            continue
        text = clean(doc.text, cfg.normalization)
        used += 1
        chars += len(text)
        eojeols.update(EOJEOL.findall(text))
    return eojeols, skips, read, used, chars


def _plan(paths: list[Path], doc_sep: str, part_bytes: int, pool) -> list[tuple[int, Path, Span | None]]:
    """(input index, path, span) of every part in input order; a whole input where it cannot be split."""
    out = []
    for i, path in enumerate(paths):
        ranges = spans(path, part_bytes, doc_sep)
        if len(ranges) == 1:
            out.append((i, path, None))
            continue
        jobs = [(path, a, b) for a, b in ranges]
        lines = pool.starmap(count_lines, jobs) if pool is not None else [count_lines(*j) for j in jobs]
        before = 0
        for (a, b), n in zip(ranges, lines):
            out.append((i, path, (a, b, before)))
            before += n
    return out


@contextmanager
def _reading_pool(workers: int):
    """Processes that read parts of the inputs (None for one), so reading scales with the cores."""
    n = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if n <= 1:
        yield None
        return
    # fork: before any Rust thread exists in this process, and it starts in milliseconds.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(n) as pool:
        yield pool


def train_tokenizer(
    inputs: Sequence[str | Path], out_dir: str | Path, cfg: TokenizerConfig, *, show_progress: bool = True,
    part_bytes: int = 1 << 22,
) -> dict:
    """Learn a morpheme-aware byte-level BPE from ``inputs`` into ``out_dir``; return a report.

    Worker processes read parts of about ``part_bytes`` (byte ranges of plain text and jsonl, whole inputs
    otherwise) and count the eojeols of the sampled documents; the counts are merged in input order, so the
    tokenizer is the same for any number of workers. The sample is by a hash of each text, so every
    document is still read, but only the sampled ones are cleaned and counted."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    paths = check_inputs(list(inputs))
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / META_FILE).exists():
        raise ClovaError(f"{out_dir}: exists and is not a tokenizer directory; choose another --out")
    if cfg.workers:
        # tokenizers sizes its Rust thread pool from this on first use.
        os.environ["RAYON_RS_NUM_CPUS"] = str(cfg.workers)

    t0 = time.perf_counter()
    segmenter = MorphSegmenter()
    skips = SkipCounts()
    eojeols: Counter = Counter()
    docs_read = docs_used = chars = 0
    inputs_meta = []
    sha = {}
    with progress_bar("reading", sum(input_size(p) for p in paths), enabled=show_progress, unit="bytes") as advance, _reading_pool(
        cfg.workers
    ) as pool:
        if pool is not None:
            sha = {p: pool.apply_async(file_sha256, (p,)) for p in paths}
        parts = _plan(paths, cfg.doc_sep, part_bytes, pool)
        results = pool.imap(_read_task, [(str(p), span, cfg) for _, p, span in parts]) if pool else (
            _read_task((str(p), span, cfg)) for _, p, span in parts
        )
        counts = [0] * len(paths)
        for (i, path, span), (part_eojeols, part_skips, read, used, n_chars) in zip(parts, results):
            eojeols.update(part_eojeols)  # in input order: the same counts in the same first-seen order as one reader
            skips.merge(part_skips)
            docs_read, docs_used, chars = docs_read + read, docs_used + used, chars + n_chars
            counts[i] += read
            advance(span[1] - span[0] if span else input_size(path))
        for i, path in enumerate(paths):
            digest = sha[path].get() if path in sha else file_sha256(path)
            inputs_meta.append({"path": str(path), "bytes": input_size(path), "sha256": digest, "documents": counts[i]})
    if not eojeols:
        raise ClovaError(
            f"no text to learn from: {docs_read} documents read, {docs_used} kept, {skips.total} skipped; "
            "check the inputs, --text-key and --sample-fraction"
        )
    t_read = time.perf_counter() - t0

    morphemes: Counter = Counter()
    with progress_bar("segmenting", len(eojeols), enabled=show_progress) as advance:
        for i, (w, c) in enumerate(eojeols.items()):
            for m in segmenter.segment_eojeol(w):
                morphemes[m] += c
            if i % 4096 == 4095:
                advance(4096)
        advance(len(eojeols) % 4096)
    t_seg = time.perf_counter() - t0 - t_read

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(_TRAIN_SEP, behavior="removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with console.status("learning BPE merges inside morphemes", spinner="dots") if show_progress else nullcontext():
        tok.train_from_iterator(_train_stream(morphemes), trainer=trainer)
    # At inference each morpheme arrives as its own pre-tokenized word.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    t_bpe = time.perf_counter() - t0 - t_read - t_seg

    meta = {
        "format_version": FORMAT_VERSION,
        "clova_train_version": __version__,
        "kind": "morpheme-aware byte-level BPE",
        **analyzer_info(),
        "normalization": cfg.normalization,
        "special_tokens": list(cfg.special_tokens),
        "eod_token": cfg.eod_token,
        "eod_id": tok.token_to_id(cfg.eod_token),
        "vocab_size": tok.get_vocab_size(),
        "config": asdict(cfg),
        "inputs": inputs_meta,
        "documents": {"read": docs_read, "used": docs_used, "skipped": skips.to_dict()},
        "characters": chars,
        "unique_eojeols": len(eojeols),
        "unique_morphemes": len(morphemes),
    }
    tmp = tmp_name(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(str(tmp / TOKENIZER_FILE))
    atomic_write_json(tmp / META_FILE, meta)
    replace_dir(tmp, out_dir)
    return {
        "out": str(out_dir),
        "vocab_size": meta["vocab_size"],
        "warnings": _vocab_warnings(meta["vocab_size"], cfg, docs_used),
        "documents_read": docs_read,
        "documents_used": docs_used,
        "skipped": skips.to_dict(),
        "characters": chars,
        "unique_eojeols": len(eojeols),
        "unique_morphemes": len(morphemes),
        "seconds": {"read": t_read, "segment": t_seg, "bpe": t_bpe, "total": time.perf_counter() - t0},
    }


def _vocab_warnings(got: int, cfg: TokenizerConfig, docs_used: int) -> list[str]:
    """A vocabulary far below the one asked for: the text learned from was too small to fill it (BPE
    stops when no pair occurs ``min_frequency`` times), which a user must hear about, with the fix."""
    if got >= cfg.vocab_size * SHORT_VOCAB:
        return []
    fix = (f"a larger --sample-fraction (it was {cfg.sample_fraction:g}; 1 learns on every document), more text"
           if cfg.sample_fraction < 1 else "more text")
    return [f"the vocabulary has {got:,} tokens where {cfg.vocab_size:,} were asked: {docs_used:,} documents were "
            f"learned from, too few to fill it; use {fix}, or a smaller --vocab-size"]


def tokenizer_stats(tok: ClovaTokenizer, inputs: Sequence[str | Path], *, text_key: str = "text", limit: int = 0,
                    advance: Callable[[int], None] | None = None) -> dict:
    """Encode throughput and compression on ``inputs``, plus the morpheme-crossing check.

    ``advance(n)`` is called as documents are checked (the slow part: each is
    segmented and encoded again morpheme by morpheme).
    """
    texts: list[str] = []
    for path in check_inputs(list(inputs)):
        for doc in iter_documents(path, text_key=text_key):
            texts.append(doc.text)
            if limit and len(texts) >= limit:
                break
        if limit and len(texts) >= limit:
            break
    if not texts:
        raise ClovaError("no documents to measure in the given inputs")
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    t0 = time.perf_counter()
    ids = tok.encode_batch(texts)
    dt = time.perf_counter() - t0
    n_tokens = sum(map(len, ids))
    chars = sum(len(t) for t in texts)
    words = sum(len(t.split()) for t in texts)
    crossing = roundtrip_failures = 0
    for i, t in zip(ids, texts):
        crossing += crossing_tokens(tok, t)[1]
        roundtrip_failures += tok.decode(i) != tok.normalize(t)
        if advance:
            advance(1)
    return {
        "documents": len(texts),
        "bytes": nbytes,
        "tokens": n_tokens,
        "encode_mb_per_s": nbytes / 1e6 / dt if dt > 0 else float("inf"),
        "tokens_per_char": n_tokens / max(chars, 1),
        "tokens_per_word": n_tokens / max(words, 1),
        "bytes_per_token": nbytes / max(n_tokens, 1),
        "crossing_tokens": crossing,
        "crossing_fraction": crossing / max(n_tokens, 1),
        "roundtrip_failures": roundtrip_failures,
    }
