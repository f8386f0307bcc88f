"""Focus-dLLM's pieces for one focused step (SPEC.md, Modes/focus; DESIGN.md steps 1-7).

Each function is one step of the method on plain tensors of a single row:
focus set -> active windows -> sinks at the sink layer -> block scores -> kept keys.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from .sampling import factor_prefix_len, stable_topk

DEFAULTS = dict(window=3, extra_focus=0, window_past_block=False, sink_layer=None, num_sinks=16,
                block_size=64, keep_ratio=0.1, min_blocks=4, per_head=True)


def focus_size(buffered: list[float], count: int | None = None, threshold: float | None = None,
               factor: float | None = None, extra_focus: int = 0) -> int:
    """|F_t| (SPEC.md focus step 2) from the buffered confidences of the block's masked positions.

    fixed count: the schedule's count at t; threshold: max(1, #{c >= tau}); factor: the length
    of the prefix the factor rule commits on the stably sorted buffered c (at least 1).
    Then + extra_focus, capped at the number of masks.
    """
    if threshold is not None:
        size = max(1, sum(c >= threshold for c in buffered))
    elif factor is not None:
        size = max(1, factor_prefix_len(sorted(buffered, reverse=True), factor))
    else:
        size = count
    return min(size + extra_focus, len(buffered))


def focus_set(masked: list[int], buffered: list[float], size: int) -> list[int]:
    """F_t (Paper: 'confidence scores from step t-1 predict the positions unmasked at step t'):
    the stable top-`size` masked positions by buffered confidence (ties -> lower position)."""
    return sorted(masked[j] for j in stable_topk(buffered, size))


def active_rows(focus: list[int], window: int, lo: int, hi: int) -> list[int]:
    """Paper Fig. 1 window expansion: union of [f - w//2, f + w//2] over f, clipped to [lo, hi).

    [lo, hi) is the current block by default, or the row's whole canvas with window_past_block
    (SPEC.md focus step 3). Returned sorted.
    """
    half = window // 2
    rows = set()
    for f in focus:
        rows.update(range(max(lo, f - half), min(hi, f + half + 1)))
    return sorted(rows)


def sink_scores(q: torch.Tensor, k_prompt: torch.Tensor) -> torch.Tensor:
    """Paper §3 / Fig. 1 layer l: S_j = mean over query heads and rows of softmax_j(q k_j / sqrt(d)).

    q (Hq, T, D) of the active rows (not Dream's extra rows); k_prompt (Hkv, P, D) post-RoPE.
    Choice (SPEC.md step 6): the softmax runs over the prompt keys only; 'mean' over rows.
    Returns (P,).
    """
    k = k_prompt.repeat_interleave(q.shape[0] // k_prompt.shape[0], dim=0)  # (Hq, P, D)
    probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)  # (Hq, T, P)
    return probs.mean(dim=(0, 1))


def find_sinks(scores: torch.Tensor, num_sinks: int) -> list[int]:
    """Top-N_sink prompt positions by S_j (stable; fewer if the prompt is shorter)."""
    return stable_topk(scores.tolist(), num_sinks)


def block_reps(k_prompt: torch.Tensor, block_size: int) -> torch.Tensor:
    """Prompt block representative keys (our choice where the paper is silent: mean pooling).

    Blocks of `block_size` from position 0; the last block averages only the prompt positions
    it holds. k_prompt (Hkv, P, D) -> reps (Hkv, n_blocks, D). Computed at the refresh.
    """
    p = k_prompt.shape[1]
    n_blocks = math.ceil(p / block_size)
    return torch.stack([k_prompt[:, j * block_size:(j + 1) * block_size].mean(dim=1)
                        for j in range(n_blocks)], dim=1)


def block_scores(q_focus: torch.Tensor, reps: torch.Tensor, per_head: bool) -> torch.Tensor:
    """Score of each prompt block per selection head: max over focus rows and the query heads of
    the head's group of q . k_rep (no scale; SPEC.md step 7).

    q_focus (Hq, F, D); reps (Hkv, NB, D). per_head: selection head g = KV head g, whose group
    is the query heads h with h // (Hq // Hkv) == g; shared: one head, all query heads.
    Returns (Hs, NB) with Hs = Hkv or 1.
    """
    hq, hkv = q_focus.shape[0], reps.shape[0]
    dots = q_focus @ reps.repeat_interleave(hq // hkv, dim=0).transpose(1, 2)  # (Hq, F, NB)
    per_q_head = dots.max(dim=1).values  # (Hq, NB)
    if not per_head:
        return per_q_head.max(dim=0, keepdim=True).values  # (1, NB)
    return per_q_head.view(hkv, hq // hkv, -1).max(dim=1).values  # (Hkv, NB)


def n_keep_blocks(n_blocks: int, keep_ratio: float, min_blocks: int) -> int:
    """K = min(n_blocks, max(min_blocks, ceil(keep_ratio * n_blocks))).

    Choice (SPEC.md leaves float rounding open): keep_ratio is read as the decimal it was written
    as (Fraction(repr(r))), so 0.1 * 30 gives 3, not ceil(3.0000000000000004) = 4.
    """
    return min(n_blocks, max(min_blocks, math.ceil(Fraction(repr(keep_ratio)) * n_blocks)))


def kept_keys(scores: torch.Tensor, n_prompt: int, canvas_len: int, block_size: int, k_blocks: int,
              sinks: list[int]) -> torch.Tensor:
    """Keys a sparse layer attends to: kept prompt blocks ∪ sinks ∪ every response position.

    scores (Hs, NB). Kept blocks = stable top-k_blocks per selection head. Returns bool (Hs, L).
    """
    keep = torch.zeros(scores.shape[0], canvas_len, dtype=torch.bool)
    for g in range(scores.shape[0]):
        for j in stable_topk(scores[g].tolist(), k_blocks):
            keep[g, j * block_size:min((j + 1) * block_size, n_prompt)] = True
    keep[:, sinks] = True
    keep[:, n_prompt:] = True
    return keep
