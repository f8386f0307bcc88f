"""Attention sinks (paper step: sink-aware pruning), found once per step at `sink_layer`.

S_j = mean over query heads and active rows of softmax_j(q . k_j / sqrt(d)) over the row's prompt
keys; the top-`num_sinks` prompt positions are kept by every later (sparse) layer of the step:
cross-layer sink reuse.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from ..decode.schedule import NEG, stable_rank


def sink_scores(q: torch.Tensor, k_prompt: torch.Tensor, active: torch.Tensor, prompt_len: torch.Tensor):
    """Head- and query-averaged attention probability of each prompt key.

    Args:
        q: (B, Hq, T, D) post-RoPE queries at the sink layer.
        k_prompt: (B, Hkv, P, D) post-RoPE cached keys of the prompt slots [0, P).
        active: (B, T) bool rows to average over (the active set, not padding / query-only rows).
        prompt_len: (B,) valid prompt length per row (keys >= it are excluded).
    Returns:
        (B, P) float32 scores; -inf beyond the row's prompt.
    """
    b, hq, t, d = q.shape
    hkv, p = k_prompt.shape[1], k_prompt.shape[2]
    qg = rearrange(q, "b (h g) t d -> b h (g t) d", h=hkv)  # (B, Hkv, G*T, D)
    # q . k in the cache dtype (fp32 accumulation; no fp32 copy of the whole prompt's keys), softmax in fp32
    logits = torch.einsum("bhqd,bhkd->bhqk", qg, k_prompt).float() / math.sqrt(d)
    in_prompt = torch.arange(p, device=q.device)[None, :] < prompt_len[:, None]  # (B, P)
    logits = logits.masked_fill(~in_prompt[:, None, None, :], NEG)
    probs = torch.softmax(logits, -1)  # (B, Hkv, G*T, P)
    probs = rearrange(probs, "b h (g t) k -> b (h g) t k", t=t)  # (B, Hq, T, P)
    w = active.float() / active.float().sum(-1, keepdim=True).clamp(min=1)  # (B, T)
    s = torch.einsum("bhtk,bt->bk", probs, w) / hq
    return s.masked_fill(~in_prompt, NEG)


def top_sinks(scores: torch.Tensor, num_sinks: int, prompt_len: torch.Tensor) -> torch.Tensor:
    """Stable top-`num_sinks` prompt positions: (B, P) scores -> (B, P) bool."""
    n = torch.clamp(prompt_len, max=num_sinks)
    return stable_rank(scores) < n[:, None]
