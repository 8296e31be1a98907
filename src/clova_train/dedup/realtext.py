"""Real human-written text from installed packages, for measuring `clova dedup` in tests and the benchmark.

- Korean: konlpy's constitution and bills (PyPI), and LibreOffice's Korean
  help pages (Debian's ``libreoffice-help-ko``): technical Korean full of
  English UI terms, product names and numbers, as much of a web corpus is.
- Japanese and English: the same help pages in ``ja`` and ``en-US``, and the
  Python documentation's help topics that CPython ships (``pydoc_data``).

No PyPI package ships a Korean prose corpus beyond konlpy's (Korpora and the
like download theirs), so the help pages come from Debian; CI installs them.
"""

from __future__ import annotations

import html.parser
import random
import re
from pathlib import Path

from clova_train.core.errors import ClovaError

HELP_ROOT = Path("/usr/share/libreoffice/help")
HELP_PACKAGES = {"ko": "libreoffice-help-ko", "ja": "libreoffice-help-ja", "en-US": "libreoffice-help-en-us"}
_BLOCKS = {"h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "td", "th", "pre", "div", "br", "tr"}


class _HelpText(html.parser.HTMLParser):
    """The text of a help page's display area, one line per block element."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0  # > 0 inside <div id="DisplayArea">
        self.lines: list[str] = []
        self.buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            if tag == "div":
                self.depth += 1
            if tag in _BLOCKS:
                self._flush()
        elif tag == "div" and ("id", "DisplayArea") in attrs:
            self.depth = 1

    def handle_endtag(self, tag):
        if not self.depth:
            return
        if tag in _BLOCKS:
            self._flush()
        if tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.buf.append(data)

    def close(self):
        super().close()
        self._flush()

    def _flush(self):
        line = " ".join("".join(self.buf).split())
        if line:
            self.lines.append(line)
        self.buf = []


def help_page_text(path: Path) -> str:
    parser = _HelpText()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return "\n".join(parser.lines)


def help_pages(lang: str, *, min_chars: int = 200, every: int = 1, root: Path = HELP_ROOT) -> list[str]:
    """The text of every ``every``-th LibreOffice help page in ``lang`` (by path) with at least ``min_chars`` characters."""
    d = root / lang / "text"
    if not d.is_dir():
        raise ClovaError(f"{d}: missing; apt-get install --no-install-recommends {HELP_PACKAGES.get(lang, 'libreoffice-help-' + lang.lower())}")
    texts = (help_page_text(p) for p in sorted(d.rglob("*.html"))[::every])
    return [t for t in texts if len(t) >= min_chars]


_HANGUL = re.compile(r"[\uac00-\ud7a3]")


def korean_pages(pages: list[str]) -> tuple[list[str], list[str]]:
    """(translated pages: at least half of their lines hold Hangul, untranslated pages: no Hangul at all).

    A language-free label for the Korean help: the rest, partly translated, is left out of both."""
    def share(t: str) -> float:
        lines = [line for line in t.split("\n") if line.strip()]
        return sum(bool(_HANGUL.search(line)) for line in lines) / max(1, len(lines))

    return [t for t in pages if share(t) >= 0.5], [t for t in pages if not _HANGUL.search(t)]


def python_help_topics(*, min_chars: int = 200) -> list[str]:
    """English prose: the Python documentation's help topics, shipped with CPython as pydoc_data."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if len(topics[k].strip()) >= min_chars]


def code_mixed(korean: list[str], english: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` of the Korean texts, one sentence per line, with two English words (drawn from ``english``) dropped
    into a fifth of the sentences and a line of Python among them: Korean as IT pages write it."""
    rng = random.Random(seed)
    words = sorted({w for t in english for w in re.findall(r"[A-Za-z][A-Za-z_]{3,}", t)})
    out = []
    for text in rng.sample(korean, min(n, len(korean))):
        lines = []
        for s in re.split(r"(?<=다\.)\s+", text):
            if rng.random() < 0.2:
                w = s.split()
                w.insert(rng.randrange(len(w) + 1), " ".join(rng.sample(words, 2)))
                s = " ".join(w)
            lines.append(s)
        lines.insert(rng.randrange(len(lines) + 1), "for item in sorted(items, key=len): print(item)")
        out.append("\n".join(lines))
    return out
