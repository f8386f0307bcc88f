"""A naive LLaDA / Dream forward, read straight off an official-layout state dict.

Nothing here is fast: one layer at a time, batch size 1 (a 1-D token list), explicit softmax,
GQA by repeating KV heads. Two entry points:

* `full_forward(ckpt, tokens)`: the dense bidirectional forward over the whole canvas; returns
  the final hidden rows and every layer's post-RoPE K and V (what a refresh puts in the cache).
* `rows_forward(ckpt, tokens, rows, cache, write, key_rule)`: run only `rows` of the canvas
  against a per-layer K/V cache, as the cached decode steps do (SPEC.md, Modes).

Numerics (research/anchors.md §1.1/§1.2): pre-norm blocks, RMSNorm with statistics in at least
fp32 then cast back then times weight, rotate-half RoPE (LLaDA rotates q/k in at least fp32;
Dream casts cos/sin to the model dtype), SwiGLU MLP, Dream has q/k/v biases.
Choice where the official code is not fp64-clean (sampler_quirks.md §8): "at least fp32" means
float64 when the checkpoint is float64, so an fp64 run is fp64 end to end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

# Official key names (anchors.md §1.1 / §1.2); "{i}" is the layer index.
KEYS = {
    "llada": {
        "embed": "model.transformer.wte.weight",
        "final_norm": "model.transformer.ln_f.weight",
        "lm_head": "model.transformer.ff_out.weight",
        "attn_norm": "model.transformer.blocks.{i}.attn_norm.weight",
        "q": "model.transformer.blocks.{i}.q_proj.weight",
        "k": "model.transformer.blocks.{i}.k_proj.weight",
        "v": "model.transformer.blocks.{i}.v_proj.weight",
        "q_bias": "model.transformer.blocks.{i}.q_proj.bias",
        "k_bias": "model.transformer.blocks.{i}.k_proj.bias",
        "v_bias": "model.transformer.blocks.{i}.v_proj.bias",
        "o": "model.transformer.blocks.{i}.attn_out.weight",
        "mlp_norm": "model.transformer.blocks.{i}.ff_norm.weight",
        "gate": "model.transformer.blocks.{i}.ff_proj.weight",
        "up": "model.transformer.blocks.{i}.up_proj.weight",
        "down": "model.transformer.blocks.{i}.ff_out.weight",
    },
    "dream": {
        "embed": "model.embed_tokens.weight",
        "final_norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
        "attn_norm": "model.layers.{i}.input_layernorm.weight",
        "q": "model.layers.{i}.self_attn.q_proj.weight",
        "k": "model.layers.{i}.self_attn.k_proj.weight",
        "v": "model.layers.{i}.self_attn.v_proj.weight",
        "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
        "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
        "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
        "o": "model.layers.{i}.self_attn.o_proj.weight",
        "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "gate": "model.layers.{i}.mlp.gate_proj.weight",
        "up": "model.layers.{i}.mlp.up_proj.weight",
        "down": "model.layers.{i}.mlp.down_proj.weight",
    },
}


@dataclass
class Checkpoint:
    """Shapes, token ids and the official-key state dict of one model."""

    arch: str  # "llada" or "dream"
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    eps: float
    rope_theta: float  # already multiplied by the rope_scaling factor
    mask_id: int
    eos_id: int | None
    weights: dict

    @property
    def dtype(self) -> torch.dtype:
        return self.w("embed").dtype

    @property
    def shift_logits(self) -> bool:
        """Dream reads the logits of position p from output row p-1 (anchors.md §1.2)."""
        return self.arch == "dream"

    def w(self, name: str, i: int | None = None) -> torch.Tensor | None:
        """Weight `name` of layer `i` (None when the checkpoint has no such tensor, e.g. LLaDA biases)."""
        key = KEYS[self.arch][name].format(i=i)
        if name == "lm_head" and key not in self.weights:  # weight tying
            key = KEYS[self.arch]["embed"]
        return self.weights.get(key)


def _rope_factor(raw: dict) -> float:
    rs = raw.get("rope_scaling")
    if rs is None:
        return float(raw.get("scaling_factor", 1.0))
    return float(rs.get("factor", 1.0))


def checkpoint_from(raw: dict, weights: dict, dtype: torch.dtype = torch.float64) -> Checkpoint:
    """Build a Checkpoint from an official config.json dict and an official-key state dict."""
    mt = str(raw.get("model_type", "")).lower()
    weights = {k: v.to(dtype) for k, v in weights.items()}
    if mt == "llada":
        d, h = raw["d_model"], raw["n_heads"]
        return Checkpoint(
            arch="llada", n_layers=raw["n_layers"], n_heads=h, n_kv_heads=raw.get("n_kv_heads") or h,
            head_dim=d // h, vocab_size=raw.get("embedding_size") or raw["vocab_size"],
            eps=raw.get("rms_norm_eps", 1e-5), rope_theta=float(raw["rope_theta"]) * _rope_factor(raw),
            mask_id=raw.get("mask_token_id", 126336), eos_id=raw.get("eos_token_id"), weights=weights,
        )
    if mt == "dream":
        d, h = raw["hidden_size"], raw["num_attention_heads"]
        return Checkpoint(
            arch="dream", n_layers=raw["num_hidden_layers"], n_heads=h,
            n_kv_heads=raw.get("num_key_value_heads") or h, head_dim=d // h, vocab_size=raw["vocab_size"],
            eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(raw["rope_theta"]) * _rope_factor(raw),
            mask_id=raw.get("mask_token_id", 151666), eos_id=raw.get("eos_token_id"), weights=weights,
        )
    raise ValueError(f"unknown model_type {raw.get('model_type')!r}")


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float64) -> Checkpoint:
    """Read config.json + model.safetensors (or the shards named by model.safetensors.index.json)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for f in files:
        weights.update(load_file(str(folder / f)))
    return checkpoint_from(raw, weights, dtype)


# ---------------------------------------------------------------- pieces of one layer

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """'At least fp32': float64 stays float64, everything else is promoted to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: statistics in at least fp32, cast back to x's dtype, then times the weight."""
    xf = x.to(compute_dtype(x.dtype))
    xf = xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope(x: torch.Tensor, positions: list[int], theta: float, arch: str) -> torch.Tensor:
    """Rotate-half RoPE of x (H, T, D) at absolute `positions` (length T).

    LLaDA: cos/sin and the rotation in at least fp32, cast back (rope_full_precision).
    Dream (HF Llama style): cos/sin in at least fp32, cast to x's dtype, rotation in x's dtype.
    """
    ct = compute_dtype(x.dtype)
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=ct) / d)  # (D/2,)
    freqs = torch.tensor(positions, dtype=ct)[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    cos, sin = emb.cos(), emb.sin()
    xr = x.to(ct) if arch == "llada" else x
    if arch != "llada":
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = xr[..., : d // 2], xr[..., d // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xr * cos + rotated * sin).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ w.T
    return y if b is None else y + b


def layer_qkv(ckpt: Checkpoint, i: int, x: torch.Tensor, positions: list[int]):
    """Layer i's attention inputs for rows x (T, C) at `positions`.

    Returns q (Hq, T, D), k (Hkv, T, D), v (Hkv, T, D); q and k are post-RoPE.
    """
    h = rms_norm(x, ckpt.w("attn_norm", i), ckpt.eps)
    t, hd = x.shape[0], ckpt.head_dim
    q = linear(h, ckpt.w("q", i), ckpt.w("q_bias", i)).view(t, ckpt.n_heads, hd).transpose(0, 1)
    k = linear(h, ckpt.w("k", i), ckpt.w("k_bias", i)).view(t, ckpt.n_kv_heads, hd).transpose(0, 1)
    v = linear(h, ckpt.w("v", i), ckpt.w("v_bias", i)).view(t, ckpt.n_kv_heads, hd).transpose(0, 1)
    return rope(q, positions, ckpt.rope_theta, ckpt.arch), rope(k, positions, ckpt.rope_theta, ckpt.arch), v


def repeat_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GQA: (Hkv, S, D) -> (Hq, S, D); query head h reads KV head h // (Hq // Hkv)."""
    return k.repeat_interleave(n_heads // k.shape[0], dim=0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None):
    """softmax(q k^T / sqrt(D)) v, each query attending only to the keys `keep` allows.

    q (Hq, T, D); k, v (Hkv, S, D); keep None (all keys) or bool (S,) / (Hs, S) with Hs dividing
    Hq (a per-KV-head set is shared by the query heads of its group). Returns (Hq, T, D).
    """
    hq = q.shape[0]
    k, v = repeat_kv(k, hq), repeat_kv(v, hq)
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (Hq, T, S)
    if keep is not None:
        keep = keep if keep.dim() == 2 else keep[None]  # (Hs, S)
        keep = keep.repeat_interleave(hq // keep.shape[0], dim=0)  # (Hq, S)
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    scores = scores - scores.max(dim=-1, keepdim=True).values
    probs = scores.exp()
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs @ v


def layer_finish(ckpt: Checkpoint, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Residual + output projection, then the pre-norm SwiGLU MLP residual. attn (Hq, T, D)."""
    t = x.shape[0]
    x = x + linear(attn.transpose(0, 1).reshape(t, -1), ckpt.w("o", i))
    h = rms_norm(x, ckpt.w("mlp_norm", i), ckpt.eps)
    gate = linear(h, ckpt.w("gate", i))
    return x + linear(torch.nn.functional.silu(gate) * linear(h, ckpt.w("up", i)), ckpt.w("down", i))


def logits_of(ckpt: Checkpoint, hidden: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm and LM head: hidden (T, C) -> logits (T, V), unshifted."""
    return linear(rms_norm(hidden, ckpt.w("final_norm"), ckpt.eps), ckpt.w("lm_head"))


# ---------------------------------------------------------------- whole forwards

def full_forward(ckpt: Checkpoint, tokens: list[int]):
    """Dense bidirectional forward over the canvas (positions 0..L-1), no attention mask.

    Returns (hidden (L, C) after the last layer, ks, vs) with ks[i], vs[i] (Hkv, L, D) the
    post-RoPE keys and values of layer i: what a refresh writes into the KV cache.
    """
    positions = list(range(len(tokens)))
    x = ckpt.w("embed")[torch.tensor(tokens)]  # (L, C)
    ks, vs = [], []
    for i in range(ckpt.n_layers):
        q, k, v = layer_qkv(ckpt, i, x, positions)
        ks.append(k)
        vs.append(v)
        x = layer_finish(ckpt, i, x, attention(q, k, v))
    return x, ks, vs


def rows_forward(ckpt, tokens, rows, cache_k, cache_v, write, key_rule=None):
    """Run only canvas positions `rows` through the network against a per-layer K/V cache.

    At every layer: compute q/k/v of the rows; the rows with write=True overwrite their cache
    slots in place (SPEC.md: active rows' K/V overwrite the cache; Dream's extra query-only rows
    do not); then every row attends over the cache of that layer, restricted to
    `key_rule(i, q, cache_k[i])` (None or a bool keep mask as in `attention`; None = dense).

    Args:
        tokens: the whole canvas; rows: positions to compute; write: one bool per row.
        cache_k, cache_v: lists of (Hkv, L, D) tensors, modified in place.
    Returns:
        hidden (len(rows), C) after the last layer.
    """
    x = ckpt.w("embed")[torch.tensor([tokens[p] for p in rows])]  # (T, C)
    written = [p for p, wr in zip(rows, write) if wr]
    src = [j for j, wr in enumerate(write) if wr]
    for i in range(ckpt.n_layers):
        q, k, v = layer_qkv(ckpt, i, x, rows)
        cache_k[i][:, written] = k[:, src]
        cache_v[i][:, written] = v[:, src]
        keep = None if key_rule is None else key_rule(i, q, cache_k[i])
        x = layer_finish(ckpt, i, x, attention(q, cache_k[i], cache_v[i], keep))
    return x
