"""Exact-match scoring and a plain dense decode (low-confidence remasking, LLaDA style) for the tasks."""

from __future__ import annotations

from collections import defaultdict

import torch

from .generators import target_ids


@torch.no_grad()
def dense_decode(
    model, prompts: torch.Tensor, gen_length: int, block_length: int = 32, tokens_per_step: int = 1
) -> torch.Tensor:
    """Dense reference decode: `generate(mode="vanilla")` (low-confidence remasking, blocks of
    `block_length` left to right, `tokens_per_step` per step), under bf16 autocast on CUDA.
    prompts (B, Lp) -> (B, gen_length)."""
    from ..decode.generate import generate

    steps = gen_length // tokens_per_step
    with torch.autocast(prompts.device.type, dtype=torch.bfloat16, enabled=prompts.device.type == "cuda"):
        out = generate(model, prompts, gen_length=gen_length, block_length=min(block_length, gen_length),
                       steps=steps, mode="vanilla")
    return out.sequences[:, prompts.shape[1]:]


def exact_match(case: dict, generated, eos_id: int | None = None) -> bool:
    """The answer tokens match; with `eos_id`, the rest of the region must be EOS as well."""
    gen = [int(t) for t in generated]
    if eos_id is not None:
        return gen == target_ids(case, eos_id)
    return gen[: len(case["outputs"])] == case["outputs"]


def batched(cases: list[dict], max_batch_tokens: int, device):
    """Group cases by (prompt length, gen length) and cut groups into batches of at most
    `max_batch_tokens` canvas tokens. Yields (case indices, prompts (B, Lp) on device, gen_length)."""
    groups = defaultdict(list)
    for i, c in enumerate(cases):
        groups[(len(c["input"]), c["gen_length"])].append(i)
    for (lp, gl), idx in groups.items():
        bs = max(1, max_batch_tokens // (lp + gl))
        for j in range(0, len(idx), bs):
            chunk = idx[j:j + bs]
            yield chunk, torch.tensor([cases[i]["input"] for i in chunk], device=device), gl


def evaluate(
    model, cases: list[dict], max_batch_tokens: int = 65536, block_length: int = 32, tokens_per_step: int = 1,
) -> dict:
    """Dense-decode `cases` -> {"acc", "strict", "n", "preds"}."""
    eos = model.config.eos_id
    preds: list = [None] * len(cases)
    for chunk, prompts, gl in batched(cases, max_batch_tokens, model.device):
        out = dense_decode(model, prompts, gl, block_length, tokens_per_step).tolist()
        for i, o in zip(chunk, out):
            preds[i] = o
    ok = [exact_match(c, p) for c, p in zip(cases, preds)]
    strict = [exact_match(c, p, eos) for c, p in zip(cases, preds)]
    n = max(1, len(cases))
    return {"acc": sum(ok) / n, "strict": sum(strict) / n, "n": len(cases), "preds": preds}
