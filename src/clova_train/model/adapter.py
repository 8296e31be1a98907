"""The one adapter between our models and Hugging Face's: key maps and configs, both ways, per architecture.

gpt3 <-> ``GPT2LMHeadModel``; llama <-> ``LlamaForCausalLM`` (``Qwen3ForCausalLM``
when QK-norm is on: Llama's layout plus per-head q/k RMSNorm, which Llama lacks).
"""

from __future__ import annotations

import re

import torch

from clova_train.core.dtypes import LONG_NAMES
from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig
from clova_train.tokenizer.bpe import ClovaTokenizer

EXPORT_META = "clova_export.json"
"""What `clova export` records beside the weights (the run, the model config, the tokenizer's hash): export writes it, --init-from reads it."""


# Our name -> (Hugging Face GPT2LMHeadModel name, transposed?). GPT-2 keeps its
# attention and MLP projections as Conv1D, whose weight is (in, out): the
# transpose of nn.Linear's (out, in). The output head is tied to wte and is
# not stored (GPT2LMHeadModel ties lm_head.weight to transformer.wte.weight).
HF_KEY_MAP: dict[str, tuple[str, bool]] = {
    "wte.weight": ("transformer.wte.weight", False),
    "wpe.weight": ("transformer.wpe.weight", False),
    "blocks.{i}.ln_1.weight": ("transformer.h.{i}.ln_1.weight", False),
    "blocks.{i}.ln_1.bias": ("transformer.h.{i}.ln_1.bias", False),
    "blocks.{i}.attn.qkv.weight": ("transformer.h.{i}.attn.c_attn.weight", True),
    "blocks.{i}.attn.qkv.bias": ("transformer.h.{i}.attn.c_attn.bias", False),
    "blocks.{i}.attn.proj.weight": ("transformer.h.{i}.attn.c_proj.weight", True),
    "blocks.{i}.attn.proj.bias": ("transformer.h.{i}.attn.c_proj.bias", False),
    "blocks.{i}.ln_2.weight": ("transformer.h.{i}.ln_2.weight", False),
    "blocks.{i}.ln_2.bias": ("transformer.h.{i}.ln_2.bias", False),
    "blocks.{i}.mlp.fc.weight": ("transformer.h.{i}.mlp.c_fc.weight", True),
    "blocks.{i}.mlp.fc.bias": ("transformer.h.{i}.mlp.c_fc.bias", False),
    "blocks.{i}.mlp.proj.weight": ("transformer.h.{i}.mlp.c_proj.weight", True),
    "blocks.{i}.mlp.proj.bias": ("transformer.h.{i}.mlp.c_proj.bias", False),
    "ln_f.weight": ("transformer.ln_f.weight", False),
    "ln_f.bias": ("transformer.ln_f.bias", False),
}


# Our llama names -> Hugging Face Llama's. Both use nn.Linear layout and rotate-half RoPE, so no
# tensor is transposed or permuted (Meta's original checkpoints interleave q/k; HF's do not, nor do we).
LLAMA_KEY_MAP: dict[str, tuple[str, bool]] = {
    "wte.weight": ("model.embed_tokens.weight", False),
    "blocks.{i}.ln_1.weight": ("model.layers.{i}.input_layernorm.weight", False),
    "blocks.{i}.attn.q.weight": ("model.layers.{i}.self_attn.q_proj.weight", False),
    "blocks.{i}.attn.k.weight": ("model.layers.{i}.self_attn.k_proj.weight", False),
    "blocks.{i}.attn.v.weight": ("model.layers.{i}.self_attn.v_proj.weight", False),
    "blocks.{i}.attn.proj.weight": ("model.layers.{i}.self_attn.o_proj.weight", False),
    "blocks.{i}.attn.q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight", False),
    "blocks.{i}.attn.k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight", False),
    "blocks.{i}.ln_2.weight": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "blocks.{i}.mlp.gate.weight": ("model.layers.{i}.mlp.gate_proj.weight", False),
    "blocks.{i}.mlp.up.weight": ("model.layers.{i}.mlp.up_proj.weight", False),
    "blocks.{i}.mlp.proj.weight": ("model.layers.{i}.mlp.down_proj.weight", False),
    "ln_f.weight": ("model.norm.weight", False),
    "lm_head.weight": ("lm_head.weight", False),
}
KEY_MAPS = {"gpt3": HF_KEY_MAP, "llama": LLAMA_KEY_MAP}
_FROM_HF = {arch: {hf: (ours, t) for ours, (hf, t) in table.items()} for arch, table in KEY_MAPS.items()}
_LAYER = re.compile(r"^(blocks|transformer\.h|model\.layers)\.(\d+)\.")


def _lookup(name: str, table: dict[str, tuple[str, bool]]) -> tuple[str, bool]:
    m = _LAYER.match(name)
    key = name[: m.start(2)] + "{i}" + name[m.end(2) :] if m else name
    if key not in table:
        raise KeyError(name)
    target, transpose = table[key]
    return (target.format(i=m.group(2)) if m else target), transpose


def to_hf(name: str, tensor: torch.Tensor, arch: str = "gpt3") -> tuple[str, torch.Tensor]:
    """Our (name, tensor) as Hugging Face's (GPT-2's for gpt3, Llama's for llama)."""
    hf, transpose = _lookup(name, KEY_MAPS[arch])
    return hf, tensor.t() if transpose else tensor


def from_hf(name: str, tensor: torch.Tensor, arch: str = "gpt3") -> tuple[str, torch.Tensor]:
    """Hugging Face's (name, tensor) as ours; KeyError for a name our ``arch`` has no place for."""
    ours, transpose = _lookup(name, _FROM_HF[arch])
    return ours, tensor.t() if transpose else tensor


def hf_name(name: str, arch: str = "gpt3") -> str:
    """Hugging Face's name of our parameter ``name``."""
    return _lookup(name, KEY_MAPS[arch])[0]


def hf_shape(name: str, shape: torch.Size, arch: str = "gpt3") -> tuple[str, tuple[int, ...]]:
    hf, transpose = _lookup(name, KEY_MAPS[arch])
    return hf, tuple(reversed(shape)) if transpose else tuple(shape)


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class an export of ``cfg`` loads as."""
    if cfg.arch == "gpt3":
        return "GPT2LMHeadModel"
    return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


def _pad_token(tok: ClovaTokenizer) -> str:
    return next((t for t in tok.special_tokens if "pad" in t.lower()), tok.meta["eod_token"])


def hf_config(cfg: ModelConfig, tok: ClovaTokenizer, dtype: str):
    """The config that makes the transformers class of :func:`hf_architecture` compute exactly what our model does."""
    return hf_config_for(cfg, eod_id=tok.eod_id, pad_id=tok.token_to_id(_pad_token(tok)), dtype=dtype)


def hf_config_for(cfg: ModelConfig, *, eod_id: int, pad_id: int, dtype: str):
    """:func:`hf_config` given the special token ids (benchmarks build transformers' twin of a model from it)."""
    if cfg.arch == "llama":
        return _llama_config(cfg, eod_id, pad_id, dtype)
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        activation_function="gelu",  # exact erf GELU, as F.gelu; "gelu_new" would be the tanh one
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_range=cfg.init_std,
        scale_attn_weights=True,
        tie_word_embeddings=True,
        bos_token_id=eod_id,
        eos_token_id=eod_id,
        pad_token_id=pad_id,
        architectures=["GPT2LMHeadModel"],
        dtype=LONG_NAMES[dtype],
    )


def _llama_config(cfg: ModelConfig, eod_id: int, pad_id: int, dtype: str):
    from transformers import LlamaConfig, Qwen3Config

    fields = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.layer_norm_eps,
        rope_parameters=_rope_parameters(cfg),
        attention_bias=False,
        attention_dropout=cfg.dropout,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eod_id,
        eos_token_id=eod_id,
        pad_token_id=pad_id,
        architectures=[hf_architecture(cfg)],
        dtype=LONG_NAMES[dtype],
    )
    if cfg.qk_norm:
        return Qwen3Config(**fields, use_sliding_window=False)
    return LlamaConfig(**fields, mlp_bias=False)


def model_config_from_hf(config: dict) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json (GPT-2, Llama, or Qwen3's QK-norm Llama), refusing variants our blocks do not compute."""
    kind = config.get("model_type")
    if kind not in ("gpt2", "llama", "qwen3"):
        raise ClovaError(f"config.json: model_type {kind!r} is not one clova-train runs; it reads gpt2, llama and qwen3 (QK-norm llama)")
    try:
        return _llama_from_hf(config) if kind != "gpt2" else _gpt2_from_hf(config)
    except KeyError as e:
        raise ClovaError(f"config.json: a {kind} config without {e.args[0]!r}; it is incomplete") from None
    except TypeError as e:
        raise ClovaError(f"config.json: a field has the wrong type ({e}); it is not a config transformers wrote") from None


def _gpt2_from_hf(config: dict) -> ModelConfig:
    d = config.get("n_embd")
    checks = {
        "model_type": (config.get("model_type"), "gpt2"),
        "activation_function": (config.get("activation_function"), "gelu"),
        "n_inner": (config.get("n_inner") or 4 * (d or 0), 4 * (d or 0)),
        "tie_word_embeddings": (config.get("tie_word_embeddings", True), True),
        "scale_attn_weights": (config.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (config.get("scale_attn_by_inverse_layer_idx", False), False),
    }
    bad = [f"{k}={got!r} (needs {want!r})" for k, (got, want) in checks.items() if got != want]
    if bad:
        raise ClovaError(f"config.json describes a model our GPT cannot run: {', '.join(bad)}")
    return ModelConfig(
        name="hf",
        n_layer=config["n_layer"],
        n_embd=d,
        n_head=config["n_head"],
        vocab_size=config["vocab_size"],
        block_size=config["n_positions"],
        dropout=config.get("resid_pdrop", 0.0),
        layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
        init_std=config.get("initializer_range", 0.02),
    )


def _rope_parameters(cfg: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor != 1.0:
        rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_context)
    return rope


def _rope_fields(config: dict) -> dict:
    """Our RoPE fields from either spelling (transformers 5's rope_parameters, 4's rope_theta and rope_scaling).

    Plain RoPE and Llama 3.1's scaling (rope_type llama3) are computed; other scalings (yarn, dynamic, longrope) are refused.
    """
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields = {"rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))}
    if kind == "llama3":
        fields.update(rope_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]), rope_original_context=int(rope["original_max_position_embeddings"]))
    elif kind != "default":
        raise ClovaError(f"config.json: rope_type {kind!r} is not one clova-train computes; it runs plain RoPE (default) and Llama 3.1's (llama3)")
    return fields


def _llama_from_hf(config: dict) -> ModelConfig:
    d, heads = config.get("hidden_size"), config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (d // heads if d and heads else None)
    qk_norm = config.get("model_type") == "qwen3"
    checks = {
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "attention_bias": (config.get("attention_bias", False), False),
        "mlp_bias": (config.get("mlp_bias", False), False),
        "head_dim": (head_dim, d // heads if d and heads else None),
        "pretraining_tp": (config.get("pretraining_tp", 1) or 1, 1),
    }
    if qk_norm:
        checks["use_sliding_window"] = (config.get("use_sliding_window", False), False)
    bad = [f"{k}={got!r} (needs {want!r})" for k, (got, want) in checks.items() if got != want]
    if bad:
        raise ClovaError(f"config.json describes a model our llama block cannot run: {', '.join(bad)}")
    return ModelConfig(
        name="hf",
        arch="llama",
        n_layer=config["num_hidden_layers"],
        n_embd=d,
        n_head=heads,
        n_kv_head=config.get("num_key_value_heads") or heads,
        ffn_hidden=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        block_size=config.get("max_position_embeddings", 2048),
        layer_norm_eps=config.get("rms_norm_eps", 1e-6),
        **_rope_fields(config),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qk_norm=qk_norm,
        dropout=config.get("attention_dropout", 0.0) or 0.0,
        init_std=config.get("initializer_range", 0.02),
    )
