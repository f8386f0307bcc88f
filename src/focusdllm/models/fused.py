"""Compiled (fused) versions of a block's two halves, shared by every layer.

An eager block runs ~55 small kernels (RMSNorm and RoPE in fp32, head splits, residuals); in a
32-query step of an 8B model those cost as much as the matmuls, and in a 32K refresh ~15 ms per layer.
`torch.compile` fuses the elementwise work around the matmuls. The functions take the weights as
arguments, so one compiled graph serves all layers (a bound method would recompile per layer).
Enable with `model.fuse()`; numerics follow the eager block (fp32 norm statistics and LLaDA's fp32 RoPE).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..compiled import flagged, run_checked


def _norm(x, w, eps):
    xf = x if x.dtype == torch.float64 else x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, cos, sin):
    xr = x.to(cos.dtype)
    x1, x2 = xr.chunk(2, -1)
    return (xr * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def qkv_fn(x, nw, eps, wq, bq, wk, bk, wv, bv, cos, sin, hq: int, hkv: int):
    """x (B, T, C) -> post-RoPE q (B, Hq, T, D), k, v (B, Hkv, T, D)."""
    b, t, _ = x.shape
    h = _norm(x, nw, eps)
    q = F.linear(h, wq, bq).view(b, t, hq, -1).transpose(1, 2)  # (B, Hq, T, D)
    k = F.linear(h, wk, bk).view(b, t, hkv, -1).transpose(1, 2)  # (B, Hkv, T, D)
    v = F.linear(h, wv, bv).view(b, t, hkv, -1).transpose(1, 2)
    return _rope(q, cos, sin), _rope(k, cos, sin), v.contiguous()


def finish_fn(x, attn, wo, nw, eps, wg, wu, wd):
    """Residual + output projection, then residual + SwiGLU MLP. attn (B, Hq, T, D)."""
    b, hq, t, d = attn.shape
    x = x + F.linear(attn.transpose(1, 2).reshape(b, t, hq * d), wo)
    h = _norm(x, nw, eps)
    return x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)


@functools.cache
def compiled():
    """The two compiled functions (automatic dynamic shapes: lengths vary between calls); each also returns
    whether it ran compiled (`compiled.flagged`), which `run_checked` turns into an error on eager fallback."""
    return (torch.compile(flagged(qkv_fn), fullgraph=True), torch.compile(flagged(finish_fn), fullgraph=True))


def block_qkv(blk, x, cos, sin):
    qkv, _ = compiled()
    return run_checked(qkv, x, blk.attn_norm.weight, blk.attn_norm.eps, blk.q_proj.weight, blk.q_proj.bias,
                       blk.k_proj.weight, blk.k_proj.bias, blk.v_proj.weight, blk.v_proj.bias, cos, sin,
                       blk.n_heads, blk.n_kv_heads)


def block_finish(blk, x, attn):
    _, fin = compiled()
    return run_checked(fin, x, attn, blk.o_proj.weight, blk.mlp_norm.weight, blk.mlp_norm.eps, blk.gate_proj.weight,
                       blk.up_proj.weight, blk.down_proj.weight)
