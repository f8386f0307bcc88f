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
        counts: optional per-block summaries (valid keys (B, 1, NB), token-kept valid keys (B, 1|Hs, NB))
            that the caller can compute once per step instead of per layer; derived when absent.
    Hs is 1 (one set shared by all heads) or the number of KV heads (per-KV-head selection; the
    query heads of a GQA group share their KV head's set).
    """

    block_keep: torch.Tensor
    token_keep: torch.Tensor
    valid: torch.Tensor
    block_size: int
    counts: tuple[torch.Tensor, torch.Tensor] | None = None

    def block_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(valid keys per block (B, 1, NB), token-kept valid keys per block (B, 1|Hs, NB))."""
        if self.counts is not None:
            return self.counts
        return block_counts(self.token_keep, self.valid, self.block_size)

    def dense_mask(self) -> torch.Tensor:
        """The full semantics as a (B, Hs, Cap) bool mask."""
        blk = self.block_keep.repeat_interleave(self.block_size, dim=-1)  # (B, Hs, Cap)
        return (blk | self.token_keep) & self.valid[:, None, :]

    def density(self) -> torch.Tensor:
        """Fraction of valid keys attended, per row, averaged over selection heads: (B,).

        A kept block contributes its valid keys, any other block its token-kept keys (exact)."""
        vc, tc = self.block_counts()
        return kept_density(self.block_keep[:, None], vc, tc)[:, 0]


def block_counts(token_keep: torch.Tensor, valid: torch.Tensor, block_size: int):
    """Per-block counts of valid slots (B, 1, NB) and of token-kept valid slots (B, Ht, NB)."""
    b, ht, cap = token_keep.shape
    nb = cap // block_size
    vc = valid.reshape(b, 1, nb, block_size).sum(-1)
    tc = (token_keep & valid[:, None, :]).reshape(b, ht, nb, block_size).sum(-1)
    return vc, tc


def kept_density(block_keep: torch.Tensor, vc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
    """Fraction of valid keys kept, averaged over selection heads, for a stack of selections.

    Args:
        block_keep: (B, L, Hs, NB) bool (L selections, e.g. layers); vc, tc: `block_counts` (B, 1, NB),
            (B, 1|Hs, NB). A kept block contributes its valid keys, any other block its token-kept keys.
    Returns:
        (B, L) float32.
    """
    kept = torch.where(block_keep, vc[:, None], tc[:, None]).float().sum(-1).mean(-1)  # (B, L)
    return kept / vc.float().sum((1, 2)).clamp(min=1)[:, None]
