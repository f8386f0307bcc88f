"""Evaluations of bench/train_tiny.py's runs: exact match on generated cases (periodic, final) and on the fidelity
suite's case grid (`--suite-lengths`), all dense decoding."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from focusdllm import generate  # noqa: E402
from focusdllm.tasks import GEN_LENGTH, TASKS, evaluate, make_cases  # noqa: E402


@torch.no_grad()
def generate_eval(model, cases, max_batch_tokens) -> dict:
    """Exact match of `focusdllm.generate(mode="vanilla")`, 1 token per step, blocks of 32 (the fidelity
    suite's dense reference)."""
    ok = 0
    lp, gl = len(cases[0]["input"]), cases[0]["gen_length"]
    bs = max(1, max_batch_tokens // (lp + gl))
    for j in range(0, len(cases), bs):
        chunk = cases[j:j + bs]
        ids = torch.tensor([c["input"] for c in chunk], device=model.device)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
            seq = generate(model, ids, gen_length=gl, block_length=32, steps=gl, mode="vanilla").sequences
        for c, row in zip(chunk, seq[:, lp:].tolist()):
            ok += row[: len(c["outputs"])] == c["outputs"]
    return {"acc": ok / len(cases), "strict": float("nan"), "n": len(cases)}


def run_eval(model, lengths, n, tokens_per_step, seed, max_batch_tokens, tasks=TASKS, use_generate=False):
    """Exact match per task and total length (prompt = length - gen_length) with dense decoding."""
    out = []
    model.eval()
    for L in lengths:
        for task in tasks:
            cases = make_cases(task, n, L - GEN_LENGTH[task], seed=seed)
            t0 = time.time()
            if use_generate:
                r = generate_eval(model, cases, max_batch_tokens)
            else:
                r = evaluate(model, cases, max_batch_tokens=max_batch_tokens, tokens_per_step=tokens_per_step)
            out.append({"task": task, "length": L, "acc": r["acc"], "strict": r["strict"], "n": r["n"],
                        "secs": round(time.time() - t0, 2)})
    model.train()
    return out


def suite_eval(model, lengths, tasks, depths=5, per_depth=2, seed=1234):
    """Dense exact match per task on the fidelity suite's case grid (`focusdllm.evaluate`: `depths` needle
    depths 0..1 inclusive, `per_depth` cases each, case seeds `seed` + depth index), same decode."""
    from focusdllm.evaluate import run_cases

    out = []
    for L in lengths:
        for task in tasks:
            cases = []
            for di in range(depths):
                cases += make_cases(task, per_depth, L, seed=seed + di, depth=di / max(1, depths - 1))
            t0 = time.time()
            preds, _ = run_cases(model, cases, ["dense"], log=lambda s: None)
            hits = [g[: len(c["outputs"])] == c["outputs"] for c, g in zip(cases, preds["dense"])]
            out.append({"task": task, "length": L, "acc": sum(hits) / len(hits), "n": len(hits), "seed": seed,
                        "per_depth": per_depth, "misses_at_depth": [round(c["depth"], 2) for c, h in
                                                                    zip(cases, hits) if not h],
                        "secs": round(time.time() - t0, 2)})
    return out
