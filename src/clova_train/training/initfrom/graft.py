"""Embedding rows for a tokenizer the base model was not trained with (Bllossom, arXiv 2403.10882; EEVE, arXiv 2402.14714).

Each of our tokens is matched to the base vocabulary by the *bytes* it stands
for, not by its symbol: byte-level BPE files spell bytes through a
byte-to-character table (GPT-2's, ours) and SentencePiece files through ``▁``
and ``<0xNN>`` pieces, so the same token has different symbols on the two
sides. For each row of ours:

- copied: the base vocabulary has a token of the same bytes (our end-of-document
  token also takes the base's ``eos_token_id`` row when the base has no token of its text);
- averaged: otherwise the mean of the base rows of the base tokenizer's pieces of
  the token's text; when the base tokenizer cannot spell exactly those bytes
  (a token that is part of a UTF-8 character, a normaliser that changes the
  text), the pieces are the longest base tokens that spell them left to right;
- mean: neither works (a special token the base lacks, a byte it cannot spell):
  the mean of the base embedding, as are the padding rows past the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clova_train.core.errors import ClovaError
from clova_train.model.adapter import EXPORT_META
from clova_train.tokenizer.bpe import _BYTE_DECODER, ClovaTokenizer

BASE_TOKENIZER = "tokenizer.json"


@dataclass
class GraftPlan:
    """Where each of our embedding rows comes from, in base-vocabulary ids."""

    copied: dict[int, int] = field(default_factory=dict)
    """Our id -> the base id of the same bytes."""
    averaged: dict[int, list[int]] = field(default_factory=dict)
    """Our id -> the base ids whose rows are averaged."""
    mean: list[int] = field(default_factory=list)
    """Our ids that take the mean base embedding."""
    tokens: int = 0
    """Our tokenizer's size; rows from here on are padding (mean embedding)."""

    def counts(self, rows: int) -> dict[str, int]:
        return {"copied": len(self.copied), "averaged": len(self.averaged), "mean": len(self.mean), "padding": rows - self.tokens}

    def new_rows(self, rows: int) -> list[int]:
        """Our rows not copied from the base: what --freeze-except-embeddings trains first."""
        return sorted([*self.averaged, *self.mean, *range(self.tokens, rows)])


def describe_counts(counts: dict[str, int]) -> str:
    return (f"{counts['copied']:,} rows copied from the base vocabulary, {counts['averaged']:,} averaged from the base "
            f"tokenizer's pieces, {counts['mean']:,} set to the mean embedding (+ {counts['padding']:,} padding rows)")


def _byte_level(spec: dict) -> bool:
    """Whether a tokenizer.json spells bytes through GPT-2's byte-to-character table (a ByteLevel pre-tokenizer or decoder)."""
    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        return node.get("type") == "ByteLevel" or any(has(n) for key in ("pretokenizers", "decoders") for n in node.get(key) or [])

    return has(spec.get("pre_tokenizer")) or has(spec.get("decoder"))


def _symbol_bytes(symbol: str, byte_level: bool) -> bytes | None:
    """The bytes a vocabulary symbol stands for; None when it stands for none (an unknown character of the table)."""
    if byte_level:
        try:
            return bytes(_BYTE_DECODER[c] for c in symbol)
        except KeyError:
            return None
    if len(symbol) == 6 and symbol.startswith("<0x") and symbol.endswith(">"):
        try:
            return bytes([int(symbol[3:5], 16)])
        except ValueError:
            pass
    return symbol.replace("\u2581", " ").encode("utf-8")  # SentencePiece's word-boundary mark is a space


class BaseVocabulary:
    """The base model's tokenizer (its tokenizer.json, through `tokenizers` alone: no remote code), seen as bytes."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        file = path / BASE_TOKENIZER
        if not file.is_file():
            raise ClovaError(f"{path}: no {BASE_TOKENIZER}; with a tokenizer other than the base model's, --init-from needs "
                             "the base tokenizer to match embedding rows (or train with the base's own tokenizer)")
        try:
            text = file.read_text(encoding="utf-8")
            spec = json.loads(text)
            self.tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ClovaError(f"{file}: not a tokenizers file ({type(e).__name__}: {str(e)[:200]})") from None
        byte_level = _byte_level(spec)
        special = {t["content"] for t in spec.get("added_tokens") or [] if isinstance(t, dict) and t.get("special")}
        self.size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.by_bytes: dict[bytes, int] = {}
        self.special: dict[str, int] = {}
        self.pieces: dict[bytes, int] = {}  # ordinary tokens only: what the longest-match spelling may use
        for symbol, i in sorted(self.vocab.items(), key=lambda kv: kv[1]):
            if symbol in special:
                self.special[symbol] = i
                continue
            b = _symbol_bytes(symbol, byte_level)
            if b:
                self.by_bytes.setdefault(b, i)
                self.pieces.setdefault(b, i)
        self.longest = max(map(len, self.pieces), default=0)
        self._bytes_of = {i: b for b, i in self.pieces.items()}

    def spell(self, data: bytes) -> list[int] | None:
        """Base ids whose bytes concatenate to ``data``, longest first from the left; None if some byte has no token."""
        out, pos = [], 0
        while pos < len(data):
            for n in range(min(self.longest, len(data) - pos), 0, -1):
                i = self.pieces.get(data[pos : pos + n])
                if i is not None:
                    out.append(i)
                    pos += n
                    break
            else:
                return None
        return out

    def encode_exactly(self, texts: list[str]) -> list[list[int] | None]:
        """The base tokenizer's pieces of each text, or None where they do not spell exactly its bytes."""
        out = []
        for text, enc in zip(texts, self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            spelled = b"".join(self._bytes_of.get(i, b"\0\0invalid") for i in enc.ids)
            out.append(list(enc.ids) if enc.ids and spelled == text.encode("utf-8") else None)
        return out


def same_tokenizer(source: Path, tok: ClovaTokenizer) -> bool:
    """The run's tokenizer is the source model's own: a clova export naming its hash, or a tokenizer.json with the same vocabulary."""
    meta = source / EXPORT_META
    if meta.is_file():
        try:
            if json.loads(meta.read_text(encoding="utf-8")).get("tokenizer_hash") == tok.hash:
                return True
        except (OSError, ValueError, AttributeError):
            pass  # an unreadable record proves nothing; compare vocabularies
    file = source / BASE_TOKENIZER
    if not file.is_file():
        return False
    return BaseVocabulary(source).vocab == tok._full.get_vocab(with_added_tokens=True)


def plan_graft(tok: ClovaTokenizer, base: BaseVocabulary, base_eos: int | None = None) -> GraftPlan:
    """Where each of ``tok``'s rows comes from in the base (see the module's docstring)."""
    plan = GraftPlan(tokens=tok.vocab_size)
    specials = set(tok.special_tokens)
    todo: dict[int, bytes] = {}
    for i in range(tok.vocab_size):
        symbol = tok.id_to_token(i)
        if symbol in specials:
            if symbol in base.vocab:
                plan.copied[i] = base.vocab[symbol]
            elif i == tok.eod_id and base_eos is not None and 0 <= base_eos < base.size:
                plan.copied[i] = base_eos
            else:
                plan.mean.append(i)
            continue
        data = tok.token_bytes(i)
        if data in base.by_bytes:
            plan.copied[i] = base.by_bytes[data]
        else:
            todo[i] = data
    texts = {i: d.decode("utf-8") for i, d in todo.items() if _is_utf8(d)}
    encoded = dict(zip(texts, base.encode_exactly(list(texts.values()))))
    for i, data in todo.items():
        pieces = encoded.get(i) or base.spell(data)
        if pieces:
            plan.averaged[i] = pieces
        else:
            plan.mean.append(i)
    plan.mean.sort()
    return plan


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def graft_rows(plan: GraftPlan, base_rows: torch.Tensor, rows: int, base_tokens: int) -> torch.Tensor:
    """Our (rows, C) matrix from the base's (base rows, C): copied, averaged, or the mean of the base's first ``base_tokens`` rows."""
    known = min(base_tokens, base_rows.shape[0])
    src = base_rows.float()
    mean = src[:known].mean(dim=0)
    out = mean.expand(rows, -1).clone()
    used = [*plan.copied.values(), *(i for pieces in plan.averaged.values() for i in pieces)]
    if used and max(used) >= base_rows.shape[0]:
        raise ClovaError(f"the base tokenizer's token {max(used)} has no row in the base model's {base_rows.shape[0]}-row embedding")
    if plan.copied:
        out[torch.tensor(list(plan.copied))] = src[torch.tensor(list(plan.copied.values()))]
    for ours, pieces in plan.averaged.items():
        out[ours] = src[pieces].mean(dim=0)
    return out.to(base_rows.dtype)
