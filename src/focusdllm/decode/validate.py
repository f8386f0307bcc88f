"""Argument checks for `generate` (one clear error each) and the compacted canvas."""

from __future__ import annotations

import torch

from ..config import ConfigError, FocusConfig
from .forward import Canvas


def validate_args(
    model, input_ids, gen_length, block_length, steps, temperature, remasking, threshold, factor,
    attention_mask, mode, cache, focus, mask_id, pad_id,
):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a (B, L) torch.long tensor; wrap one prompt as ids[None]")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token")
    if input_ids.device != model.device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {model.device}; move one")
    if gen_length <= 0 or block_length <= 0:
        raise ValueError("gen_length and block_length must be positive")
    if gen_length % block_length:
        raise ValueError(
            f"gen_length={gen_length} is not a multiple of block_length={block_length}; "
            f"use gen_length={-(-gen_length // block_length) * block_length}"
        )
    n_blocks = gen_length // block_length
    if steps <= 0 or steps % n_blocks:
        raise ValueError(
            f"steps={steps} must be a positive multiple of the number of blocks ({n_blocks}); "
            f"e.g. steps={n_blocks * max(1, steps // n_blocks)}"
        )
    if steps > gen_length:
        raise ValueError(f"steps={steps} > gen_length={gen_length}: at most one step per token")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking={remasking!r}: use 'low_confidence' or 'random'")
    if threshold is not None and factor is not None:
        raise ValueError("give threshold or factor, not both")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be in (0, 1]")
    if factor is not None and factor <= 0:
        raise ValueError(f"factor={factor} must be > 0")
    if mode not in ("vanilla", "fastdllm", "focus"):
        raise ValueError(f"mode={mode!r}: use 'vanilla', 'fastdllm' or 'focus'")
    if mode == "fastdllm" and cache not in ("dual", "prefix"):
        raise ValueError(f"mode='fastdllm' needs cache='dual' or 'prefix', got {cache!r}")
    if mode == "focus":
        if cache != "dual":
            raise ConfigError(
                f"mode='focus' runs on the dual KV cache; got cache={cache!r}. Pass cache='dual' "
                "(or use mode='vanilla' for no cache)"
            )
        if focus is not None and not isinstance(focus, FocusConfig):
            raise ConfigError("focus must be a FocusConfig, e.g. FocusConfig.paper()")
        (focus or FocusConfig()).resolve_sink_layer(model.config.n_layers)
    elif focus is not None:
        raise ConfigError(f"focus=... is only used with mode='focus' (mode={mode!r})")
    if mask_id == pad_id:
        raise ConfigError(
            f"mask_id and pad_id are both {mask_id}: padding would be decoded as masks; "
            "pass a different pad_id (LLaDA uses eos 126081 as pad)"
        )
    vocab = model.config.vocab_size
    if not 0 <= mask_id < vocab:
        raise ConfigError(f"mask_id={mask_id} is outside the vocabulary (size {vocab})")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")


def make_canvas(input_ids, attention_mask, gen_length, mask_id, pad_id, capacity, block_size):
    """Remove left padding, append gen_length masks, size the KV capacity. Returns (Canvas, pad_left)."""
    b, n = input_ids.shape
    dev = input_ids.device
    if attention_mask is None:
        am = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        am = attention_mask.bool()
        # left padding only: once a row has a token, it has tokens to the end
        if bool((am[:, 1:].long() < am[:, :-1].long()).any()):
            raise ValueError(
                "attention_mask must be left padding (zeros then ones per row); right padding is not supported"
            )
    prompt_len = am.sum(1)
    if bool((prompt_len == 0).any()):
        raise ValueError("a row of attention_mask is all zeros: every prompt needs at least one token")
    pl = prompt_len.tolist()
    max_p = max(pl)
    length = max_p + gen_length
    need = length + 1  # + the scratch slot
    if capacity is None:
        capacity = -(-need // block_size) * block_size
    elif capacity < need or capacity % block_size:
        raise ValueError(
            f"prompt ({max_p}) + gen_length ({gen_length}) + 1 scratch slot = {need} exceeds capacity="
            f"{capacity}, or capacity is not a multiple of block_size={block_size}; use capacity >= "
            f"{-(-need // block_size) * block_size}"
        )
    x = torch.full((b, length), pad_id, dtype=torch.long, device=dev)
    pad_left = n - prompt_len
    for r in range(b):
        x[r, : pl[r]] = input_ids[r, n - pl[r]:]
        x[r, pl[r]: pl[r] + gen_length] = mask_id
    row_len = prompt_len + gen_length
    valid = torch.arange(capacity, device=dev)[None, :] < row_len[:, None]
    canvas = Canvas(
        x=x, prompt_len=prompt_len, row_len=row_len, valid=valid, gen_length=gen_length,
        padded=len(set(pl)) > 1, max_prompt=max_p, prompt_host=pl,
    )
    return canvas, pad_left
