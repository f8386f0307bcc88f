"""Which part of Focus-dLLM costs accuracy on the shipped model: one change at a time (CPU is enough).

    python bench/ablate_focus.py --length 2048 --out bench/results/ablation_cpu_2k.json
    python bench/ablate_focus.py --length 8192 --tasks passkey multikey spancopy --device cuda --dtype bfloat16 \
        --out bench/results/ablation_h100_8k.json

Cases: 5 needle depths x 2 per task (the `focusdllm eval` cases; default passkey + multikey), decoded 1 token
per step. The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import focusdllm
from focusdllm import FocusConfig
from focusdllm import evaluate as E
from focusdllm.tasks import make_cases

T = dict(backend="torch")
GRID = {
    "dense": None,
    "paper": FocusConfig.paper(**T),
    "lossless (no pruning)": FocusConfig.lossless(**T),
    "keep_ratio=0.25": FocusConfig(keep_ratio=0.25, **T),
    "block_size=16": FocusConfig(block_size=16, **T),
    "num_sinks=0": FocusConfig(num_sinks=0, **T),
    "num_sinks=64": FocusConfig(num_sinks=64, **T),
    "per_head=False": FocusConfig(per_head=False, **T),
    "block_score=bound": FocusConfig(block_score="bound", **T),
    "bound, keep_ratio=0.05": FocusConfig(block_score="bound", keep_ratio=0.05, **T),
    "bound, keep_ratio=0.25": FocusConfig(block_score="bound", keep_ratio=0.25, **T),
    "bound, num_sinks=64": FocusConfig(block_score="bound", num_sinks=64, **T),
    "bound, sink_layer=2": FocusConfig(block_score="bound", sink_layer=2, **T),
    "fast (reuse + bound)": FocusConfig.fast(**T),
    "fast, keep_ratio=1 (reuse only)": FocusConfig.fast(keep_ratio=1.0, **T),
    "fast_sparse (default)": FocusConfig.fast_sparse(**T),
    "fast, prefill_keep=0.5": FocusConfig.fast(prefill_keep=0.5, **T),
    "fast, prefill_keep=0.25": FocusConfig.fast(prefill_keep=0.25, **T),
    "fast, prefill_keep=0.5, prefill_layer=2": FocusConfig.fast(prefill_keep=0.5, prefill_layer=2, **T),
    "fast, prefill_keep=0.25, prefill_layer=2": FocusConfig.fast(prefill_keep=0.25, prefill_layer=2, **T),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="focus-tiny")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tasks", nargs="+", default=["passkey", "multikey"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rows", nargs="+", default=None, help="run only these rows of the grid (names as printed)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    unknown = set(a.rows or []) - set(GRID)
    if unknown or (a.rows and "dense" not in a.rows):
        raise SystemExit(f"--rows needs 'dense' (the reference) and names from the grid; unknown: {sorted(unknown)}")
    model = focusdllm.load_model(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    # every row is another config (block size, sinks, ...), so its compiled kernels are new ones by design
    torch._dynamo.config.recompile_limit = 64
    cases = []
    for task in a.tasks:
        for di in range(5):
            cases += make_cases(task, 2, a.length, seed=a.seed + di, depth=di / 4)
    res = {"model": a.model, "length": a.length, "n": len(cases), "tasks": a.tasks, "dtype": a.dtype,
           "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "rows": {}}
    ref = None
    for name, cfg in GRID.items():
        if a.rows and name not in a.rows:
            continue
        E.MODES[name] = dict(mode="vanilla") if cfg is None else dict(mode="focus", focus=cfg)
        t0 = time.perf_counter()
        preds, _ = E.run_cases(model, cases, [name], log=lambda s: None)
        ref = preds[name] if ref is None else ref  # the first row is dense
        r = E.summarize(cases, {"dense": ref, name: preds[name]})[name]
        misses = [(c["task"], round(c["depth"], 2)) for c, h in zip(cases, r["hits"]) if not h]
        res["rows"][name] = {"acc": r["acc"], "by_task": r["by_task"], "agreement": r["agreement"], "ci95": r["ci95"],
                             "config": None if cfg is None else cfg.__dict__, "seconds": time.perf_counter() - t0,
                             "misses": misses}
        print(f"{name:<32} acc {100 * r['acc']:5.1f}%  agreement {100 * r['agreement']:5.1f}%  misses {misses}",
              flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
