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

CPU_CHUNK_BYTES = 8 << 20  # gathered K + V per chunk on CPU: well inside a 32 MB L3


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


def head_chunk(device: torch.device, m: int, k: torch.Tensor, v: torch.Tensor) -> int:
    """KV heads per gather + SDPA chunk: all of them on GPU; on CPU as many as keep the gathered K and V
    under `CPU_CHUNK_BYTES`, so SDPA reads them from cache (16K keys, 10% kept, LLaDA's 32 KV heads, 1
    thread: 53 ms in one chunk, 28 ms in chunks of 4 heads; Dream's 4 KV heads already fit)."""
    if device.type != "cpu":
        return k.shape[1]
    per_head = k.shape[0] * m * (k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size())
    return max(1, min(k.shape[1], CPU_CHUNK_BYTES // per_head))


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Whole key rows x[b, h, idx[b, h or 0, m], :] (one row copy per index, not one per element).

    Args:
        x: (B, H, S, D), any strides; idx: (B, Hs, M) int64 with Hs in {1, H}.
    Returns:
        (B, H, M, D).
    """
    b, h = x.shape[:2]
    bi = torch.arange(b, device=x.device)[:, None, None]  # (B, 1, 1)
    hi = torch.arange(h, device=x.device)[None, :, None]  # (1, H, 1)
    return x[bi, hi, idx]  # (B, H, M, D)


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
    hq, t = q.shape[1:3]
    hkv, hs = k.shape[1], sel.block_keep.shape[1]
    if hs not in (1, hkv) or hq % hkv:
        raise ValueError(f"selection heads {hs} must be 1 or Hkv={hkv}; Hq={hq} a multiple of Hkv")
    idx, ok = kept_indices(sel.dense_mask(), max_keys)  # (B, Hs, M)
    qp = rearrange(q, "b (h g) t d -> b h (g t) d", h=hkv)  # (B, Hkv, G*T, D): one KV head per group
    out = qp.new_empty(*qp.shape[:3], v.shape[-1])  # (B, Hkv, G*T, Dv)
    step = head_chunk(q.device, idx.shape[-1], k, v)
    for h0 in range(0, hkv, step):  # a chunk's gathered keys stay in cache for its SDPA
        h = slice(h0, h0 + step)
        i, keep = (idx[:, h], ok[:, h]) if hs > 1 else (idx, ok)  # (B, h | 1, M)
        kg, vg = gather_rows(k[:, h], i), gather_rows(v[:, h], i)  # (B, h, M, D), (B, h, M, Dv)
        out[:, h] = F.scaled_dot_product_attention(qp[:, h], kg, vg, attn_mask=keep[:, :, None, :], scale=scale)
    return rearrange(out, "b h (g t) d -> b (h g) t d", t=t)  # (B, Hq, T, Dv)
