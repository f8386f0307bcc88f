"""`KeySelection`: which cached keys the queries of one layer attend to."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KeySelection:
    """Kept keys per (row, selection head) over a KV buffer of capacity `Cap`.

    Attributes:
        block_keep: (B, Hs, NB) bool, NB = Cap // block_size: whole key blocks kept (prompt top-K).
        token_keep: (B, Hs, Cap) bool: single kept keys (sinks, response positions).
        valid: (B, Cap) bool: slots that hold a real key (not padding or unused capacity).
        block_size: keys per block; Cap is a multiple of it.
    Hs is 1 (one set shared by all heads) or the number of KV heads (per-KV-head selection; the
    query heads of a GQA group share their KV head's set).
    """

    block_keep: torch.Tensor
    token_keep: torch.Tensor
    valid: torch.Tensor
    block_size: int

    def dense_mask(self) -> torch.Tensor:
        """The full semantics as a (B, Hs, Cap) bool mask."""
        blk = self.block_keep.repeat_interleave(self.block_size, dim=-1)  # (B, Hs, Cap)
        return (blk | self.token_keep) & self.valid[:, None, :]

    def density(self) -> torch.Tensor:
        """Fraction of valid keys attended, per row: (B,)."""
        kept = self.dense_mask().float().mean(1).sum(-1)
        return kept / self.valid.float().sum(-1).clamp(min=1)
