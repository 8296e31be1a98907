"""A ``--deepspeed`` JSON checked by DeepSpeed's own config code in the launching process, before any rank starts.

DeepSpeed's pydantic sections forbid unknown keys and check types; its
other settings are read with ``dict.get``, which ignores a misspelt key.
The template is parsed by :class:`deepspeed.runtime.config.DeepSpeedConfig`
through mappings that record every key it reads: a key it never read is one
DeepSpeed does not know.
"""

from __future__ import annotations

from collections.abc import KeysView
from pathlib import Path
from typing import Any

from clova_train.core.errors import ClovaError

# clova writes these from its own settings (ds_config.deepspeed_config); the template's values only seed our defaults.
_OURS = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}


# Where DeepSpeed's pydantic models sit in the JSON (the others are read from the top level).
_SECTIONS = {
    "DeepSpeedZeroConfig": ("zero_optimization",),
    "DeepSpeedFP16Config": ("fp16",),
    "DeepSpeedBF16Config": ("bf16",),
    "DeepSpeedFlopsProfilerConfig": ("flops_profiler",),
    "DeepSpeedActivationCheckpointingConfig": ("activation_checkpointing",),
    "DeepSpeedCommsConfig": ("comms_logger",),
    "HybridEngineConfig": ("hybrid_engine",),
}


# Sections DeepSpeed passes whole to the optimizer or scheduler it builds: their keys are the constructor's.
_HANDED_ON = {("optimizer", "params"), ("scheduler", "params")}


class _Recording(dict):
    """A dict that notes which of its keys were read (all of them when iterated: the reader takes any key)."""

    def __init__(self, data: dict, seen: set, where: tuple):
        super().__init__({k: _wrap(v, seen, (*where, k)) for k, v in data.items()})
        self._seen, self._where = seen, where

    def _mark(self, key) -> None:
        self._seen.add((*self._where, key))

    def __getitem__(self, key):
        self._mark(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._mark(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self._mark(key)
        return super().__contains__(key)

    def pop(self, key, *default):
        self._mark(key)
        return super().pop(key, *default)

    def setdefault(self, key, default=None):
        self._mark(key)
        return super().setdefault(key, default)

    def _all(self) -> None:
        for key in dict.keys(self):
            self._mark(key)

    def __iter__(self):
        self._all()
        return super().__iter__()

    def keys(self):
        return KeysView(self)  # `key in d.keys()` reads one key; iterating reads them all

    def items(self):
        self._all()
        return super().items()

    def values(self):
        self._all()
        return super().values()

    def __copy__(self):
        new = _Recording({}, self._seen, self._where)
        dict.update(new, dict.items(self))
        return new


def _wrap(value: Any, seen: set, where: tuple) -> Any:
    return _Recording(value, seen, where) if isinstance(value, dict) else value


def _paths(data: dict, where: tuple = ()) -> list[tuple]:
    out = []
    for k, v in data.items():
        out.append((*where, k))
        if isinstance(v, dict):
            out.extend(_paths(v, (*where, k)))
    return out


def _dotted(loc) -> str:
    return ".".join(str(p) for p in loc)


def validate_deepspeed(template: dict, path: str | Path) -> None:
    """Raise one ClovaError (one line per problem, each naming ``path`` and the key) unless DeepSpeed accepts ``template``."""
    if not template:
        return
    from clova_train.training.parallel.distributed import quiet_deepspeed, select_accelerator

    select_accelerator()
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    quiet_deepspeed()
    seen: set = set()
    recorded = _Recording({**template, **_OURS}, seen, ())
    try:
        DeepSpeedConfig(recorded)
    except pydantic.ValidationError as e:
        section = _SECTIONS.get(getattr(e, "title", ""), ())
        lines = []
        for err in e.errors():
            loc = _dotted((*section, *err.get("loc", ())))
            what = "unknown key" if err.get("type") == "extra_forbidden" else f"{err.get('msg')} (got {err.get('input')!r})"
            lines.append(f"{path}: {loc}: {what}")
        raise ClovaError("\n".join(lines)) from None
    except Exception as e:  # DeepSpeed's own asserts and ValueErrors: one line, the file named
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ClovaError(f"{path}: DeepSpeed refuses this config: {msg}") from None
    # A section DeepSpeed parsed key by key (it read at least one of them) has no room for the others;
    # one handed on whole (optimizer params) is not judged here.
    parsed = {p[:-1] for p in seen} - _HANDED_ON
    unread = [p for p in _paths(template) if p not in seen and p[:-1] in parsed]
    if unread:
        raise ClovaError("\n".join(f"{path}: {_dotted(p)}: unknown key (DeepSpeed never reads it; a typo?)" for p in unread))
