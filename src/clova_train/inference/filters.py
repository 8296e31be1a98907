"""HyperCLOVA Studio's input and output filters, from one strict JSON file that reloads when it changes.

The input filter rejects a request whose text holds a banned word or matches
a banned pattern (the client gets a 400 naming the rule); the output filter
is a list of words generation never emits (masked at sampling by
:func:`~clova_train.inference.generate.generate_ids`, not cut afterwards);
the length limits bound prompts and completions. The server checks the
file's modification time on every request and reloads it when it changed; a
file that became invalid keeps the previous filters in force and is counted.

Words and patterns are matched on the text the model reads (the tokenizer's
own cleaning, then NFC), so a control character the tokenizer drops cannot
split a banned word. Patterns are compiled with RE2, whose matching time is
linear in the text: a pattern like ``(a+)+b`` cannot stall the server, and one
RE2 cannot express (a backreference, a lookaround) is refused when the file
loads.
"""

from __future__ import annotations

import os
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import re2

from clova_train.core.config import from_dict, read_json_object
from clova_train.core.errors import ClovaError

# A pattern is a regular expression from a file; RE2 keeps its time linear in
# the text, and bounding its length bounds the automaton RE2 builds.
MAX_PATTERN_CHARS = 500
# A prompt is refused above this many characters unless the filters file says otherwise: every request's
# cleaning, filtering and tokenizing is then bounded before it starts (about 1 s of tokenizing).
DEFAULT_MAX_PROMPT_CHARS = 100_000


@dataclass
class FilterConfig:
    """What the server refuses to read and refuses to write."""

    input_banned_words: list[str] = field(default_factory=list)
    """A prompt or chat message containing one of these (case-insensitive) is rejected with 400."""
    input_banned_patterns: list[str] = field(default_factory=list)
    """RE2 regular expressions (Python's syntax without backreferences or lookarounds); a prompt matching one
    (case-insensitive) is rejected with 400."""
    output_banned_words: list[str] = field(default_factory=list)
    """Words never generated: a token that would complete one is masked and resampled."""
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    """Longest prompt (or chat, all messages together) in characters, checked before any other work (0: no
    limit besides the 8 MiB body)."""
    max_prompt_tokens: int = 0
    """Longest prompt in tokens (0: the model's context)."""
    max_tokens: int = 0
    """Most tokens one completion may ask for (0: the model's context)."""
    description: str = ""
    """A note for people reading the file."""

    def __post_init__(self) -> None:
        for name in ("input_banned_words", "input_banned_patterns", "output_banned_words"):
            values = getattr(self, name)
            if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
                raise ClovaError(f"{name} must be a list of non-empty strings")
        for name in ("max_prompt_chars", "max_prompt_tokens", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ClovaError(f"{name} must be an integer >= 0 (0: no limit), not {value!r}")
        options = re2.Options()
        options.case_sensitive = False
        options.log_errors = False  # the one line below says it; RE2 would also print to stderr
        self._patterns = []
        for p in self.input_banned_patterns:
            if len(p) > MAX_PATTERN_CHARS:
                raise ClovaError(f"input_banned_patterns: a pattern is longer than {MAX_PATTERN_CHARS} characters")
            try:
                self._patterns.append((p, re2.compile(p, options)))
            except re2.error as e:
                detail = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
                raise ClovaError(
                    f"input_banned_patterns: {p!r} is not a pattern RE2 (linear-time matching) accepts: {detail}; "
                    "write it without backreferences or lookarounds"
                ) from None
        self._words = [_fold(w) for w in self.input_banned_words]

    def check_size(self, text: str) -> tuple[str, str] | None:
        """``(reason label, message)`` when ``text`` is longer than the server reads, else None."""
        if self.max_prompt_chars and len(text) > self.max_prompt_chars:
            return "prompt_chars", f"the prompt has {len(text)} characters; this server accepts at most {self.max_prompt_chars}"
        return None

    def check_input(self, text: str, seen: Callable[[str], str] = lambda s: s) -> tuple[str, str] | None:
        """``(reason label, message)`` when ``text`` must be rejected, else None.

        ``seen`` is the tokenizer's cleaning: words and patterns are matched on ``seen(text)`` after NFC.
        """
        hit = self.check_size(text)
        if hit:
            return hit
        read = unicodedata.normalize("NFC", seen(text))
        folded = read.casefold()
        for word, shown in zip(self._words, self.input_banned_words):
            if word in folded:
                return "banned_word", f"the input filter rejected the prompt: it contains the banned word {shown!r}"
        for shown, pattern in self._patterns:
            if pattern.search(read):
                return "banned_pattern", f"the input filter rejected the prompt: it matches the banned pattern {shown!r}"
        return None


def _fold(text: str) -> str:
    return unicodedata.normalize("NFC", text).casefold()


class FilterStore:
    """The filters in force: reloaded from ``path`` whenever its modification time or size changes."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.reload_errors = 0
        self.last_error = ""
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._config = FilterConfig()
        if self.path is not None:
            # At start-up a bad file is fatal (one line); later it only keeps the old filters.
            self._config, self._stamp = self._read()

    def _read(self) -> tuple[FilterConfig, tuple[int, int]]:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            raise ClovaError(f"{self.path}: filter file not found") from None
        data = read_json_object(self.path, missing="filter file not found")
        try:
            cfg = from_dict(FilterConfig, data, where=str(self.path))
        except ClovaError as e:
            msg = str(e)
            raise ClovaError(msg if msg.startswith(str(self.path)) else f"{self.path}: {msg}") from None
        return cfg, (st.st_mtime_ns, st.st_size)

    def current(self) -> FilterConfig:
        if self.path is None:
            return self._config
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            return self._config  # a file being replaced: keep what is in force
        if stamp == self._stamp:
            return self._config
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._config, self._stamp = self._read()
                    self.last_error = ""
                except ClovaError as e:
                    self._stamp = stamp  # count a bad version once, not on every request
                    self.reload_errors += 1
                    self.last_error = str(e)
        return self._config
