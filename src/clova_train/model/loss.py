"""The language-model loss, one module for every engine: plain cross-entropy of logits, and the chunked form that never holds (tokens x vocab) fp32 logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of (B, T, vocab) logits against (B, T) targets, in fp32, plus ``z_loss`` x mean (log Z)^2."""
    flat = logits.float().view(-1, logits.size(-1))
    loss = F.cross_entropy(flat, targets.reshape(-1))
    return loss + z_loss * torch.logsumexp(flat, dim=-1).pow(2).mean() if z_loss else loss


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight^T`` computed a chunk of tokens at a time, gradients included.

    Each chunk's fp32 logits live only while the chunk is processed: the
    forward pass also computes that chunk's share of d(loss)/dh and
    d(loss)/d(weight) (softmax minus one-hot), so backward only scales them.
    Memory is h and weight sized, not tokens x vocabulary.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, grads: bool, z_loss: float) -> torch.Tensor:
        n = h.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if grads else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        for start in range(0, n, chunk):
            hc, tc = h[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(hc, weight).float()  # (chunk, vocab)
            total += F.cross_entropy(logits, tc, reduction="sum")
            if z_loss:
                lse = torch.logsumexp(logits, dim=-1)  # (chunk,)
                total += z_loss * lse.pow(2).sum()
            if grads:
                g = torch.softmax(logits, dim=-1)
                if z_loss:
                    g *= 1.0 + 2.0 * z_loss * lse[:, None]  # d(z lse^2)/d logits = 2 z lse softmax
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
        return dh * grad_out.to(dh.dtype), dw * grad_out.to(dw.dtype), None, None, None, None


def chunked_lm_loss(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024, z_loss: float = 0.0
) -> torch.Tensor:
    """The language-model loss of hidden states ``h`` (B, T, C) through the output head ``weight`` (vocab, C), never holding (B*T, vocab) fp32 logits.

    Equal to ``lm_loss(F.linear(h, weight), targets, z_loss)`` up to float summation order.
    ``z_loss`` (PaLM's 1e-4) pulls log Z towards 0 so bf16 logits keep their precision.
    Under ``no_grad`` (evaluation) no gradient is computed or kept: inside an
    autograd Function's forward the grad mode always reads False, so it is
    decided here, before the call.
    """
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    flat = h.reshape(-1, h.shape[-1])  # (B*T, C)
    return _ChunkedHeadLoss.apply(flat, weight, targets.reshape(-1), chunk_tokens, grads, float(z_loss))
