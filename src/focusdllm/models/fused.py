"""Compiled (fused) versions of a block's two halves, shared by every layer.

An eager block runs ~55 small kernels (RMSNorm and RoPE in fp32, head splits, residuals); in a
32-query step of an 8B model those cost as much as the matmuls, and in a 32K refresh ~15 ms per layer.
`torch.compile` fuses the elementwise work around the matmuls. The functions take the weights as
arguments, so one compiled graph serves all layers (a bound method would recompile per layer).
Enable with `model.fuse()`; numerics follow the eager block (fp32 norm statistics and LLaDA's fp32 RoPE).
`fuse()` also packs q/k/v and gate/up weights into one tensor each (the parameters become views of it, so no
memory is added and the names stay): a few-row step then runs 4 weight GEMMs per layer instead of 7.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..compiled import flagged, run_checked

_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gu": ("gate_proj", "up_proj")}


def _norm(x, w, eps):
    xf = x if x.dtype == torch.float64 else x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, cos, sin):
    xr = x.to(cos.dtype)
    x1, x2 = xr.chunk(2, -1)
    return (xr * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def take_rows(h, cos, sin, rows):
    """The normed hidden states (B, T, C) and RoPE tables (B, 1, T, D) of `rows` (B, N) only."""
    hr = h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))  # (B, N, C)
    idx = rows[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])  # (B, 1, N, D)
    return hr, cos.gather(2, idx), sin.gather(2, idx)


def qkv_fn(x, nw, eps, w_qkv, b_qkv, cos, sin, hq: int, hkv: int, q_rows=None):
    """x (B, T, C) -> post-RoPE q (B, Hq, T, D), k, v (B, Hkv, T, D); w_qkv = [wq; wk; wv].

    q_rows (B, N): queries of these rows only (B, Hq, N, D) (SlimInfer-pruned rows need keys, not queries)."""
    b, t, _ = x.shape
    h = _norm(x, nw, eps)
    if q_rows is None:
        qkv = F.linear(h, w_qkv, b_qkv).view(b, t, hq + 2 * hkv, -1).transpose(1, 2)  # (B, Hq + 2 Hkv, T, D)
        q, k, v = qkv.split([hq, hkv, hkv], 1)
        return _rope(q, cos, sin), _rope(k, cos, sin), v.contiguous()
    dq = hq * (w_qkv.shape[0] // (hq + 2 * hkv))
    bq, bkv = (None, None) if b_qkv is None else (b_qkv[:dq], b_qkv[dq:])
    k, v = F.linear(h, w_qkv[dq:], bkv).view(b, t, 2 * hkv, -1).transpose(1, 2).split([hkv, hkv], 1)
    hr, cr, sr = take_rows(h, cos, sin, q_rows)
    q = F.linear(hr, w_qkv[:dq], bq).view(b, q_rows.shape[1], hq, -1).transpose(1, 2)  # (B, Hq, N, D)
    return _rope(q, cr, sr), _rope(k, cos, sin), v.contiguous()


def qkv_write_fn(x, nw, eps, w_qkv, b_qkv, cos, sin, hq: int, hkv: int, ck, cv, slots, q_rows=None):
    """`qkv_fn`, then k, v written into the cache layer ck, cv (B, Hkv, Cap, D) at `slots` (B, T) in place
    (fused into the RoPE kernel on CUDA); returns q only (attention then reads the cache)."""
    q, k, v = qkv_fn(x, nw, eps, w_qkv, b_qkv, cos, sin, hq, hkv, q_rows)
    scatter_kv(ck, cv, slots, k, v)
    return q


def scatter_kv(ck, cv, slots, k, v):
    """ck[:, :, slots[b, t]] = k[:, :, t] (and v), in place. ck, cv (B, Hkv, Cap, D); k, v (B, Hkv, T, D)."""
    b, h = k.shape[:2]
    bi = torch.arange(b, device=k.device)[:, None, None]  # (B, 1, 1)
    hi = torch.arange(h, device=k.device)[None, :, None]  # (1, Hkv, 1)
    si = slots[:, None, :]  # (B, 1, T): index_put, which Inductor writes in place (a scatter_ copies the layer)
    ck.index_put_((bi, hi, si), k)
    cv.index_put_((bi, hi, si), v)


def finish_fn(x, attn, wo, nw, eps, w_gu, wd):
    """Residual + output projection, then residual + SwiGLU MLP. attn (B, Hq, T, D); w_gu = [wg; wu]."""
    b, hq, t, d = attn.shape
    x = x + F.linear(attn.transpose(1, 2).reshape(b, t, hq * d), wo)
    g, u = F.linear(_norm(x, nw, eps), w_gu).chunk(2, -1)  # (B, T, hidden) each
    return x + F.linear(F.silu(g) * u, wd)


def _shares(w: torch.Tensor, parts: list[torch.Tensor]) -> bool:
    ptr = w.untyped_storage().data_ptr()
    return all(p.untyped_storage().data_ptr() == ptr and p.dtype == w.dtype for p in parts)


def packed(blk, group: str, attr: str = "weight") -> torch.Tensor | None:
    """The block's packed [q; k; v] (group "qkv") or [gate; up] ("gu") weights (or biases), packing them on
    first use and again whenever the parameters stopped being its views (e.g. after `model.to(...)`)."""
    mods = [getattr(blk, m) for m in _GROUPS[group]]
    parts = [getattr(m, attr) for m in mods]
    if parts[0] is None:
        return None
    key = f"_packed_{group}_{attr}"
    w = getattr(blk, key, None)
    if w is None or not _shares(w, parts):
        w = torch.cat([p.detach() for p in parts])
        off = 0
        for m, p in zip(mods, parts):
            setattr(m, attr, nn.Parameter(w[off:off + p.shape[0]], requires_grad=p.requires_grad))
            off += p.shape[0]
        setattr(blk, key, w)
    return w


@functools.cache
def compiled():
    """The compiled functions (automatic dynamic shapes: lengths vary between calls); each also returns
    whether it ran compiled (`compiled.flagged`), which `run_checked` turns into an error on eager fallback."""
    return tuple(torch.compile(flagged(f), fullgraph=True) for f in (qkv_fn, finish_fn, qkv_write_fn))


def _qkv_args(blk, x, cos, sin):
    """The leading arguments of `qkv_fn` / `qkv_write_fn` for one block."""
    return (x, blk.attn_norm.weight, blk.attn_norm.eps, packed(blk, "qkv"), packed(blk, "qkv", "bias"), cos, sin,
            blk.n_heads, blk.n_kv_heads)


def block_qkv_write(blk, x, cos, sin, ck, cv, slots, q_rows=None):
    *_, qkv_write = compiled()
    return run_checked(qkv_write, *_qkv_args(blk, x, cos, sin), ck, cv, slots, q_rows)


def block_qkv(blk, x, cos, sin, q_rows=None):
    qkv, *_ = compiled()
    return run_checked(qkv, *_qkv_args(blk, x, cos, sin), q_rows)


def block_finish(blk, x, attn):
    _, fin, _ = compiled()
    return run_checked(fin, x, attn, blk.o_proj.weight, blk.mlp_norm.weight, blk.mlp_norm.eps, packed(blk, "gu"),
                       blk.down_proj.weight)
