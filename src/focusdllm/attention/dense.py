"""Dense attention restricted to a key mask: the plain reference every sparse executor must equal."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_heads(mask: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """(B, Hs, S) -> (B, Hq, S): a per-KV-head set is shared by the query heads of its group."""
    hs = mask.shape[1]
    return mask if hs in (1, n_q_heads) else mask.repeat_interleave(n_q_heads // hs, dim=1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the kept keys only.

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, S, D); keep: (B, Hs, S) bool with Hs in {1, Hkv, Hq}.
    Returns:
        (B, Hq, T, D).
    """
    mask = expand_heads(keep, q.shape[1])[:, :, None, :]  # (B, Hs|Hq, 1, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
