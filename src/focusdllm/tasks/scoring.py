"""Exact-match scoring and a plain dense decode (low-confidence remasking, LLaDA style) for the tasks."""

from __future__ import annotations

from collections import defaultdict

import torch

from .generators import target_ids


@torch.no_grad()
def dense_decode(
    model, prompts: torch.Tensor, gen_length: int, block_length: int = 32, tokens_per_step: int = 1
) -> torch.Tensor:
    """Greedy masked-diffusion decode with full (dense) attention at every step.

    Blocks of `block_length` are filled left to right; inside a block each step commits the
    `tokens_per_step` most confident masked positions (argmax tokens). prompts (B, Lp) -> (B, gen_length).
    """
    cfg = model.config
    b, lp = prompts.shape
    x = torch.full((b, lp + gen_length), cfg.mask_id, dtype=torch.long, device=prompts.device)
    x[:, :lp] = prompts
    for s in range(0, gen_length, block_length):
        lo, hi = lp + s, lp + min(s + block_length, gen_length)
        while True:
            masked = x[:, lo:hi] == cfg.mask_id
            if not masked.any():
                break
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                logits = model(x)[:, lo:hi].float()
            prob, tok = logits.softmax(-1).max(-1)
            prob = prob.masked_fill(~masked, -1.0)
            k = min(tokens_per_step, hi - lo)
            top = prob.topk(k, dim=-1).indices
            pick = torch.zeros_like(masked).scatter_(1, top, True) & masked
            x[:, lo:hi] = torch.where(pick, tok, x[:, lo:hi])
    return x[:, lp:]


def exact_match(case: dict, generated, eos_id: int | None = None) -> bool:
    """The answer tokens match; with `eos_id`, the rest of the region must be EOS as well."""
    gen = [int(t) for t in generated]
    if eos_id is not None:
        return gen == target_ids(case, eos_id)
    return gen[: len(case["outputs"])] == case["outputs"]


def evaluate(
    model, cases: list[dict], max_batch_tokens: int = 65536, block_length: int = 32, tokens_per_step: int = 1,
) -> dict:
    """Dense-decode `cases` (grouped by prompt and gen length) -> {"acc", "strict", "n", "preds"}."""
    dev = model.device
    eos = model.config.eos_id
    groups = defaultdict(list)
    for i, c in enumerate(cases):
        groups[(len(c["input"]), c["gen_length"])].append(i)
    preds: list = [None] * len(cases)
    for (lp, gl), idx in groups.items():
        bs = max(1, max_batch_tokens // (lp + gl))
        for j in range(0, len(idx), bs):
            chunk = idx[j:j + bs]
            prompts = torch.tensor([cases[i]["input"] for i in chunk], device=dev)
            out = dense_decode(model, prompts, gl, block_length, tokens_per_step).tolist()
            for i, o in zip(chunk, out):
                preds[i] = o
    ok = [exact_match(c, p) for c, p in zip(cases, preds)]
    strict = [exact_match(c, p, eos) for c, p in zip(cases, preds)]
    n = max(1, len(cases))
    return {"acc": sum(ok) / n, "strict": sum(strict) / n, "n": len(cases), "preds": preds}
