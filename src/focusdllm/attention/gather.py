"""Eager sparse attention: gather the kept keys, then SDPA (Focus-dLLM step 6, any device).

The kept keys of each (row, selection head) are compacted into a padded (B, Hs, M, D) buffer with
M = the largest kept count, so the attention itself costs O(T * M) instead of O(T * Cap). Building the
indices reads the (B, Hs, Cap) bool selection once (a cumsum and a scatter, no sort).

Host syncs: M must be a Python int. Pass `max_keys` (a static upper bound the caller knows, e.g.
`K * block_size + num_sinks + response_len`) to keep the call sync-free; the bound is then checked on
the device with `torch._assert_async`. Without it, M is read back from the device once per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .selection import KeySelection


def kept_indices(keep: torch.Tensor, max_keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending positions of the kept keys, left-packed and padded.

    Args:
        keep: (B, Hs, S) bool.
        max_keys: static upper bound on the kept count per row (no host sync); None reads it back.
    Returns:
        idx (B, Hs, M) int64 (padding slots hold 0) and ok (B, Hs, M) bool (True on real keys).
    """
    counts = keep.sum(-1)  # (B, Hs)
    if max_keys is None:
        m = max(int(counts.max()), 1)  # one host sync
    else:
        m = max(int(max_keys), 1)
        torch._assert_async(counts.max() <= m, "gather_attention: kept keys exceed max_keys")
    s = keep.shape[-1]
    pos = keep.cumsum(-1) - 1  # (B, Hs, S): slot of each kept key
    dst = torch.where(keep & (pos < m), pos, m)  # dropped keys land in the spare slot m
    src = torch.arange(s, device=keep.device).expand_as(dst)
    idx = torch.zeros(*keep.shape[:-1], m + 1, dtype=torch.long, device=keep.device)
    idx = idx.scatter_(-1, dst, src)[..., :m]  # (B, Hs, M)
    ok = torch.arange(m, device=keep.device) < counts[..., None]  # (B, Hs, M)
    return idx, ok


def gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: KeySelection,
    max_keys: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over the selected keys only, by gathering them first.

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, Cap, D); sel: a selection with Hs in {1, Hkv}.
        max_keys: static bound on kept keys per (row, selection head); see the module docstring.
        scale: softmax scale, default 1/sqrt(D).
    Returns:
        (B, Hq, T, D), equal to `masked_attention(q, k, v, sel.dense_mask())`.
    """
    b, hq, t, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    hs = sel.block_keep.shape[1]
    if hs not in (1, hkv) or hq % hkv:
        raise ValueError(f"selection heads {hs} must be 1 or Hkv={hkv}; Hq={hq} a multiple of Hkv")
    idx, ok = kept_indices(sel.dense_mask(), max_keys)  # (B, Hs, M)
    m = idx.shape[-1]
    kg = k.gather(2, idx[..., None].expand(b, hkv, m, d))  # (B, Hkv, M, D)
    vg = v.gather(2, idx[..., None].expand(b, hkv, m, dv))  # (B, Hkv, M, Dv)
    qp = rearrange(q, "b (h g) t d -> b h (g t) d", h=hkv)  # (B, Hkv, G*T, D): one KV head per group
    out = F.scaled_dot_product_attention(qp, kg, vg, attn_mask=ok[:, :, None, :], scale=scale)
    return rearrange(out, "b h (g t) d -> b (h g) t d", t=t)  # (B, Hq, T, Dv)
