"""The GPT-3 decoder in plain single-device PyTorch (nanoGPT-style).

Token + learned position embeddings, pre-LayerNorm blocks (causal attention
through ``scaled_dot_product_attention`` so CUDA uses flash kernels; exact
GELU MLP), a final LayerNorm and an output head tied to the token embedding.
Parameter names are the contract with export (see ``export.adapter.HF_KEY_MAP``);
parallel wiring (ZeRO-3, pipeline stages, activation checkpointing) lives in
``training/`` (``zero.py``, ``pipeline.py``) and never here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from clova_train.model.config import ModelConfig


class LayerKV:
    """One block's cached keys and values, each (B, n_head, capacity, head_dim)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_head, T, head_dim) keys and values; return all stored so far."""
        if self.k is None:
            # Allocated once at full capacity, so decoding never re-copies the past.
            B, H, _, D = k.shape
            self.k = k.new_empty(B, H, self.capacity, D)
            self.v = v.new_empty(B, H, self.capacity, D)
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"key/value cache full: {end} positions > capacity {self.capacity}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of the tokens seen so far, so a decoding step feeds only new tokens.

    ``valid`` (B, length) is False at left padding: nothing attends to those
    positions and position ids count only valid tokens, so a padded row of a
    batch computes what it would compute alone. Inference only (no autograd).
    """

    def __init__(self, n_layer: int, capacity: int):
        self.layers = [LayerKV(capacity) for _ in range(n_layer)]
        self.valid: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cache: LayerKV | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Causal attention; with ``mask`` (B, 1, T, past + T) bool, over the cached past too."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, n_head, past + T, head_dim)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm decoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cache: LayerKV | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.apply(lambda m: init_weights(m, cfg))

    def embed(
        self,
        idx: torch.Tensor | None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token plus position embeddings (B, T, C); ``inputs_embeds`` stands in for wte(idx)."""
        tok = self.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if positions is None:
            T = tok.shape[1]
            if T > self.cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
            positions = torch.arange(T, device=tok.device)
        return self.drop(tok + self.wpe(positions))  # (B, T, C)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        # Tied output head: logits = ln_f(x) @ wte^T, (B, T, C) -> (B, T, vocab)
        return F.linear(self.ln_f(x), self.wte.weight)

    def hidden(
        self,
        idx: torch.Tensor | None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, C), before ln_f and the head.

        Without ``cache`` and ``valid`` this is the plain causal pass of training.
        ``cache`` holds earlier tokens and is extended with these; ``valid``
        (B, T) bool is False at left padding.
        """
        if cache is None and valid is None:
            x = self.embed(idx, inputs_embeds=inputs_embeds)
            for block in self.blocks:
                x = block(x)
            return x
        src = idx if inputs_embeds is None else inputs_embeds
        B, T = src.shape[:2]
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.block_size:
            raise ValueError(f"sequence length {past + T} exceeds block_size {self.cfg.block_size}")
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=src.device)
        seen = valid if past == 0 else torch.cat([cache.valid, valid], dim=1)  # (B, past + T)
        if cache is not None:
            cache.valid = seen
        # Positions count real tokens only, as they would in an unpadded row.
        positions = (seen.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)
        q_pos = torch.arange(past, past + T, device=src.device)
        k_pos = torch.arange(past + T, device=src.device)
        causal = k_pos[None, :] <= q_pos[:, None]  # (T, past + T)
        # A query always sees itself, so a padding query never softmaxes over nothing (NaN).
        mask = (causal & seen[:, None, :]) | (k_pos[None, :] == q_pos[:, None])  # (B, T, past + T)
        mask = mask[:, None]  # (B, 1, T, past + T): the same for every head
        x = self.embed(idx, inputs_embeds=inputs_embeds, positions=positions)
        layers = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, layer_cache in zip(self.blocks, layers):
            x = block(x, layer_cache, mask)
        return x

    def forward(
        self,
        idx: torch.Tensor | None,
        targets: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
    ):
        """Logits (B, T, vocab), or the mean cross-entropy when targets are given.

        The keyword arguments serve inference and p-tuning (see ``hidden``);
        training passes (idx, targets) only and takes the plain causal path.
        """
        x = self.hidden(idx, inputs_embeds=inputs_embeds, cache=cache, valid=valid)
        if targets is None:
            return self.head(x)
        return chunked_lm_loss(self.ln_f(x), self.wte.weight, targets)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight^T`` computed a chunk of tokens at a time, gradients included.

    Each chunk's fp32 logits live only while the chunk is processed: the
    forward pass also computes that chunk's share of d(loss)/dh and
    d(loss)/d(weight) (softmax minus one-hot), so backward only scales them.
    Memory is h and weight sized, not tokens x vocabulary.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n = h.shape[0]
        grads = torch.is_grad_enabled() or h.requires_grad or weight.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if grads else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        for start in range(0, n, chunk):
            hc, tc = h[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(hc, weight).float()  # (chunk, vocab)
            total += F.cross_entropy(logits, tc, reduction="sum")
            if grads:
                g = torch.softmax(logits, dim=-1)
                g[torch.arange(len(tc), device=g.device), tc] -= 1.0
                g /= n
                dh[start : start + chunk] = (g @ weight.float()).to(h.dtype)
                dw += g.t() @ hc.float()
        if grads:
            ctx.save_for_backward(dh, dw.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        dh, dw = ctx.saved_tensors
        return dh * grad_out.to(dh.dtype), dw * grad_out.to(dw.dtype), None, None


def chunked_lm_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
    """The language-model loss of hidden states ``h`` (B, T, C) through the tied head ``weight`` (vocab, C), never holding (B*T, vocab) fp32 logits.

    Equal to ``lm_loss(F.linear(h, weight), targets)`` up to float summation order.
    """
    flat = h.reshape(-1, h.shape[-1])  # (B*T, C)
    return _ChunkedHeadLoss.apply(flat, weight, targets.reshape(-1), chunk_tokens)


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """GPT-2/3 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
    if isinstance(module, (CausalSelfAttention, MLP)):
        nn.init.normal_(module.proj.weight, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        nn.init.zeros_(module.proj.bias)
        first = module.qkv if isinstance(module, CausalSelfAttention) else module.fc
        nn.init.normal_(first.weight, mean=0.0, std=cfg.init_std)
        nn.init.zeros_(first.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
