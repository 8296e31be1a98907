"""The decoder in plain single-device PyTorch (nanoGPT-style), built from named parts, in two architectures.

``gpt3``: token + learned position embeddings, pre-LayerNorm blocks (causal
attention through ``scaled_dot_product_attention`` so CUDA uses flash kernels;
exact GELU MLP), a final LayerNorm and an output head tied to the token
embedding. ``llama`` (model/llama.py): token embedding, RMSNorm blocks with
rotary positions, grouped-query attention and SwiGLU, a final RMSNorm and an
untied head (tied if the config says so).

Seams: the model is the ordered list :func:`parts` (embedding, positions,
blocks, final norm, head); the pipeline engine builds its stages from that
same list, so a part is written once. Building allocates; :meth:`GPT.init_weights`
initialises, layer by layer from a seed, so every layout starts from the same
weights and a model built on the meta device is initialised (or loaded) only
once it has memory. Parameter counts and FLOPs are read off the model
(:func:`num_params`, :func:`flops_per_token`). Parameter names are the contract
with checkpoints and export (``model.adapter.HF_KEY_MAP``); parallel wiring
lives in ``training/parallel`` and never here.
"""

from __future__ import annotations

import functools
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from clova_train.model.cache import KVCache, LayerKV
from clova_train.model.config import ModelConfig
from clova_train.model.llama import FinalRMSNorm, GroupedQueryAttention, LlamaBlock, OutputHead, RMSNorm, SwiGLU
from clova_train.model.loss import chunked_lm_loss


class Table(nn.Embedding):
    """An embedding table whose building draws nothing on the meta device (torch's normal_ there costs seconds on first use)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class TokenEmbedding(nn.Module):
    """Token ids to vectors, (B, T) -> (B, T, C); GPT-3 ties its output head to this table (:meth:`logits`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = Table(cfg.vocab_size, cfg.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The tied head: (B, T, C) -> (B, T, vocab)."""
        return F.linear(x, self.wte.weight)


class PositionEmbedding(nn.Module):
    """Learned absolute positions added to the token vectors, then dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wpe = Table(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        return self.drop(x + self.wpe(positions))  # (B, T, C)


class FinalLayerNorm(nn.LayerNorm):
    """The LayerNorm after the last block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.n_embd, eps=cfg.layer_norm_eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cache: LayerKV | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Causal attention; with ``mask`` (B, 1, T, past + T) bool, over the cached past too.

        Shapes come from head_dim and the tensors, never from the config's head
        count, so a layer holding a slice of the heads runs unchanged.
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, T, heads * head_dim)
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, heads, past + T, head_dim)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, heads * head_dim)
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
        self,
        x: torch.Tensor,
        cache: LayerKV | None = None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # positions: the llama block's RoPE input; this block's positions were added with the embedding.
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


BLOCKS = (Block, LlamaBlock)
"""The decoder block classes, one per arch (what activation checkpointing, compile and tensor parallelism act on)."""


@dataclass(frozen=True)
class Part:
    """One part of the model, in forward order; pipeline layer i is part i, built as ``module(cfg)``."""

    name: str | None
    """Where the part sits in GPT ("wte", "blocks.3"); None for the head, which reuses the tied embedding."""
    module: type
    tied: str | None = None
    """Key shared by parts that are one module (the embedding and the tied head)."""
    forward_fn: Callable | None = None
    """A tied part's own forward, given the shared module."""


def parts(cfg: ModelConfig) -> list[Part]:
    """The model as an ordered list of parts: token embedding, positions (gpt3), blocks, final norm, head (tied or its own)."""
    if cfg.arch == "gpt3":
        return [
            Part("wte", TokenEmbedding, tied="embed"),
            Part("wpe", PositionEmbedding),
            *[Part(f"blocks.{i}", Block) for i in range(cfg.n_layer)],
            Part("ln_f", FinalLayerNorm),
            Part(None, TokenEmbedding, tied="embed", forward_fn=TokenEmbedding.logits),
        ]
    tied = "embed" if cfg.tie_embeddings else None
    head = Part(None, TokenEmbedding, tied="embed", forward_fn=TokenEmbedding.logits) if tied else Part("lm_head", OutputHead)
    return [
        Part("wte", TokenEmbedding, tied=tied),
        *[Part(f"blocks.{i}", LlamaBlock) for i in range(cfg.n_layer)],
        Part("ln_f", FinalRMSNorm),
        head,
    ]


class GPT(nn.Module):
    """The parts of :func:`parts` on one device. Build, then :meth:`init_weights` (or load a state dict)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = TokenEmbedding(cfg)
        # The parts' modules are registered here, under the names checkpoints and export know
        # (wte.weight, wpe.weight), so the parts themselves stay plain attributes.
        self.wte = self.tokens.wte
        self.positions = PositionEmbedding(cfg) if cfg.arch == "gpt3" else None
        if self.positions is not None:
            self.wpe, self.drop = self.positions.wpe, self.positions.drop
        block = Block if cfg.arch == "gpt3" else LlamaBlock
        self.blocks = nn.ModuleList([block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = FinalLayerNorm(cfg) if cfg.arch == "gpt3" else FinalRMSNorm(cfg)
        self.lm_head = None if cfg.tie_embeddings else OutputHead(cfg)

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, (TokenEmbedding, PositionEmbedding)):
            object.__setattr__(self, name, value)  # a part, not a child: its modules are registered above
        else:
            super().__setattr__(name, value)

    def layers(self) -> list[nn.Module]:
        """The parts that own parameters, in the order of :func:`parts` (the head reuses the token embedding)."""
        own = [self.tokens] + ([self.positions] if self.positions is not None else [])
        return own + [*self.blocks, self.ln_f] + ([self.lm_head] if self.lm_head is not None else [])

    def init_weights(self, seed: int | None = None, *, gathered: Callable | None = None) -> None:
        """GPT-3's initialisation, part by part (see :func:`init_part`).

        With ``seed``, part i draws from ``seed + i``: the weights do not depend
        on how the parts are spread over stages or ranks. Without, they draw from
        the current RNG stream in the same order.
        """
        for i, layer in enumerate(self.layers()):
            init_part(layer, self.cfg, None if seed is None else seed + i, gathered=gathered)

    def embed(
        self,
        idx: torch.Tensor | None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token (plus, for gpt3, position) embeddings (B, T, C); ``inputs_embeds`` stands in for wte(idx)."""
        tok = self.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if positions is None and tok.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence length {tok.shape[1]} exceeds block_size {self.cfg.block_size}")
        return tok if self.positions is None else self.positions(tok, positions)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head's (vocab, C) matrix: the token embedding's when tied."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of final hidden states: ln_f, then the head."""
        return F.linear(self.ln_f(x), self.head_weight)

    def hidden(
        self,
        idx: torch.Tensor | None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
        eod_id: int | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, C), before ln_f and the head.

        Without ``cache``, ``valid`` and ``eod_id`` this is the plain causal pass of training.
        ``cache`` holds earlier tokens and is extended with these; ``valid``
        (B, T) bool is False at left padding. ``eod_id`` masks documents
        packed into one row from each other (see :func:`document_mask`).
        """
        if eod_id is not None:
            mask, positions = document_mask(idx, eod_id)
            x = self.embed(idx, inputs_embeds=inputs_embeds, positions=positions)
            for block in self.blocks:
                x = block(x, None, mask, positions)
            return x
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
            x = block(x, layer_cache, mask, positions)
        return x

    def forward(
        self,
        idx: torch.Tensor | None,
        targets: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
        eod_id: int | None = None,
        z_loss: float = 0.0,
    ):
        """Logits (B, T, vocab), or the mean cross-entropy (plus ``z_loss`` x mean log Z^2) when targets are given.

        The keyword arguments serve inference and p-tuning (see ``hidden``);
        training passes (idx, targets), and ``eod_id`` under document masking.
        The loss runs inside forward so ZeRO-3 has the head's weight gathered.
        """
        x = self.hidden(idx, inputs_embeds=inputs_embeds, cache=cache, valid=valid, eod_id=eod_id)
        if targets is None:
            return self.head(x)
        return chunked_lm_loss(self.ln_f(x), self.head_weight, targets, z_loss=z_loss)


def document_mask(idx: torch.Tensor, eod_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of packed documents (B, T): the attention mask (B, 1, T, T) and per-document positions (B, T).

    A token attends only to earlier tokens of its own document; a document
    ends with (and includes) its end-of-document token, and positions restart
    at 0 after it, so a document computes what it would compute alone.
    """
    ends = idx == eod_id
    doc = torch.cumsum(ends.long(), dim=1) - ends.long()  # (B, T): the eod belongs to the document it ends
    T = idx.shape[1]
    pos = torch.arange(T, device=idx.device)
    causal = pos[None, :] <= pos[:, None]  # (T, T)
    mask = causal[None] & (doc[:, :, None] == doc[:, None, :])  # (B, T, T)
    # Position = distance from the document's first token in this row.
    first = torch.zeros_like(doc)
    starts = torch.cat([torch.ones_like(ends[:, :1]), ends[:, :-1]], dim=1)  # a document starts after an eod
    first = torch.cummax(torch.where(starts, pos[None].expand_as(doc), first), dim=1).values
    return mask[:, None], pos[None] - first


# Modules whose parameters init_part sets; under ZeRO-3 each is gathered once.
INIT_UNITS = (CausalSelfAttention, MLP, GroupedQueryAttention, SwiGLU, nn.Embedding, nn.LayerNorm, RMSNorm, OutputHead)


def init_part(
    part: nn.Module,
    cfg: ModelConfig,
    seed: int | None = None,
    *,
    gathered: Callable[[nn.Module], AbstractContextManager[bool]] | None = None,
) -> None:
    """GPT-2/3 initialisation of one part: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer), norms 1 (both archs).

    ``seed`` reseeds the RNG first. ``gathered(unit)`` (ZeRO-3) is a context in
    which the unit's parameters are whole; it yields whether this rank writes them.
    """
    if seed is not None:
        torch.manual_seed(seed)
    for module in part.modules():
        if not isinstance(module, INIT_UNITS):
            continue
        if gathered is None:
            _init_unit(module, cfg)
            continue
        with gathered(module) as writer:
            if writer:
                _init_unit(module, cfg)


def _init_unit(module: nn.Module, cfg: ModelConfig) -> None:
    if isinstance(module, (CausalSelfAttention, MLP)):
        nn.init.normal_(module.proj.weight, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        nn.init.zeros_(module.proj.bias)
        first = module.qkv if isinstance(module, CausalSelfAttention) else module.fc
        nn.init.normal_(first.weight, mean=0.0, std=cfg.init_std)
        nn.init.zeros_(first.bias)
    elif isinstance(module, GroupedQueryAttention):
        nn.init.normal_(module.proj.weight, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        for linear in (module.q, module.k, module.v):
            nn.init.normal_(linear.weight, mean=0.0, std=cfg.init_std)
    elif isinstance(module, SwiGLU):
        nn.init.normal_(module.proj.weight, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        for linear in (module.gate, module.up):
            nn.init.normal_(linear.weight, mean=0.0, std=cfg.init_std)
    elif isinstance(module, (nn.Embedding, OutputHead)):
        nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


@functools.lru_cache(maxsize=32)
def meta_model(cfg: ModelConfig) -> GPT:
    """The model on the meta device: names and shapes, no memory (cached per config; do not modify it)."""
    with torch.device("meta"):
        return GPT(cfg)


def part_names(cfg: ModelConfig) -> list[dict[str, str]]:
    """For each part of :func:`parts`: its own parameter names -> GPT's names ({} for the tied head, which owns none)."""
    model = meta_model(cfg)
    ours = {id(p): n for n, p in model.named_parameters()}
    names = [{n: ours[id(p)] for n, p in layer.named_parameters()} for layer in model.layers()]
    return names + [{}] * (len(parts(cfg)) - len(names))


def part_sizes(cfg: ModelConfig) -> list[int]:
    """Parameters each part owns, in the order of :func:`parts` (the tied head owns none)."""
    return [sum(p.numel() for p in layer.parameters()) for layer in meta_model(cfg).layers()] + [0]


def block_matrix_params(cfg: ModelConfig) -> int:
    """Elements of one block's weight matrices: what its matmuls move, and what sizes ZeRO's buckets."""
    return sum(p.numel() for p in meta_model(cfg).blocks[0].parameters() if p.dim() == 2)


def largest_unit_params(cfg: ModelConfig) -> int:
    """Parameters of the largest module that holds parameters itself (ZeRO-3 gathers one such at a time)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in meta_model(cfg).modules())


def num_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Exact parameter count, read off the model (the tied head counted once); without the embedding tables if asked."""
    model = meta_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    if not embeddings:
        n -= sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False))
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the dense matmuls plus attention scores.

    N counts non-embedding parameters plus the output head (the tied table's
    matmul); the attention term, per attention layer, is 12 * seq_len * width:
    QK^T and AV cost 2 * 2 * seq_len * width per token forward, x3 with
    backward, causal masking not discounted, as in PaLM's appendix B (6NT + 12LHQT).
    """
    model = meta_model(cfg)
    head = model.tokens.wte.weight.numel() if cfg.tie_embeddings else 0  # an untied head is counted as a matrix
    attention = sum(
        12.0 * seq_len * m.proj.in_features for m in model.modules() if isinstance(m, (CausalSelfAttention, GroupedQueryAttention))
    )
    return 6.0 * (num_params(cfg, embeddings=False) + head) + attention
