"""Keys and values of the tokens seen so far, so a decoding step feeds only new tokens (inference only)."""

from __future__ import annotations

import torch


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
