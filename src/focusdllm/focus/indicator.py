"""Confidence indicator (paper step 1-2): buffered confidences -> focus set -> active windows -> rows.

Everything lives in "window coordinates": a strip of W = lead + bl + R slots starting at
`block_start - lead`, where R is the window radius when windows may pass the block edges (else 0)
and lead = R + shift (shift = 1 for Dream's extra query-only row left of a candidate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..decode.schedule import NEG, stable_rank


@dataclass
class StepRows:
    """Rows one step runs through the network, and where each candidate's logits come from.

    Attributes:
        rows: (B, T) canvas slots computed this step (ascending; padding repeats a real row).
        write: (B, T) bool: the row's K/V overwrite the cache (False: padding or query-only row).
        active: (B, T) bool: the row is in the active set A (used to average sink scores).
        focus: (B, T) bool: the row is a focus position (its query scores prompt blocks).
        cand: (B, bl) bool: block positions that may be decoded this step.
        src: (B, bl) index into T of the row whose output gives a block position's logits.
        dense: every layer attends densely (a refresh-type step), whatever the policy.
    """

    rows: torch.Tensor
    write: torch.Tensor
    active: torch.Tensor
    focus: torch.Tensor
    cand: torch.Tensor
    src: torch.Tensor
    dense: bool = False


def focus_positions(conf_buf: torch.Tensor, masked: torch.Tensor, n_focus: torch.Tensor) -> torch.Tensor:
    """F_t: the n_focus (B,) masked block positions with the highest buffered confidence (B, bl) bool."""
    score = conf_buf.masked_fill(~masked, NEG)
    n = torch.minimum(n_focus, masked.sum(-1))
    return (stable_rank(score) < n[:, None]) & masked


def grow_windows(focus: torch.Tensor, window: int) -> torch.Tensor:
    """Union of width-`window` windows centred on each True of focus (B, W) -> (B, W) bool."""
    if window == 1:
        return focus
    r = window // 2
    return F.max_pool1d(focus[:, None].float(), window, stride=1, padding=r)[:, 0] > 0


def build_rows(
    block_start: torch.Tensor,
    row_len: torch.Tensor,
    active_w: torch.Tensor,
    masked: torch.Tensor,
    focus_b: torch.Tensor,
    radius: int,
    shift: int,
    n_rows: int | None = None,
) -> StepRows:
    """Turn an active strip into padded rows + the candidate -> logit-row map.

    Args:
        block_start: (B,) canvas slot of the block's first position.
        row_len: (B,) valid canvas length (prompt + gen) per row.
        active_w: (B, W) bool active set in window coordinates (W = radius + shift + bl + any
            right margin: the window radius, or a prefix-cache suffix).
        masked: (B, bl) bool still-masked block positions.
        focus_b: (B, bl) bool focus positions (block coordinates).
        radius, shift: the strip's margins (see module docstring).
        n_rows: static row count T if known (no host sync), else computed from the data.
    """
    b, w = active_w.shape
    bl = masked.shape[1]
    lead = radius + shift
    dev = active_w.device
    pos_w = block_start[:, None] - lead + torch.arange(w, device=dev)  # (B, W) canvas slots
    inside = (pos_w >= 0) & (pos_w < row_len[:, None])
    active_w = active_w & inside
    cand = masked & active_w[:, lead:lead + bl]  # (B, bl)
    need_w = active_w.clone()
    if shift:
        src_need = torch.zeros_like(active_w)
        src_need[:, lead - 1:lead - 1 + bl] = cand  # row p-1 feeds candidate p
        need_w |= src_need & inside
    if n_rows is None:
        n_rows = int(need_w.sum(-1).max())
    # rows: the first n_rows needed slots in ascending order, padded with the first needed slot
    key = torch.where(need_w, torch.arange(w, device=dev), w + torch.arange(w, device=dev))
    order = key.argsort(-1)[:, :n_rows]  # (B, T) window coordinates
    real = torch.gather(need_w, 1, order)
    order = torch.where(real, order, order[:, :1])
    rows = torch.gather(pos_w, 1, order)
    write = torch.gather(active_w, 1, order) & real
    focus_w = torch.zeros_like(active_w)
    focus_w[:, lead:lead + bl] = focus_b
    focus = torch.gather(focus_w, 1, order) & real
    # src: index in T of window slot (lead + i - shift) for block position i
    row_of_w = torch.cumsum(need_w.long(), -1) - 1  # (B, W)
    src = row_of_w[:, lead - shift:lead - shift + bl].clamp(min=0, max=n_rows - 1)
    return StepRows(rows, write, write.clone(), focus, cand, src)


def dense_rows(
    block_start: torch.Tensor, row_len: torch.Tensor, masked: torch.Tensor, shift: int, suffix: int
) -> StepRows:
    """Rows of a block-only (dual, suffix=0) or block + suffix (prefix) step: the whole block and
    `suffix` following slots are computed and written; every masked block position is a candidate."""
    b, bl = masked.shape
    active_w = torch.ones(b, shift + bl + suffix, dtype=torch.bool, device=masked.device)
    active_w[:, :shift] = False
    return build_rows(
        block_start, row_len, active_w, masked, torch.zeros_like(masked), radius=0, shift=shift,
        n_rows=shift + bl + suffix,
    )


def response_rows(
    prompt_len: torch.Tensor, row_len: torch.Tensor, masked: torch.Tensor, block: int, shift: int, gen_length: int,
    tail: int = 0,
) -> StepRows:
    """Rows of a response-only refresh (prompt KV reuse): every generation slot, and the last `tail` prompt
    slots, are recomputed against the cached prompt K/V; the current block's masked positions are candidates."""
    b, bl = masked.shape
    before = tail + block * bl  # slots left of the block: the strip's left margin
    active_w = torch.ones(b, shift + tail + gen_length, dtype=torch.bool, device=masked.device)
    active_w[:, :shift] = False
    rows = build_rows(
        prompt_len + block * bl, row_len, active_w, masked, torch.zeros_like(masked), radius=before, shift=shift,
        n_rows=shift + tail + gen_length,
    )
    rows.dense = True
    return rows
