"""Playground presets: HyperCLOVA Studio's use cases as JSON files, shipped ones plus a folder of the user's own."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from clova_train.core.config import load_json
from clova_train.core.errors import ClovaError

SHIPPED = Path(__file__).parent / "presets"


@dataclass
class Preset:
    """One prompt to start from, with the sampling settings it works with."""

    name: str
    """Shown in the playground's list."""
    prompt: str
    """The prompt text; the playground lets the user edit it before sending."""
    description: str = ""
    """What the preset shows, in a sentence."""
    max_tokens: int = 64
    """Tokens to generate."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy)."""
    top_p: float = 0.9
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Sample among the k likeliest tokens (0: all)."""
    stop: list[str] = field(default_factory=list)
    """Generation ends before any of these."""

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.prompt:
            raise ClovaError("a preset needs a name and a prompt")
        if self.max_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ClovaError("a preset needs max_tokens >= 1, temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ClovaError("a preset's stop must be a list of non-empty strings")


def load_presets(extra: str | Path | None = None) -> list[dict]:
    """The shipped presets, then every ``*.json`` of ``extra`` (a file's stem names it; the same stem replaces a shipped one)."""
    files = {p.stem: p for p in sorted(SHIPPED.glob("*.json"))}
    if extra is not None:
        extra = Path(extra)
        if not extra.is_dir():
            raise ClovaError(f"{extra}: no such presets folder")
        files.update({p.stem: p for p in sorted(extra.glob("*.json"))})
    out = []
    for stem, path in files.items():
        try:
            out.append({"id": stem, **asdict(load_json(Preset, path))})
        except ClovaError as e:
            msg = str(e)
            raise ClovaError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    return out
