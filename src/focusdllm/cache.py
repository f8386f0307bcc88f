"""Fixed-capacity KV cache holding post-RoPE keys, head-split, written in place.

Keys are cached after RoPE (Fast-dLLM caches them before and re-rotates the whole context at
every layer of every step). The last slot of the capacity is never valid: writes that must be
discarded (padding rows, query-only rows) land there.
"""

from __future__ import annotations

import torch


class KVCache:
    """K/V of every layer: (n_layers, B, Hkv, Cap, D), plus per-layer prompt block means."""

    def __init__(self, n_layers, batch, n_kv_heads, capacity, head_dim, dtype, device):
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.trash = capacity - 1
        self.block_rep: list = [None] * n_layers  # each (B, Hkv, NBp, D) means or (B, Hkv, NBp, 2D) bounds

    def slots(self, rows: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
        """Destination slots (B, T) of rows (B, T): rows with write=False go to the trash slot."""
        return torch.where(write, rows, torch.full_like(rows, self.trash))

    def set_block_rep(self, layer: int, rep: torch.Tensor):
        """Store a refresh's block summaries in place when the shape matches, so CUDA graphs captured in an
        earlier block read the new values, not a freed buffer."""
        old = self.block_rep[layer]
        if old is None or old.shape != rep.shape:
            self.block_rep[layer] = rep
        else:
            old.copy_(rep)
