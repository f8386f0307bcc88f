"""One bidirectional transformer for LLaDA and Dream: RMSNorm, RoPE, SwiGLU, optional GQA and qkv bias.

The block is split into `qkv` (norm + projections + RoPE, post-RoPE keys out) and `finish`
(output projection, residual, MLP) so the decode loop can decide per layer which keys a query
attends to. `DiffusionLM.forward` is the plain dense path: `model(input_ids)` -> logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import ModelConfig
from . import fused


class RMSNorm(nn.Module):
    """fp32 statistics, cast back to the input dtype, then scale (HF Llama / LLaDA order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()  # fp32 or better statistics
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """Non-interleaved ("rotate half") RoPE; cos/sin built in fp32 for any positions on demand."""

    def __init__(self, head_dim: int, theta: float, fp32: bool):
        super().__init__()
        self.fp32, self.theta, self.dim = fp32, theta, head_dim
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin (B, 1, T, D): fp32 (LLaDA) or model dtype (Dream); fp64
        models get fp64 tables (the official code stays in fp32 there)."""
        with torch.autocast(positions.device.type, enabled=False):
            if dtype == torch.float64:
                inv = torch.arange(0, self.dim, 2, dtype=torch.float64, device=positions.device) / self.dim
                freqs = positions.double()[..., None] / self.theta**inv
            else:
                freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
            emb = torch.cat([freqs, freqs], -1)[:, None]  # (B, 1, T, D)
            cos, sin = emb.cos(), emb.sin()
        if dtype != torch.float64 and not self.fp32:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        xr = x.to(cos.dtype)
        x1, x2 = xr.chunk(2, -1)
        rot = torch.cat([-x2, x1], -1)
        return (xr * cos + rot * sin).to(dt)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.attn_norm = RMSNorm(d, cfg.rms_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.rms_eps)
        self.gate_proj = nn.Linear(d, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, d, bias=False)
        self.fused = False  # models/fused.py: compiled halves, see DiffusionLM.fuse

    def qkv(self, x, rope: Rotary, cos, sin, q_rows: torch.Tensor | None = None):
        """x (B, T, C) -> q (B, Hq, T, D), k, v (B, Hkv, T, D); q and k rotated (post-RoPE).

        q_rows (B, N): compute queries for these rows only (q is then (B, Hq, N, D)); keys and values for all.
        """
        if self.fused:
            return fused.block_qkv(self, x, cos, sin, q_rows)
        h = self.attn_norm(x)
        hq, cq, sq = (h, cos, sin) if q_rows is None else fused.take_rows(h, cos, sin, q_rows)
        q = rearrange(self.q_proj(hq), "b t (h d) -> b h t d", h=self.n_heads)
        k = rearrange(self.k_proj(h), "b t (h d) -> b h t d", h=self.n_kv_heads)
        v = rearrange(self.v_proj(h), "b t (h d) -> b h t d", h=self.n_kv_heads)
        return rope.apply(q, cq, sq), rope.apply(k, cos, sin), v

    def qkv_into(self, x, rope: Rotary, cos, sin, ck: torch.Tensor, cv: torch.Tensor, slots: torch.Tensor,
                 q_rows: torch.Tensor | None = None):
        """`qkv`, writing k, v into the cache layer ck, cv (B, Hkv, Cap, D) at `slots` (B, T); returns q."""
        if self.fused:
            return fused.block_qkv_write(self, x, cos, sin, ck, cv, slots, q_rows)
        q, k, v = self.qkv(x, rope, cos, sin, q_rows)
        fused.scatter_kv(ck, cv, slots, k, v)
        return q

    def forward(self, x, rope: Rotary, cos, sin, valid=None, q_rows=None) -> torch.Tensor:
        """The dense layer: x (B, T, C) -> (B, T, C), bidirectional attention over every row (`valid` (B, T): keys
        to attend). q_rows (B, N): queries, residual and MLP for these rows only -> (B, N, C)."""
        q, k, v = self.qkv(x, rope, cos, sin, q_rows)
        if q_rows is not None:
            x = x.gather(1, q_rows[..., None].expand(-1, -1, x.shape[-1]))  # residual of the rows (B, N, C)
        return self.finish(x, dense_attention(q, k, v, valid))

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """attn (B, Hq, T, D) -> residual + output projection, then the SwiGLU MLP."""
        if self.fused:
            return fused.block_finish(self, x, attn)
        x = x + self.o_proj(rearrange(attn, "b h t d -> b t (h d)"))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def dense_attention(q, k, v, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional SDPA. q (B, Hq, T, D), k/v (B, Hkv, S, D), key_valid (B, S) bool or None."""
    mask = None if key_valid is None else key_valid[:, None, None, :]  # (B, 1, 1, S)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1]
    )


class DiffusionLM(nn.Module):
    """LLaDA / Dream backbone with our own parameter names (loading.py maps official keys)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope = Rotary(cfg.head_dim, cfg.rope_theta * cfg.rope_scaling, cfg.rope_fp32)

    def fuse(self, enabled: bool = True) -> DiffusionLM:
        """Run every block's elementwise work through compiled kernels and pack its q/k/v and gate/up weights
        into one GEMM each (models/fused.py)."""
        for blk in self.blocks:
            blk.fused = enabled
            if enabled:
                fused.packed(blk, "qkv"), fused.packed(blk, "qkv", "bias"), fused.packed(blk, "gu")
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        out_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Dense bidirectional forward: input_ids (B, L) -> logits (B, L, vocab), unshifted.

        With `attention_mask` (B, L) (1 = token, 0 = pad), pad keys are masked out and positions
        default to cumsum(mask) - 1, so a left-padded row equals the same prompt run alone.
        With `out_rows` (B, N), the logits of those rows only (B, N, vocab): see `hidden`.
        """
        return self.logits(self.hidden(input_ids, attention_mask, positions, out_rows))

    def hidden(self, input_ids, attention_mask=None, positions=None, out_rows=None) -> torch.Tensor:
        """The last layer's output (B, L, C), before the final norm.

        out_rows (B, N): the last layer computes queries, MLP and output for these rows only (its keys and
        values still come from every row) -> (B, N, C), equal to the full output's rows. The training loss can read
        only the answer rows (bench/train_tiny.py --loss-rows 1), which skips the other rows' last-layer work.
        """
        if positions is None:
            if attention_mask is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device)
                positions = positions.expand(input_ids.shape[0], -1)
            else:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        valid = None if attention_mask is None else attention_mask.bool()
        cos, sin = self.rope.cos_sin(positions, self.dtype)
        x = self.embed(input_ids)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.rope, cos, sin, valid, out_rows if i == last else None)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: (..., C) -> (..., vocab)."""
        return self.lm_head(self.norm(h))
