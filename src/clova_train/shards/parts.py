"""The worker side of `clova tokenize`: read, clean, hash and encode one part of one input.

A part is a byte range of a plain .txt/.jsonl file cut at a document boundary
(:func:`clova_train.text.readers.spans`), or a whole input where ranges are
not possible (compressed, parquet, datasets). The worker returns, per document
in order, the hash of its cleaned text and its token ids, plus the skips it
counted, so the main process only dedups by key, splits and writes.
"""

from __future__ import annotations

import os
from itertools import chain
from pathlib import Path

import numpy as np

from clova_train.shards.format import ShardConfig
from clova_train.shards.keys import digest
from clova_train.text.readers import SkipCounts, Span, clean, count_lines, iter_documents, spans, too_long
from clova_train.tokenizer.bpe import ClovaTokenizer

_tok: ClovaTokenizer | None = None
_cfg: ShardConfig | None = None


def init_worker(tokenizer_dir: str, one_thread: bool, cfg: ShardConfig) -> None:
    """A tokenizing worker's state (guard.worker_pool has made it ignore SIGINT and SIGTERM already)."""
    global _tok, _cfg
    if one_thread:
        # Many worker processes already fill the cores; Rust threads inside each would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tok = ClovaTokenizer.load(tokenizer_dir)
    _cfg = cfg


def part_bytes(cfg: ShardConfig) -> int:
    """Target size of one part: a few encode batches, so a worker's fixed cost per part is small."""
    return 4 * cfg.batch_chars


def plan(path: str) -> list[tuple[int, int]]:
    """The byte ranges of one input (run in a worker: it reads near each cut)."""
    return spans(Path(path), part_bytes(_cfg), _cfg.doc_sep)


def lines_in(path: str, start: int, end: int) -> int:
    return count_lines(Path(path), start, end)


class PartResult:
    """What one part holds, in document order: 16-byte digests, where each is, skips, and the tokens and
    lengths as (train, valid) pairs, each in document order."""

    __slots__ = ("digests", "wheres", "tokens", "lengths", "reader_skips", "clean_skips", "read")

    def __init__(self, digests, wheres, tokens, lengths, reader_skips, clean_skips, read):
        self.digests, self.wheres, self.tokens, self.lengths = digests, wheres, tokens, lengths
        self.reader_skips, self.clean_skips, self.read = reader_skips, clean_skips, read


def read_part(path: str, span: Span | None, encode: bool, dtype: str) -> PartResult:
    """Documents of one part, cleaned and hashed; their tokens (each plus end-of-document) when ``encode``."""
    cfg = _cfg
    p = Path(path)
    reader_skips, clean_skips = SkipCounts(), SkipCounts()
    texts: list[str] = []
    wheres: list[str] = []
    digests: list[bytes] = []
    read = 0
    docs = iter_documents(p, text_key=cfg.text_key, doc_sep=cfg.doc_sep, on_error=cfg.on_error, skips=reader_skips, span=span)
    for doc in docs:
        read += 1
        text = _clean(doc.text, doc.where, path, clean_skips)
        if text is None:
            continue
        texts.append(text)
        wheres.append(doc.where)
        digests.append(digest(text.encode("utf-8")))
    digests = b"".join(digests)
    tokens = lengths = None
    if encode:
        # Grouped by split here, so that the main process writes each group as it comes (no copy) unless
        # a duplicate has to go.
        tokens, lengths = _encode(texts, dtype)
        valid = split_of(digests, _cfg.valid_fraction)[1].astype(bool)
        per_token = np.repeat(valid, lengths)
        tokens = (tokens[~per_token], tokens[per_token])
        lengths = (lengths[~valid], lengths[valid])
    return PartResult(digests, _compact(wheres), tokens, lengths, reader_skips, clean_skips, read)


def split_of(digests: bytes, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(keys, split: 1 for valid) of each document from its 16-byte digests; see keys.digest()."""
    words = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
    return words[:, 0], (words[:, 1] < np.uint64(int(valid_fraction * 2**64))).astype(np.int8)


def _compact(wheres: list[str]) -> tuple[str, np.ndarray] | list[str]:
    """(prefix, numbers) when every location is "<prefix> N" ("line N" for text and jsonl): one array
    to send back, not a string per document."""
    if not wheres:
        return wheres
    head = wheres[0].rpartition(" ")[0] + " "
    if not all(w.startswith(head) and w[len(head) :].isdigit() for w in wheres):
        return wheres
    return head[:-1], np.array([int(w[len(head) :]) for w in wheres], dtype=np.int64)


def where_of(wheres: tuple[str, np.ndarray] | list[str], i: int) -> str:
    """The location of document i of a part (see _compact)."""
    if isinstance(wheres, tuple):
        return f"{wheres[0]} {int(wheres[1][i])}"
    return wheres[i]


def _clean(raw: str, where: str, path: str, skips: SkipCounts) -> str | None:
    cfg = _cfg
    if too_long(raw, cfg.max_chars, path, where, cfg.on_error, skips):
        return None
    text = clean(raw, _tok.normalization)
    if not text or text.isspace():
        skips.add("empty_after_cleaning", f"{path}:{where}")
        return None
    if len(text) < cfg.min_chars:
        skips.add("too_short", f"{path}:{where}")
        return None
    return text


def _encode(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of every text plus the end-of-document token, concatenated, and per-document lengths."""
    ids: list[list[int]] = []
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= _cfg.batch_chars:
            ids.extend(_tok.encode_batch(batch))
            batch, chars = [], 0
    if batch:
        ids.extend(_tok.encode_batch(batch))
    eod = _tok.eod_id
    for x in ids:
        x.append(eod)
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    tokens = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths
