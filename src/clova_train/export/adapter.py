"""The one adapter between our parameter names and Hugging Face's GPT-2: the key map and the config, both ways."""

from __future__ import annotations

import re

import torch

from clova_train.core.dtypes import LONG_NAMES
from clova_train.core.errors import ClovaError
from clova_train.model.config import ModelConfig
from clova_train.tokenizer.bpe import ClovaTokenizer


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


_FROM_HF = {hf: (ours, t) for ours, (hf, t) in HF_KEY_MAP.items()}
_LAYER = re.compile(r"^(blocks|transformer\.h)\.(\d+)\.")


def _lookup(name: str, table: dict[str, tuple[str, bool]]) -> tuple[str, bool]:
    m = _LAYER.match(name)
    key = name[: m.start(2)] + "{i}" + name[m.end(2) :] if m else name
    if key not in table:
        raise KeyError(name)
    target, transpose = table[key]
    return (target.format(i=m.group(2)) if m else target), transpose


def to_hf(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Our (name, tensor) as Hugging Face GPT-2's."""
    hf, transpose = _lookup(name, HF_KEY_MAP)
    return hf, tensor.t() if transpose else tensor


def from_hf(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Hugging Face GPT-2's (name, tensor) as ours."""
    ours, transpose = _lookup(name, _FROM_HF)
    return ours, tensor.t() if transpose else tensor


def hf_shape(name: str, shape: torch.Size) -> tuple[str, tuple[int, ...]]:
    hf, transpose = _lookup(name, HF_KEY_MAP)
    return hf, tuple(reversed(shape)) if transpose else tuple(shape)


def _pad_token(tok: ClovaTokenizer) -> str:
    return next((t for t in tok.special_tokens if "pad" in t.lower()), tok.meta["eod_token"])


def hf_config(cfg: ModelConfig, tok: ClovaTokenizer, dtype: str):
    """The GPT2Config that makes GPT2LMHeadModel compute exactly what our GPT does."""
    from transformers import GPT2Config

    pad_id = tok.token_to_id(_pad_token(tok))
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
        bos_token_id=tok.eod_id,
        eos_token_id=tok.eod_id,
        pad_token_id=pad_id,
        architectures=["GPT2LMHeadModel"],
        dtype=LONG_NAMES[dtype],
    )


def model_config_from_hf(config: dict) -> ModelConfig:
    """Our ModelConfig for a GPT-2 config.json, refusing GPT-2 variants our GPT does not compute."""
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
