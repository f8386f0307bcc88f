"""One training step of focus-tiny (bench/train_tiny.py): the masked-diffusion SFT loss, the optimizer step, the
compiled forward (whole model or one graph per block) and the attention backends of --sdpa."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from focusdllm import DiffusionLM  # noqa: E402
from focusdllm.models.transformer import Block  # noqa: E402

# attention backends for --sdpa (CUDA): flash runs any shape as it comes; cuDNN, SDPA's own first choice on the H100,
# prepares each new shape first
SDPA = {"default": None, "flash": (SDPBackend.FLASH_ATTENTION,)}


def compile_blocks(model: DiffusionLM) -> DiffusionLM:
    """Regional compilation: one compiled `Block.forward` serves every block (their parameters are graph inputs) and
    every batch shape (batch and length marked dynamic), so the cold compile traces one layer instead of the whole
    model; embedding, LM head and loss stay eager. In place; returns the model."""
    step = torch.compile(Block.forward, dynamic=True)

    def call(blk, x, rope, cos, sin, valid=None, q_rows=None):
        for t, dims in ((x, (0, 1)), (cos, (0, 2)), (sin, (0, 2))):  # x (B, T, C); cos, sin (B, 1, T, D)
            for d in dims:
                torch._dynamo.mark_dynamic(t, d)
        return step(blk, x, rope, cos, sin, valid, q_rows)

    for blk in model.blocks:
        blk.forward = functools.partial(call, blk)
    return model


def compiled_forward(model: DiffusionLM, mode: int):
    """--compile: 0 eager; 1 the whole model in one graph; 2 one graph per block (`compile_blocks`)."""
    if mode not in (0, 1, 2):
        raise SystemExit(f"--compile {mode}: pass 0 (eager), 1 (whole model) or 2 (per block)")
    return torch.compile(model, dynamic=True) if mode == 1 else compile_blocks(model) if mode == 2 else model


def diffusion_loss(model, ids, region, gen: torch.Generator, eps: float = 1e-3, t_weight: bool = True, rows=None,
                   sdpa=None):
    """LLaDA SFT loss: mask the region with ratio t per row; CE / t on masked tokens over the region size
    (t_weight), or the plain mean CE over masked tokens. No host sync (no boolean indexing).

    rows (B, N) (`train_data.loss_rows`): positions holding every region position (the others are never masked);
    the model's last layer runs on those rows only (`DiffusionLM.hidden(out_rows=)`): the same loss for less work.
    sdpa: the attention backends allowed on CUDA (None: SDPA's own choice)."""
    b, n = ids.shape
    dev = ids.device
    t = eps + (1 - eps) * torch.rand(b, 1, device=dev, generator=gen)
    masked = region & (torch.rand(b, n, device=dev, generator=gen) < t)
    x = torch.where(masked, model.config.mask_id, ids)
    if rows is not None:
        ids, masked = ids.gather(1, rows), masked.gather(1, rows)  # (B, N): the region's rows
    backends = sdpa_kernel(list(sdpa)) if sdpa and dev.type == "cuda" else contextlib.nullcontext()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"), backends:
        logits = model(x, out_rows=rows)
    ce = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view(b, -1)
    ce = ce * masked
    n_masked = masked.sum().clamp(min=1)
    if t_weight:
        loss = (ce / t).sum() / region.sum()
    else:
        loss = ce.sum() / n_masked
    return loss, (ce.sum() / n_masked).detach()


def optimizer_step(model, opt) -> torch.Tensor:
    """Clip the gradient norm to 1 and step; a non-finite norm skips the step (weights and Adam moments
    untouched) inside fused AdamW, via its found_inf input, so there is no host sync. Returns the norm."""
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.found_inf = (~torch.isfinite(gnorm)).float()
    opt.step()
    return gnorm
