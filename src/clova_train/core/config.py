"""Strict loading of the typed dataclass configs.

Each component owns a small dataclass with its defaults and checks itself in
``__post_init__``. Files load strictly: an unknown key is an error naming the
key, the file and the keys that are accepted, and every value is checked
against its field's type annotation by pydantic (numbers, booleans and strings
strictly: 2.7 is not an integer, "3" not a number). CLI flags override last.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from clova_train.core.errors import ClovaError
from clova_train.core.textfiles import read_text

T = TypeVar("T")


_SCALARS = (int, float, bool, str)
# pydantic's error types, as a person would say them.
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
             "list_type": "a list", "tuple_type": "a list", "dict_type": "an object"}


@functools.cache
def _field_checks(cls: type) -> dict[str, tuple[Any, bool]]:
    """Each field's pydantic TypeAdapter, and whether it is checked strictly (plain scalars, optional or not)."""
    from pydantic import TypeAdapter

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        strict = all(a in _SCALARS or a is type(None) for a in args)
        out[f.name] = (TypeAdapter(hint), strict)
    return out


def check_types(cls: type, data: dict[str, Any], where: str = "config", section: str | None = None) -> None:
    """Refuse a value whose type its field does not take, in one line: ``WHERE: SECTION.KEY: expected an integer, got 2.7``."""
    from pydantic import ValidationError

    checks = _field_checks(cls)
    for key, value in data.items():
        adapter, strict = checks[key]
        try:
            adapter.validate_python(value, strict=strict)
        except ValidationError as e:
            err = e.errors()[0]
            inner = "".join(f"[{x}]" if isinstance(x, int) else "" for x in err["loc"])
            said = f"expected {_EXPECTED[err['type']]}" if err["type"] in _EXPECTED else err["msg"][0].lower() + err["msg"][1:]
            name = f"{section}.{key}" if section else key
            raise ClovaError(f"{where}: {name}{inner}: {said}, got {json.dumps(err['input'], default=str)}") from None


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", section: str | None = None) -> T:
    """Build ``cls`` from ``data``, refusing keys the dataclass does not define and values of the wrong type.

    Values are passed on as given (a JSON 1 for a float field stays 1), so
    the resolved configuration, and the hash that identifies a run, do not change.
    """
    if not isinstance(data, dict):
        raise ClovaError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ClovaError(
            f"{where}{': ' + section if section else ''}: unknown key(s) {', '.join(unknown)}; accepted keys are {', '.join(sorted(known))}"
        )
    try:
        obj = cls(**data)
    except ClovaError:
        raise  # the config's own check, in its own words
    except (TypeError, ValueError) as e:
        check_types(cls, data, where, section)  # a value of the wrong type broke the config's checks: name it
        raise ClovaError(f"{where}: {e}") from None
    check_types(cls, data, where, section)
    return obj


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
