"""Small text files users hand us (prompt lists, eval data, word lists) and our own jsonl logs, read one way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from clova_train.core.errors import ClovaError


def iter_jsonl(path: str | Path, hint: str = "each line must be one JSON object", *, skip_bad: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error ending in ``hint``.

    ``skip_bad`` passes over such lines instead: for our own logs, whose last line a kill may have cut.
    """
    path = Path(path)
    if not path.is_file():
        raise ClovaError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
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
            yield n, obj


def read_lines(path: str | Path) -> list[str]:
    """Non-blank lines of a text file, stripped (the banned-words list)."""
    path = Path(path)
    if not path.is_file():
        raise ClovaError(f"{path}: file not found")
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
