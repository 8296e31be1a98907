"""The model's shape (``ModelConfig``) and the one table of sizes: HyperCLOVA's (paper Table 1) plus tiny test sizes.

Learning rates follow GPT-3's table by size (6e-4 at 125M down to 0.6e-4 at
175B); 39B sits between GPT-3's 13B and 175B rows. Adding a size is one row.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, fields, replace

from clova_train.core.errors import ClovaError


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a GPT model. Presets live in PRESETS; ``from_name`` applies overrides."""

    name: str = "custom"
    """Preset name, for the record."""
    n_layer: int = 12
    """Decoder blocks."""
    n_embd: int = 768
    """Hidden size (d_model)."""
    n_head: int = 16
    """Attention heads; must divide n_embd."""
    vocab_size: int = 51200
    """Embedding rows; the tokenizer's size padded to a multiple of 128."""
    block_size: int = 2048
    """Maximum sequence length (learned position embeddings)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual outputs (GPT-3 pre-training: 0)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (GPT-2's)."""
    init_std: float = 0.02
    """Std of the normal initialisation; residual projections get init_std / sqrt(2 n_layer)."""
    lr: float = 6e-4
    """GPT-3's peak learning rate for this size (the train config may override)."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ClovaError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        for f in ("n_layer", "n_embd", "n_head", "vocab_size", "block_size"):
            if getattr(self, f) < 1:
                raise ClovaError(f"model {f} must be >= 1, not {getattr(self, f)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ClovaError(f"dropout must be in [0, 1), not {self.dropout}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        name = preset_name(name)
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ClovaError(f"unknown model field(s) {', '.join(bad)}; accepted: {', '.join(sorted(known))}")
        return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def pad_vocab(n: int, multiple: int = 128) -> int:
    """Round a tokenizer's vocabulary up so embedding matmuls hit fast kernel shapes."""
    return ((n + multiple - 1) // multiple) * multiple

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        # Tiny sizes: seconds on a CPU, for tests and the demo.
        ModelConfig(name="tiny", n_layer=2, n_embd=64, n_head=4, block_size=256, lr=1e-3),
        ModelConfig(name="small", n_layer=4, n_embd=128, n_head=4, block_size=512, lr=1e-3),
        # The paper's sizes: layers / d_model / heads.
        ModelConfig(name="137m", n_layer=12, n_embd=768, n_head=16, lr=6.0e-4),
        ModelConfig(name="350m", n_layer=24, n_embd=1024, n_head=16, lr=3.0e-4),
        ModelConfig(name="760m", n_layer=24, n_embd=1536, n_head=16, lr=2.5e-4),
        ModelConfig(name="1.3b", n_layer=24, n_embd=2048, n_head=16, lr=2.0e-4),
        ModelConfig(name="6.9b", n_layer=32, n_embd=4096, n_head=32, lr=1.2e-4),
        ModelConfig(name="13b", n_layer=40, n_embd=5120, n_head=40, lr=1.0e-4),
        ModelConfig(name="39b", n_layer=48, n_embd=8192, n_head=64, lr=0.8e-4),
        ModelConfig(name="82b", n_layer=64, n_embd=10240, n_head=80, lr=0.6e-4),
    ]
}


def preset_name(name: str) -> str:
    """The preset ``name`` means (``1.3B`` is ``1.3b``), or an error that names the nearest one."""
    key = name.strip().lower()
    if key in PRESETS:
        return key
    hint = _nearest_preset(key)
    hint = f"did you mean {hint}? " if hint else ""
    raise ClovaError(f"unknown model preset {name!r}; {hint}choose one of {', '.join(PRESETS)}")


def _nearest_preset(key: str) -> str | None:
    """A size like ``7b`` maps to the preset nearest in parameters (6.9b); other typos by spelling."""
    size = re.fullmatch(r"(\d+(?:\.\d+)?)([mb])", key)
    if size:
        want = float(size[1]) * (1e9 if size[2] == "b" else 1e6)
        sized = {n: float(n[:-1]) * (1e9 if n[-1] == "b" else 1e6) for n in PRESETS if n[-1] in "mb"}
        best = min(sized, key=lambda n: abs(math.log(sized[n] / want)))
        return best if abs(math.log(sized[best] / want)) < math.log(2) else None
    close = difflib.get_close_matches(key, list(PRESETS), n=1, cutoff=0.6)
    return close[0] if close else None
