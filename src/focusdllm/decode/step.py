"""One decode step of the loop (paper Alg. 1, one iteration): rows -> network -> logits -> commit.

`DecodeState` holds everything a step reads or writes at fixed addresses (the current block's
slots, mask and buffered confidences are updated in place), so an in-block step is a pure function
of device state and the host-side step index: decode/graphs.py can capture it whole as a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import schedule as S
from .forward import Canvas, StepStats, full_forward, set_block_rep


@dataclass
class DecodeState:
    """Per-generate device state of the current block (all tensors updated in place).

    Attributes:
        block: index of the current block (host).
        block_start: (B,) canvas slot of the block's first position.
        slots: (B, bl) canvas slots of the block.
        masked: (B, bl) bool still-masked block positions.
        conf_buf: (B, bl) float64 last confidence of each position (Focus's indicator input).
        sched: tokens committed per step under the fixed-count rule (host).
    """

    canvas: Canvas
    block: int
    block_start: torch.Tensor
    slots: torch.Tensor
    masked: torch.Tensor
    conf_buf: torch.Tensor
    sched: list[int]

    @property
    def prompt_len(self) -> torch.Tensor:
        return self.canvas.prompt_len

    @property
    def row_len(self) -> torch.Tensor:
        return self.canvas.row_len

    def start_block(self, blk: int, mask_id: int):
        """Point the state at block `blk` (in place: captured steps keep reading the same tensors)."""
        bl = self.slots.shape[1]
        self.block = blk
        self.block_start.copy_(self.canvas.prompt_len + blk * bl)
        self.slots.copy_(self.block_start[:, None] + torch.arange(bl, device=self.slots.device))
        self.masked.copy_(torch.gather(self.canvas.x, 1, self.slots) == mask_id)
        self.conf_buf.zero_()


@dataclass
class StepResult:
    kind: str  # "full" (vanilla), "refresh" or "step" (in-block row step)
    transfer: torch.Tensor  # (B, bl) bool committed this step
    conf: torch.Tensor  # (B, bl) float64
    cand: torch.Tensor  # (B, bl) bool candidates
    rows: object  # StepRows or None (full forward)
    n_rows: int  # rows computed (0 for a full forward)
    captured: bool = False  # ran eagerly, then was recorded as a CUDA graph (decode/graphs.py): one-time cost


@dataclass
class StepRunner:
    """Runs step t of the current block for one policy; `forward` is row_forward or its graphed drop-in."""

    model: object
    kv: object
    policy: object
    stats: StepStats
    forward: object
    mask_id: int
    shift: int
    temperature: float
    remasking: str
    gens: list | None
    rule: tuple

    def __call__(self, st: DecodeState, t: int) -> StepResult:
        canvas, policy = st.canvas, self.policy
        rows = policy.rows(t, st)
        n_rows = 0
        if rows is None:
            h = full_forward(self.model, canvas, self.kv, policy.sparse)
            src = (st.slots - self.shift).clamp(min=0)
            hsrc = torch.gather(h, 1, src[..., None].expand(-1, -1, h.shape[-1]))  # (B, bl, C)
            cand = st.masked
            kind = "refresh" if policy.cached else "full"
        else:
            plan = None if rows.dense else policy.sparse
            h, dens = self.forward(self.model, canvas, self.kv, rows, plan)
            if rows.dense and policy.sparse is not None and policy.cfg.refresh_prompt_tail:
                for i in range(policy.sparse.sink_layer + 1, len(self.model.blocks)):  # tail keys changed
                    set_block_rep(self.kv, i, canvas, policy.sparse)
            if plan is not None:
                self.stats.density_sum += dens
            hsrc = torch.gather(h, 1, rows.src[..., None].expand(-1, -1, h.shape[-1]))
            cand = st.masked & rows.cand
            kind = "refresh" if rows.dense else "step"
            n_rows = int(rows.rows.shape[1])
        logits = self.model.logits(hsrc)  # (B, bl, V): only the current block's rows (sampling reads fp32)
        bsz = st.masked.shape[0]
        needs_gen = self.gens is not None
        # threshold / factor: a row whose block is done draws no noise (batch invariance); fixed count
        # keeps every row in step, so no host sync is needed there
        draw = cand.any(-1).tolist() if needs_gen and self.rule[0] != "fixed" and bsz > 1 else None
        x0, conf = S.sample_tokens(logits, self.mask_id, self.temperature, self.remasking, self.gens, draw)
        if self.rule[0] == "fixed":
            k = torch.full((bsz,), st.sched[t], device=conf.device)
            transfer = S.transfer_fixed(conf, cand, k)
        elif self.rule[0] == "threshold":
            transfer = S.transfer_threshold(conf, cand, self.rule[1])
        else:
            transfer = S.transfer_factor(conf, cand, self.rule[1])
        cur = torch.gather(canvas.x, 1, st.slots)
        canvas.x.scatter_(1, st.slots, torch.where(transfer, x0, cur))
        st.masked &= ~transfer
        st.conf_buf.copy_(torch.where(cand, conf, st.conf_buf))
        return StepResult(kind, transfer, conf, cand, rows, n_rows)

    def graph_key(self, st: DecodeState, t: int) -> tuple | None:
        """Host values an in-block step depends on (None: not capturable whole, e.g. a refresh)."""
        if t == 0 or self.rule[0] != "fixed" or self.gens is not None:
            return None
        return (st.sched[t], *self.policy.step_key(t, st))
