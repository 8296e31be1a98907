"""The llama block (HyperCLOVA X's and Llama's): RMSNorm pre-normalisation, rotary positions, grouped-query attention, SwiGLU, no biases.

Computed as Hugging Face's ``LlamaForCausalLM`` computes it (RMSNorm in fp32,
rotate-half RoPE with cos/sin in fp32, ``silu(gate) * up``), so an export's
logits equal ours and the q/k weights need no permutation. Keys and values
have ``n_kv_head`` heads, each serving ``n_head / n_kv_head`` query heads; the
KV cache holds only those. Shapes come from the tensors (heads = width /
head_dim), so a layer holding a slice of the heads runs unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from clova_train.model.cache import LayerKV
from clova_train.model.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype (as Llama does: bf16 squares lose the small entries)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class FinalRMSNorm(RMSNorm):
    """The RMSNorm after the last block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.n_embd, cfg.layer_norm_eps)


class OutputHead(nn.Linear):
    """The untied output head, hidden -> vocabulary logits (no bias)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.n_embd, cfg.vocab_size, bias=False)


def inv_frequencies(cfg: ModelConfig, device) -> torch.Tensor:
    """RoPE's (head_dim / 2) angular frequencies; with rope_factor > 1, Llama 3.1's scaling of the long wavelengths."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    if cfg.rope_factor == 1.0:
        return inv_freq
    factor, low, high, old = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_context
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)  # long wavelengths stretched by the factor
    smooth = (old / wavelen - low) / (high - low)
    between = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B or 1, T, head_dim) for integer ``positions`` (B or 1, T), computed in fp32 then cast (as Hugging Face does)."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout: the two halves of a head rotate together
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) queries or keys by their positions' angles."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + _rotate_half(x) * sin


class GroupedQueryAttention(nn.Module):
    """Causal attention with n_kv_head key/value heads; optional per-head RMSNorm of queries and keys (QK-norm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.cfg = cfg
        self.dropout = cfg.dropout
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k = nn.Linear(cfg.n_embd, cfg.kv_dim, bias=False)
        self.v = nn.Linear(cfg.n_embd, cfg.kv_dim, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.layer_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.layer_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerKV | None = None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``positions`` (B, T) are the RoPE positions (default 0..T-1); ``mask`` as in the gpt3 block."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        k = self.k(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, kv_heads, T, head_dim)
        v = self.v(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if positions is None:
            positions = torch.arange(T, device=x.device)[None]
        cos, sin = rope_tables(positions, inv_frequencies(self.cfg, x.device), q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, kv_heads, past + T, head_dim): the cache holds only the grouped heads
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            # Each key/value head serves `groups` consecutive query heads (Llama's order).
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """proj(silu(gate(x)) * up(x)): three matrices of width ffn_hidden, no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    """Pre-RMSNorm decoder block: x + attn(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.attn = GroupedQueryAttention(cfg)
        self.ln_2 = RMSNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerKV | None = None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), cache, mask, positions))
        return x + self.drop(self.mlp(self.ln_2(x)))
