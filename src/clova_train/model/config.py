"""The model's shape (``ModelConfig``) and the one table of sizes: HyperCLOVA's (paper Table 1) plus tiny test sizes.

Learning rates follow GPT-3's table by size (6e-4 at 125M down to 0.6e-4 at
175B); 39B sits between GPT-3's 13B and 175B rows. Adding a size is one row.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, fields

from clova_train.core.errors import ClovaError


ARCHS = ("gpt3", "llama")
# Fields that only the llama block reads; a gpt3 config leaves them out of the run's identity,
# so run dirs made before the second architecture existed still resume.
LLAMA_FIELDS = ("n_kv_head", "ffn_hidden", "rope_theta", "tie_embeddings", "qk_norm",
                "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder. Presets live in PRESETS; ``from_name`` applies overrides.

    Zero (or None) in a derived field means "the architecture's default"; it is
    resolved when the config is built, so a saved config holds the real value.
    """

    name: str = "custom"
    """Preset name, for the record."""
    arch: str = "gpt3"
    """Block: gpt3 (learned positions, LayerNorm, GELU, tied head) or llama (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied)."""
    n_layer: int = 12
    """Decoder blocks."""
    n_embd: int = 768
    """Hidden size (d_model)."""
    n_head: int = 16
    """Attention heads; must divide n_embd."""
    vocab_size: int = 51200
    """Embedding rows; the tokenizer's size padded to a multiple of 128."""
    block_size: int = 2048
    """Maximum sequence length (gpt3: the learned position table; llama: the longest context trained, RoPE has no table)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual outputs (GPT-3 pre-training: 0)."""
    layer_norm_eps: float = 1e-5
    """Epsilon of the norms: LayerNorm (gpt3) or RMSNorm (llama)."""
    init_std: float = 0.02
    """Std of the normal initialisation; residual projections get init_std / sqrt(2 n_layer)."""
    lr: float = 6e-4
    """GPT-3's peak learning rate for this size (the train config may override)."""
    n_kv_head: int = 0
    """Key/value heads (grouped-query attention); 0: n_head for gpt3, a quarter of n_head for llama; 1 is multi-query."""
    ffn_hidden: int = 0
    """MLP inner width; 0: 4 x n_embd for gpt3, for llama the multiple of 256 that keeps the block's parameters near gpt3's."""
    rope_theta: float = 500000.0
    """RoPE base (llama): Llama 3's 500000, whose long wavelengths leave room for context extension up to 32k."""
    tie_embeddings: bool | None = None
    """Output head shares the token embedding; None: yes for gpt3, no for llama."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys before RoPE (llama; OLMo 2's guard against logit growth)."""
    rope_factor: float = 1.0
    """Llama 3.1's RoPE frequency scaling (rope_type llama3): long wavelengths divided by this (8 in Llama 3.1); 1: plain RoPE."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths beyond rope_original_context / this are scaled fully."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below rope_original_context / this are left alone; between, interpolated."""
    rope_original_context: int = 8192
    """llama3 scaling: the context the base model was trained at before its frequencies were scaled."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ClovaError(f"unknown model arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.n_embd % self.n_head:
            raise ClovaError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        for f in ("n_layer", "n_embd", "n_head", "vocab_size", "block_size"):
            if getattr(self, f) < 1:
                raise ClovaError(f"model {f} must be >= 1, not {getattr(self, f)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ClovaError(f"dropout must be in [0, 1), not {self.dropout}")
        llama = self.arch == "llama"
        if not llama:
            # GPT-3's block has exactly one shape; say so rather than silently ignore a field.
            wrong = [f for f, ok in (("n_kv_head", self.n_kv_head in (0, self.n_head)), ("tie_embeddings", self.tie_embeddings in (None, True)),
                                     ("qk_norm", not self.qk_norm), ("ffn_hidden", self.ffn_hidden in (0, 4 * self.n_embd))) if not ok]
            if wrong:
                raise ClovaError(f"model field(s) {', '.join(wrong)} need arch llama; the gpt3 block has full attention, "
                                 "a 4 x n_embd GELU MLP and a tied head (set arch: llama, or drop them)")
        kv = self.n_kv_head or (_divisor_at_most(self.n_head, self.n_head // 4) if llama else self.n_head)
        if kv < 1 or self.n_head % kv:
            raise ClovaError(f"n_kv_head {kv} must divide n_head {self.n_head} (each key/value head serves n_head / n_kv_head query heads)")
        object.__setattr__(self, "n_kv_head", kv)
        object.__setattr__(self, "ffn_hidden", self.ffn_hidden or (_swiglu_width(self.n_embd, self.n_head, kv) if llama else 4 * self.n_embd))
        object.__setattr__(self, "tie_embeddings", (not llama) if self.tie_embeddings is None else bool(self.tie_embeddings))
        if self.rope_theta <= 0:
            raise ClovaError(f"rope_theta must be > 0, not {self.rope_theta}")
        if self.rope_factor < 1 or self.rope_high_freq_factor <= self.rope_low_freq_factor or self.rope_original_context < 1:
            raise ClovaError(f"RoPE scaling needs rope_factor >= 1 (not {self.rope_factor}), rope_high_freq_factor > rope_low_freq_factor "
                             f"(not {self.rope_high_freq_factor} <= {self.rope_low_freq_factor}) and rope_original_context >= 1")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A preset's depth and width with ``overrides``; derived fields follow the (possibly new) arch."""
        name = preset_name(name)
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ClovaError(f"unknown model field(s) {', '.join(bad)}; accepted: {', '.join(sorted(known))}")
        preset = PRESETS[name]
        base = {f.name: getattr(preset, f.name) for f in fields(cls) if f.name not in LLAMA_FIELDS}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values): n_kv_head x head_dim."""
        return self.n_kv_head * self.head_dim

    def identity(self) -> dict:
        """The fields that make two runs the same model; a gpt3 config leaves out the llama-only ones (and arch)."""
        d = asdict(self)
        if self.arch == "gpt3":
            for f in ("arch", *LLAMA_FIELDS):
                d.pop(f)
        return d


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n not above limit (at least 1)."""
    return max(d for d in range(1, max(limit, 1) + 1) if n % d == 0)


def _swiglu_width(d: int, n_head: int, n_kv_head: int) -> int:
    """SwiGLU's three matrices get what the gpt3 block spends beyond this attention (12d^2 - attention), as a multiple of 256.

    With a quarter of the heads for keys and values this is ~3.2 d, near Llama 3's 3.5 d.
    """
    attention = 2 * d * d + 2 * d * (d // n_head) * n_kv_head
    return max(256, round((12 * d * d - attention) / (3 * d) / 256) * 256)


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
