"""Morpheme-aware byte-level BPE (HyperCLOVA's tokenizer).

Text is normalised (NFC by default), cut into morphemes by MeCab-ko (see
:mod:`clova_train.tokenizer.morph`), and byte-level BPE is learned and applied inside
each morpheme only, so no token ever crosses a morpheme boundary.

Encoding is fast because both segmentation and BPE are per eojeol: the ids of
an eojeol never depend on its neighbours, so they are cached. A document costs
one regex split plus dictionary look-ups; only unseen eojeols go through
MeCab and the Rust BPE (in one batched call).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from clova_train import __version__
from clova_train.text.readers import (
    NORMALIZATIONS,
    SkipCounts,
    check_inputs,
    check_read_options,
    input_size,
    iter_documents,
    normalize,
)
from clova_train.core.errors import ClovaError
from clova_train.tokenizer.morph import EOJEOL, MAX_CACHED_CHARS, MorphSegmenter, analyzer_info
from clova_train.core.progress import console, progress_bar
from clova_train.core.files import atomic_write_json, file_sha256, replace_dir

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "clova_tokenizer.json"
# Shipped with every export as the tokenizer class `AutoTokenizer` loads (trust_remote_code).
REMOTE_CODE = Path(__file__).with_name("tokenization_clova.py")
FORMAT_VERSION = 1
BYTE_ALPHABET = 256
# Joins repeated morphemes into one string while training, so Rust does the
# counting; a noncharacter, so real text essentially never contains it.
_TRAIN_SEP = "\uffff"


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
    """Threads for BPE training (0: all cores)."""

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


def train_tokenizer(
    inputs: Sequence[str | Path], out_dir: str | Path, cfg: TokenizerConfig, *, show_progress: bool = True
) -> dict:
    """Learn a morpheme-aware byte-level BPE from ``inputs`` into ``out_dir``; return a report."""
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
    with progress_bar("reading", sum(input_size(p) for p in paths), enabled=show_progress, unit="bytes") as advance:
        for path in paths:
            n_before = docs_read
            size = input_size(path)
            seen = 0
            for doc in iter_documents(
                path, text_key=cfg.text_key, doc_sep=cfg.doc_sep, on_error=cfg.on_error, skips=skips
            ):
                docs_read += 1
                nbytes = len(doc.text) + 1  # characters: cheap and close enough for a bar
                seen += nbytes
                if seen <= size:
                    advance(nbytes)
                if not _keep(doc.text, cfg.sample_fraction, cfg.seed):
                    continue
                text = normalize(doc.text, cfg.normalization)
                docs_used += 1
                chars += len(text)
                eojeols.update(EOJEOL.findall(text))
            if seen < size:
                advance(size - seen)
            inputs_meta.append(
                {"path": str(path), "bytes": size, "sha256": file_sha256(path), "documents": docs_read - n_before}
            )
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
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(str(tmp / TOKENIZER_FILE))
    atomic_write_json(tmp / META_FILE, meta)
    replace_dir(tmp, out_dir)
    return {
        "out": str(out_dir),
        "vocab_size": meta["vocab_size"],
        "documents_read": docs_read,
        "documents_used": docs_used,
        "skipped": skips.to_dict(),
        "characters": chars,
        "unique_eojeols": len(eojeols),
        "unique_morphemes": len(morphemes),
        "seconds": {"read": t_read, "segment": t_seg, "bpe": t_bpe, "total": time.perf_counter() - t0},
    }


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class ClovaTokenizer:
    """A trained morpheme-aware tokenizer: ``ClovaTokenizer.load(dir)``."""

    def __init__(self, path: Path, meta: dict, tokenizer_json: str, cache_entries: int = 1 << 21):
        from tokenizers import Tokenizer

        self.path = path
        self.meta = meta
        self.normalization: str = meta["normalization"]
        self.special_tokens: list[str] = list(meta["special_tokens"])
        self._full = Tokenizer.from_str(tokenizer_json)
        # Encoding uses a copy without added tokens, so text that happens to
        # spell "<|endoftext|>" is encoded as text, never as the control token.
        plain = json.loads(tokenizer_json)
        plain["added_tokens"] = []
        self._plain = Tokenizer.from_str(json.dumps(plain))
        self._segmenter = MorphSegmenter()
        self._cache: dict[str, list[int]] = {}
        self._morph_cache: dict[str, list[int]] = {}
        self._cache_entries = cache_entries
        self.eod_id: int = self._full.token_to_id(meta["eod_token"])
        if self.eod_id is None:
            raise ClovaError(f"{path}: end-of-document token {meta['eod_token']!r} is not in the vocabulary")
        self.hash = hashlib.sha256(
            tokenizer_json.encode("utf-8")
            + json.dumps(
                {k: meta.get(k) for k in ("normalization", "special_tokens", "dictionary_package", "segmentation")},
                sort_keys=True,
            ).encode()
        ).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> "ClovaTokenizer":
        path = Path(path)
        tj, mj = path / TOKENIZER_FILE, path / META_FILE
        if not tj.is_file() or not mj.is_file():
            raise ClovaError(
                f"{path}: not a clova tokenizer directory (needs {TOKENIZER_FILE} and {META_FILE}); "
                "train one with `clova tokenizer train`"
            )
        meta = json.loads(mj.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ClovaError(f"{mj}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
        info = analyzer_info()
        if meta.get("dictionary_package") != info["dictionary_package"]:
            raise ClovaError(
                f"{path}: trained with {meta.get('dictionary_package')} but {info['dictionary_package']} is "
                "installed; segmentation (and so ids) would differ: install the recorded version"
            )
        return cls(path, meta, tj.read_text(encoding="utf-8"))

    @property
    def vocab_size(self) -> int:
        return self._full.get_vocab_size()

    def normalize(self, text: str) -> str:
        return normalize(text, self.normalization)

    def segment(self, text: str) -> list[str]:
        """Morpheme pieces of the normalised text; they concatenate back to it."""
        return self._segmenter.segment(self.normalize(text))

    def _encode_eojeols(self, words: Iterable[str]) -> dict[str, list[int]]:
        # BPE never crosses a morpheme, so a morpheme's ids are the same wherever
        # it occurs: cache them too, and send only unseen morphemes to Rust, each
        # as one plain string (3x cheaper than pre-tokenized lists).
        words = list(words)
        pieces = [self._segmenter.segment_eojeol(w) for w in words]
        mcache = self._morph_cache
        new = list({m for p in pieces for m in p if m not in mcache})
        if new:
            if len(mcache) + len(new) > self._cache_entries:
                mcache.clear()
                new = list({m for p in pieces for m in p})
            for m, enc in zip(new, self._plain.encode_batch(new, add_special_tokens=False)):
                mcache[m] = enc.ids
        return {w: list(chain.from_iterable(mcache[m] for m in p)) for w, p in zip(words, pieces)}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text (no end-of-document token appended)."""
        norm = self.normalization
        docs = [EOJEOL.findall(t if norm == "none" else normalize(t, norm)) for t in texts]
        cache = self._cache
        missing = {w for ws in docs for w in ws if w not in cache}
        if len(cache) + len(missing) > self._cache_entries:
            # Clear before encoding, then encode every word of the batch, so
            # no look-up below depends on an entry the clear removed.
            cache.clear()
            missing = {w for ws in docs for w in ws}
        extra: dict[str, list[int]] = {}
        if missing:
            found = self._encode_eojeols(missing)
            for w, ids in found.items():
                (cache if len(w) <= MAX_CACHED_CHARS else extra)[w] = ids
        if extra:
            lookup = lambda w: cache[w] if w in cache else extra[w]  # noqa: E731
        else:
            lookup = cache.__getitem__
        return [list(chain.from_iterable(map(lookup, ws))) for ws in docs]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self._full.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._full.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._full.token_to_id(token)

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes a token stands for (special tokens: their UTF-8 text)."""
        tok = self._full.id_to_token(i)
        if tok in self.special_tokens:
            return tok.encode("utf-8")
        table = _BYTE_DECODER
        return bytes(table[c] for c in tok)


_BYTE_DECODER = _byte_decoder()


def count_crossing(piece_lengths: Iterable[int], token_lengths: Iterable[int]) -> int:
    """How many tokens have a morpheme boundary strictly inside them (byte lengths in)."""
    bounds, pos = set(), 0
    for n in piece_lengths:
        pos += n
        bounds.add(pos)
    crossing = start = 0
    for n in token_lengths:
        end = start + n
        if any(b in bounds for b in range(start + 1, end)):
            crossing += 1
        start = end
    return crossing


def crossing_tokens(tok: ClovaTokenizer, text: str) -> tuple[int, int]:
    """(tokens, tokens spanning a morpheme boundary) for ``text``, measured independently.

    Boundaries come from :meth:`ClovaTokenizer.segment`, token spans from the
    bytes of the ids :meth:`ClovaTokenizer.encode` produced, so a bug in the
    cached encode path shows up here.
    """
    ids = tok.encode(text)
    pieces = (len(p.encode("utf-8")) for p in tok.segment(text))
    return len(ids), count_crossing(pieces, (len(tok.token_bytes(i)) for i in ids))


def tokenizer_stats(tok: ClovaTokenizer, inputs: Sequence[str | Path], *, text_key: str = "text", limit: int = 0) -> dict:
    """Encode throughput and compression on ``inputs``, plus the morpheme-crossing check."""
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
    crossing = sum(crossing_tokens(tok, t)[1] for t in texts)
    roundtrip_failures = sum(tok.decode(i) != tok.normalize(t) for i, t in zip(ids, texts))
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
