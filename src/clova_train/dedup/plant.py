"""Planted near-duplicates of real text, for measuring `clova dedup` (recall, false removals) in tests and benchmarks.

Base documents are runs of consecutive paragraphs of a corpus, kept only
when no earlier one shares many word 3-grams with them (the konlpy bills
repeat whole passages), so a removed base document is a real mistake.
"""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path
from typing import Callable, Iterable

from clova_train.text.readers import iter_documents

_SENTENCE_END = re.compile(r"(?<=[.!?다])\s+")
SIGNATURE = "\n\n-- 이 글은 네이버 카페 '행복한 우리집'에서 퍼왔습니다. 퍼가실 때는 출처를 꼭 밝혀 주세요 --"


def _grams(text: str) -> set[tuple[str, ...]]:
    w = text.split()
    return {tuple(w[i : i + 3]) for i in range(len(w) - 2)}


def distinct_documents(paths: list[Path], *, min_chars: int = 500, max_overlap: float = 0.3, limit: int | None = None) -> list[str]:
    """Runs of blank-line paragraphs of at least ``min_chars``, none sharing over ``max_overlap`` of 3-grams with another."""

    def runs():
        for path in paths:
            run: list[str] = []
            for doc in iter_documents(path, doc_sep="blank"):
                run.append(doc.text.strip())
                if sum(map(len, run)) >= min_chars:
                    yield "\n\n".join(run)
                    run = []

    return distinct(runs(), max_overlap=max_overlap, limit=limit)


def distinct(texts: Iterable[str], *, max_overlap: float = 0.3, limit: int | None = None) -> list[str]:
    """The texts (in order) that share at most ``max_overlap`` of their word 3-grams with every earlier kept one."""
    docs: list[str] = []
    seen: list[set] = []
    for text in texts:
        g = _grams(text)
        if g and all(len(g & s) / min(len(g), len(s)) <= max_overlap for s in seen):
            docs.append(text)
            seen.append(g)
            if limit is not None and len(docs) >= limit:
                break
    return docs


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def sentence_mixes(docs: list[str], n: int, seed: int = 0, sentences: int = 12) -> list[str]:
    """``n`` more distinct documents, each a random draw of real sentences of ``docs`` (for larger runs)."""
    rng = random.Random(seed)
    pool = sorted({s for d in docs for s in _sentences(d) if len(s) >= 20})
    return [" ".join(rng.sample(pool, sentences)) for _ in range(n)]


def delete_sentence(text: str, rng: random.Random, pool: list[str]) -> str:
    s = _sentences(text)
    if len(s) > 2:
        del s[rng.randrange(len(s))]
    return " ".join(s)


def insert_sentence(text: str, rng: random.Random, pool: list[str]) -> str:
    s = _sentences(text)
    s.insert(rng.randrange(len(s) + 1), rng.choice(_sentences(rng.choice(pool))))
    return " ".join(s)


def change_characters(text: str, rng: random.Random, pool: list[str], share: float = 0.01) -> str:
    chars = list(text)
    letters = [i for i, c in enumerate(chars) if "\uac00" <= c <= "\ud7a3"]
    for i in rng.sample(letters, min(len(letters), max(1, int(len(letters) * share)))):
        chars[i] = chr(rng.randrange(0xAC00, 0xD7A4))
    return "".join(chars)


def reorder_paragraphs(text: str, rng: random.Random, pool: list[str]) -> str:
    paras = text.split("\n\n")
    if len(paras) > 1:
        i = rng.randrange(len(paras) - 1)
        paras[i], paras[i + 1] = paras[i + 1], paras[i]
    return "\n\n".join(paras)


def append_signature(text: str, rng: random.Random, pool: list[str]) -> str:
    return text + SIGNATURE


EDITS: dict[str, Callable[[str, random.Random, list[str]], str]] = {
    "sentence_deleted": delete_sentence,
    "sentence_inserted": insert_sentence,
    "chars_changed_1pct": change_characters,
    "chars_changed_2pct": functools.partial(change_characters, share=0.02),
    "chars_changed_3pct": functools.partial(change_characters, share=0.03),
    "paragraphs_swapped": reorder_paragraphs,
    "signature_appended": append_signature,
}


def plant(docs: list[str], n_planted: int, seed: int = 0) -> list[tuple[str, int | None, str | None]]:
    """``docs`` then ``n_planted`` edited copies: (text, index of the original or None, edit name or None)."""
    rng = random.Random(seed)
    out: list[tuple[str, int | None, str | None]] = [(d, None, None) for d in docs]
    names = sorted(EDITS)
    for k in range(n_planted):
        i = rng.randrange(len(docs))
        name = names[k % len(names)]
        out.append((EDITS[name](docs[i], rng, docs), i, name))
    return out
