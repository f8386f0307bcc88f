"""Sink-aware block selection for sparse layers (paper step: prompt KV pruning).

Prompt keys are grouped in blocks of `block_size` from slot 0; a block's representative key is the
mean of its cached keys (computed once per refresh, stored in fp32 so no step converts it again). Focus
queries score the blocks, the top-K blocks per selection head are kept, and sinks plus every response
position are always kept.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce

from ..attention.selection import KeySelection
from ..decode.schedule import NEG, stable_rank


def block_representatives(k: torch.Tensor, prompt_len: torch.Tensor, block_size: int, n_blocks: int):
    """Mean-pooled keys of each prompt block over the prompt slots it holds.

    Args:
        k: (B, Hkv, Cap, D) cached post-RoPE keys of one layer.
        prompt_len: (B,) prompt length per row.
        n_blocks: blocks covering the longest prompt (host int).
    Returns:
        (B, Hkv, n_blocks, D) float32 holding values of k's dtype (accumulated in fp32, then rounded: compiled and
        eager sums then agree, so their top-K choices do too).
    """
    span = n_blocks * block_size
    inside = (torch.arange(span, device=k.device)[None, :] < prompt_len[:, None]).float()  # (B, span)
    w = rearrange(inside, "b (n s) -> b n s", s=block_size)
    kb = rearrange(k[:, :, :span].float(), "b h (n s) d -> b h n s d", s=block_size)
    total = torch.einsum("bhnsd,bns->bhnd", kb, w)
    return (total / w.sum(-1).clamp(min=1)[:, None, :, None]).to(k.dtype).float()


def block_bounds(k: torch.Tensor, prompt_len: torch.Tensor, block_size: int, n_blocks: int):
    """Channel-wise max and min of each prompt block's keys (beyond the paper: a Quest-style bound).

    Returns (B, Hkv, n_blocks, 2 D) float32 [kmax | kmin] (exact: they are key values), one tensor so a
    step scores both halves in one GEMM; slots outside the prompt are ignored.
    """
    span = n_blocks * block_size
    inside = torch.arange(span, device=k.device)[None, :] < prompt_len[:, None]  # (B, span)
    kb = rearrange(k[:, :, :span], "b h (n s) d -> b h n s d", s=block_size)
    w = rearrange(inside, "b (n s) -> b 1 n s 1", s=block_size)
    big = torch.finfo(k.dtype).max
    kmax = kb.masked_fill(~w, -big).amax(3)
    kmin = kb.masked_fill(~w, big).amin(3)
    return torch.cat([kmax, kmin], -1).float()


def block_scores(q: torch.Tensor, focus: torch.Tensor, rep: torch.Tensor, per_head: bool) -> torch.Tensor:
    """Score = max over focus rows and the query heads of a group of q . k_rep.

    Args:
        q: (B, Hq, T, D) queries; focus: (B, T) bool focus rows; rep: (B, Hkv, NBp, D) mean keys
            (`block_representatives`), or (B, Hkv, NBp, 2 D) [kmax | kmin] channel bounds (`block_bounds`),
            scored as sum_d max(q_d kmax_d, q_d kmin_d) = [max(q, 0) | min(q, 0)] . [kmax | kmin] >= every
            q . k of the block.
    Returns:
        (B, Hs, NBp) float32, Hs = Hkv (per_head) or 1 (shared).
    """
    hkv = rep.shape[1]
    qg = rearrange(q, "b (h g) t d -> b h (g t) d", h=hkv).float()  # (B, Hkv, G*T, D)
    if rep.shape[-1] == 2 * q.shape[-1]:
        qg = torch.cat([qg.clamp(min=0), qg.clamp(max=0)], -1)  # (B, Hkv, G*T, 2D)
    s = torch.einsum("bhqd,bhnd->bhqn", qg, rep.float())  # (B, Hkv, G*T, NBp); rep is fp32 already
    g = q.shape[1] // hkv
    fmask = focus.repeat(1, g)[:, None, :, None]  # (B, 1, G*T, 1), (g t) order
    s = s.masked_fill(~fmask, NEG).amax(2)  # (B, Hkv, NBp)
    return s if per_head else reduce(s, "b h n -> b 1 n", "max")


def top_blocks(scores: torch.Tensor, n_keep: torch.Tensor, n_blocks_row: torch.Tensor, nb: int) -> torch.Tensor:
    """Stable top-K of each row's real prompt blocks: (B, Hs, NBp) scores -> (B, Hs, NB) bool block_keep."""
    b, hs, nbp = scores.shape
    real = torch.arange(nbp, device=scores.device)[None, None, :] < n_blocks_row[:, None, None]
    keep = (stable_rank(scores.masked_fill(~real, NEG)) < n_keep[:, None, None]) & real  # (B, Hs, NBp)
    return torch.cat([keep, keep.new_zeros(b, hs, nb - nbp)], -1)


def pick_blocks(q, focus, rep, per_head: bool, n_keep, n_blocks_row, nb: int) -> torch.Tensor:
    """`block_scores` then `top_blocks`: one sparse layer's kept prompt blocks (B, Hs, NB) bool."""
    return top_blocks(block_scores(q, focus, rep, per_head), n_keep, n_blocks_row, nb)


def select_keys(
    scores: torch.Tensor,
    n_keep: torch.Tensor,
    n_blocks_row: torch.Tensor,
    token_keep: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    counts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> KeySelection:
    """Top-K prompt blocks ∪ token-level keeps (sinks, response) as a `KeySelection`.

    Args:
        scores: (B, Hs, NBp) block scores; n_keep: (B,) K per row; n_blocks_row: (B,) prompt
            blocks per row; token_keep: (B, 1, Cap) bool; valid: (B, Cap) bool; counts: the step's
            per-block (valid, token-kept) counts, see `KeySelection.block_counts`.
    """
    block_keep = top_blocks(scores, n_keep, n_blocks_row, valid.shape[1] // block_size)
    return KeySelection(block_keep, token_keep.expand(-1, scores.shape[1], -1), valid, block_size, counts)
