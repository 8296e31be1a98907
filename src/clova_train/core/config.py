"""Strict loading of the typed dataclass configs.

Each component owns a small dataclass with its defaults and checks itself in
``__post_init__``. Files load strictly: an unknown key is an error naming the
key, the file and the keys that are accepted. CLI flags override last.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from clova_train.core.errors import ClovaError
from clova_train.core.textfiles import read_text

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from ``data``, refusing keys the dataclass does not define."""
    if not isinstance(data, dict):
        raise ClovaError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ClovaError(
            f"{where}: unknown key(s) {', '.join(unknown)}; accepted keys are {', '.join(sorted(known))}"
        )
    try:
        return cls(**data)
    except TypeError as e:
        raise ClovaError(f"{where}: {e}") from None


def read_json_object(path: str | Path, missing: str = "config file not found") -> dict[str, Any]:
    """A JSON file that must hold an object; every failure is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ClovaError(f"{path}: {missing}")
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ClovaError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if not isinstance(data, dict):
        raise ClovaError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_json(cls: type[T], path: str | Path) -> T:
    """Load a dataclass config from a JSON file, strictly."""
    return from_dict(cls, read_json_object(path), where=str(path))


def override(cfg: T, **flags: Any) -> T:
    """Return ``cfg`` with the flags that were actually given (not None) applied."""
    given = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(cfg, **given) if given else cfg  # type: ignore[type-var]
