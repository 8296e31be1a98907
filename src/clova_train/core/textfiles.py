"""Small text files users hand us (prompt lists, eval data, word lists, templates) and our own jsonl logs, read one way.

Every text input goes through :func:`strip_bom` (a UTF-8 byte-order mark, as
Windows editors write, is dropped) and decodes as UTF-8 or fails with one line
naming the file and line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from clova_train.core.errors import ClovaError


UTF8_BOM = b"\xef\xbb\xbf"
# JSON's \uXXXX escapes are the one way a lone UTF-16 surrogate gets into a str read from a file (UTF-8 decoding
# refuses them); no UTF-8 encoder (MeCab, the tokenizer, our writers) takes one, so such text is bad input.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value) -> str | None:
    """Where the first lone surrogate is in a string or in the strings of a JSON value ("\\ud800 at character 3"), or None."""
    stack = [value]
    while stack:  # not recursive: JSON nests as deep as the line is long
        v = stack.pop()
        if isinstance(v, str):
            if at := _SURROGATE.search(v):
                return f"\\u{ord(at.group()):04x} at character {at.start()}"
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def strip_bom(first: bytes) -> bytes:
    """The first line (or the whole) of a file without a leading UTF-8 byte-order mark."""
    return first[len(UTF8_BOM):] if first.startswith(UTF8_BOM) else first


def _decode(path: Path, n: int, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClovaError(f"{path}:{n}: not UTF-8 text (invalid byte {raw[e.start]:#04x}); pass a UTF-8 text file") from None
    if "\x00" in text:
        raise ClovaError(f"{path}:{n}: NUL byte, so a binary file, not text; pass a UTF-8 text file")
    return text


def text_lines(path: str | Path, *, skip_bad: bool = False) -> Iterator[tuple[int, str]]:
    """(line number, line with its end of line) of a UTF-8 text file; ``skip_bad`` passes over undecodable lines."""
    path = Path(path)
    if not path.is_file():
        raise ClovaError(f"{path}: file not found")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, _decode(path, n, strip_bom(raw) if n == 1 else raw)
            except ClovaError:
                if not skip_bad:
                    raise


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (a JSON config or template)."""
    return "".join(line for _, line in text_lines(path))


def iter_jsonl(path: str | Path, hint: str = "each line must be one JSON object", *, skip_bad: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error ending in ``hint``.

    ``skip_bad`` passes over such lines instead: for our own logs, whose last line a kill may have cut.
    """
    path = Path(path)
    for n, line in text_lines(path, skip_bad=skip_bad):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if skip_bad:
                continue
            raise ClovaError(f"{path}:{n}: not valid JSON ({e.msg}); {hint}") from None
        if not isinstance(obj, dict):
            if skip_bad:
                continue
            raise ClovaError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}; {hint}")
        if "\\u" in line and (where := lone_surrogate(obj)):
            if skip_bad:
                continue
            raise ClovaError(f"{path}:{n}: a lone surrogate ({where}), which is not text; fix that escape")
        yield n, obj


def read_lines(path: str | Path) -> list[str]:
    """Non-blank lines of a text file, stripped (the banned-words list)."""
    return [s.strip() for _, s in text_lines(path) if s.strip()]
