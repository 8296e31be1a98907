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

import copy
import hashlib
import json
import re
from itertools import chain
from pathlib import Path
from typing import Iterable, Sequence

from clova_train.text.readers import (
    clean,
)
from clova_train.core.errors import ClovaError
from clova_train.tokenizer.morph import EOJEOL, MAX_CACHED_CHARS, MorphSegmenter, analyzer_info

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "clova_tokenizer.json"
# Shipped with every export as the tokenizer class `AutoTokenizer` loads (trust_remote_code).
REMOTE_CODE = Path(__file__).with_name("tokenization_clova.py")
FORMAT_VERSION = 1
BYTE_ALPHABET = 256


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
        # MeCab loads on the first encode, not here: training and export read a tokenizer
        # only for its hash, vocabulary and end-of-document id, and also run where MeCab
        # is not installed (the offline GPU check trains on shards made elsewhere).
        self._segmenter_obj: MorphSegmenter | None = None
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
        try:
            info = analyzer_info()
        except ImportError:
            info = None  # no MeCab: enough to train on shards or export (hash, vocabulary); encoding fails on first use
        if info and meta.get("dictionary_package") != info["dictionary_package"]:
            raise ClovaError(
                f"{path}: trained with {meta.get('dictionary_package')} but {info['dictionary_package']} is "
                "installed; segmentation (and so ids) would differ: install the recorded version"
            )
        return cls(path, meta, tj.read_text(encoding="utf-8"))

    def for_thread(self) -> ClovaTokenizer:
        """The same tokenizer with caches of its own, for another thread: the caches are plain dicts that one
        thread may clear while another reads them (the Rust tokenizers are shared: they are thread-safe)."""
        twin = copy.copy(self)
        twin._segmenter_obj, twin._cache, twin._morph_cache = None, {}, {}
        return twin

    @property
    def vocab_size(self) -> int:
        return self._full.get_vocab_size()

    @property
    def _segmenter(self) -> MorphSegmenter:
        if self._segmenter_obj is None:
            self._segmenter_obj = MorphSegmenter()
        return self._segmenter_obj

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it: the shards' cleaning (control characters out, then normalisation)."""
        return clean(text, self.normalization)

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
        docs = [EOJEOL.findall(clean(t, norm)) for t in texts]
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


def token_repr(b: bytes) -> str:
    """A token's bytes as a reader sees them: text escaped as ``repr`` escapes it (``\\n``), and the bytes
    of a partial character as ``\\xec\\x95``, never the "\ufffd" every such token would share."""
    text = repr(b.decode("utf-8", "surrogateescape"))[1:-1]
    return re.sub(r"\\udc([89a-f][0-9a-f])", r"\\x\1", text)


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


