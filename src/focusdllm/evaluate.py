"""Fidelity suite: accuracy of every decode mode on generated long-context cases, dense as reference.

`focusdllm eval --model focus-tiny --lengths 2048 4096 8192 16384 --device cuda` runs dense vanilla,
Fast-dLLM, Focus (torch and flex executors, prompt-KV reuse) and an intentionally bad sparse setting on
the same cases and writes a JSON table, exact match pooled and per task (+ a depth x length heatmap PNG with
matplotlib). `--ask-other` asks each multikey / span-copy case for another needle's key, which shows whether a
model reads the key at all.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from .config import FocusConfig

MODES = {
    "dense": dict(mode="vanilla"),
    "fastdllm": dict(mode="fastdllm", cache="dual"),
    "focus": dict(mode="focus", focus=FocusConfig.paper(backend="torch")),
    "focus-flex": dict(mode="focus", focus=FocusConfig.paper(backend="flex")),
    "focus-bound": dict(mode="focus", focus=FocusConfig.paper(block_score="bound", backend="torch")),
    "focus-fast": dict(mode="focus", focus=FocusConfig.fast(backend="torch")),
    "focus-fast-slim": dict(mode="focus", focus=FocusConfig.fast(prefill_keep=0.25, backend="torch")),
    "focus-fast-sparse": dict(mode="focus", focus=FocusConfig.fast_sparse(backend="torch")),
    # ablation: reuse without the prompt-tail refresh (the presets before 2026-11-25)
    "focus-fast-notail": dict(mode="focus", focus=FocusConfig.fast(refresh_prompt_tail=0, backend="torch")),
    "focus-fast-sparse-notail": dict(
        mode="focus", focus=FocusConfig.fast_sparse(refresh_prompt_tail=0, backend="torch")
    ),
    "focus-fast-slim50-sparse": dict(mode="focus", focus=FocusConfig.fast_sparse(prefill_keep=0.5, backend="torch")),
    "focus-fast-slim-sparse": dict(mode="focus", focus=FocusConfig.fast_sparse(prefill_keep=0.25, backend="torch")),
    # the same from half depth of focus-tiny's 4 layers (bench mode focus+reuse+slim@16+sparse on LLaDA-8B)
    "focus-fast-slim-sparse@2": dict(
        mode="focus", focus=FocusConfig.fast_sparse(prefill_keep=0.25, prefill_layer=2, backend="torch")
    ),
    # a deliberately broken sparse setting: one block kept, no sinks, pruning from layer 1 on
    "bad": dict(mode="focus", focus=FocusConfig(keep_ratio=0.01, min_blocks=1, num_sinks=0, sink_layer=0,
                                                backend="torch")),
}


def bootstrap_ci(hits: list[bool], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `hits`."""
    if not hits:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(hits)
    means = sorted(sum(hits[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def run_cases(model, cases, modes, block_length=32, tokens_per_step=1, batch_tokens=65536, log=print):
    """Decode every case in every mode. Returns {mode: [generated ids per case]} and seconds per mode."""
    from . import generate
    from .tasks.scoring import batched

    dev = model.device
    out = {m: [None] * len(cases) for m in modes}
    secs = dict.fromkeys(modes, 0.0)
    for chunk, ids, gl in batched(cases, batch_tokens, dev):
        lp = ids.shape[1]
        for m in modes:
            t0 = time.perf_counter()
            res = generate(model, ids, gen_length=gl, block_length=block_length, steps=gl // tokens_per_step,
                           **MODES[m])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            secs[m] += time.perf_counter() - t0
            for i, row in zip(chunk, res.sequences[:, lp:].tolist()):
                out[m][i] = row
        log(f"  length {lp}: {len(chunk)} cases done")
    return out, secs


def summarize(cases, preds, ref_mode="dense"):
    """Per mode: exact match (all cases and per task), bootstrap CI, token agreement with the reference mode
    (None without it)."""
    rows = {}
    ref = preds.get(ref_mode)
    for m, gens in preds.items():
        hits = [g[: len(c["outputs"])] == c["outputs"] for c, g in zip(cases, gens)]
        agree = None
        if ref is not None:
            agree = sum(sum(a == b for a, b in zip(g, r)) / len(g) for g, r in zip(gens, ref)) / len(gens)
        lo, hi = bootstrap_ci(hits)
        by_task: dict = {}
        for c, h in zip(cases, hits):
            by_task.setdefault(c["task"], []).append(h)
        rows[m] = {"acc": sum(hits) / len(hits), "ci95": [lo, hi], "agreement": agree, "n": len(hits),
                   "by_task": {t: sum(v) / len(v) for t, v in by_task.items()}, "hits": hits}
    return rows


def heatmap(result: dict, path: Path, mode: str = "focus"):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover
        raise SystemExit("the heatmap needs matplotlib: pip install focusdllm[viz]") from e
    lengths = sorted({r["length"] for r in result["cells"]})
    depths = sorted({round(r["depth"], 2) for r in result["cells"]})
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for r in result["cells"]:
        if r["mode"] == mode:
            grid[depths.index(round(r["depth"], 2))][lengths.index(r["length"])] = r["acc"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.4 * len(depths) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{result['model']}: {mode} exact match (all tasks)")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    from . import load_model
    from .tasks import ask_other_key, make_cases

    # compiled flex specialises per KV capacity and batch: one variant per (length, batch size, mode)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    p = argparse.ArgumentParser(prog="focusdllm eval", description=__doc__)
    p.add_argument("--model", default="focus-tiny")
    p.add_argument("--tasks", nargs="+", default=["passkey", "multikey", "spancopy"])
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    p.add_argument("--depths", type=int, default=5, help="evenly spaced needle depths per task and length")
    p.add_argument("--per-depth", type=int, default=2, help="cases per depth")
    p.add_argument("--modes", nargs="+", default=["dense", "fastdllm", "focus", "focus-fast", "bad"],
                   choices=sorted(MODES))
    p.add_argument("--tokens-per-step", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    p.add_argument("--heatmap", default=None, help="PNG path for the depth x length heatmap")
    p.add_argument("--ask-other", action="store_true",
                   help="query another needle's key in every case (tasks.ask_other_key): is the key what is read?")
    a = p.parse_args(argv)
    if a.ask_other and "passkey" in a.tasks:
        p.error("--ask-other needs cases with several needles: pass --tasks multikey spancopy")
    model = load_model(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    result = {"model": a.model, "device": str(a.device), "dtype": a.dtype, "torch": torch.__version__,
              "argv": sys.argv if argv is None else argv, "ask_other": a.ask_other, "cells": [], "summary": {}}
    if a.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    for length in a.lengths:
        cases = []
        for task in a.tasks:
            for di in range(a.depths):
                depth = di / max(1, a.depths - 1)
                cases += make_cases(task, a.per_depth, length, seed=a.seed + di, depth=depth)
        if a.ask_other:
            cases = [ask_other_key(c) for c in cases]
        print(f"length {length}: {len(cases)} cases", flush=True)
        preds, secs = run_cases(model, cases, a.modes, tokens_per_step=a.tokens_per_step,
                                log=lambda s: print(s, flush=True))
        rows = summarize(cases, preds)
        result["summary"][str(length)] = {m: {k: v for k, v in r.items() if k != "hits"} | {"seconds": secs[m]}
                                          for m, r in rows.items()}
        for m, r in rows.items():
            for c, hit in zip(cases, r["hits"]):
                result["cells"].append({"mode": m, "length": length, "task": c["task"], "depth": c["depth"],
                                        "acc": float(hit)})
            agree = "   —  " if r["agreement"] is None else f"{100 * r['agreement']:5.1f}%"
            tasks = " | ".join(f"{t} {100 * v:.0f}%" for t, v in r["by_task"].items())
            print(f"  {m:<11} acc {100 * r['acc']:5.1f}% [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"
                  f"  agreement {agree}  {secs[m]:.1f}s  ({tasks})", flush=True)
    # aggregate depth cells to mean accuracy per (mode, length, depth) for the heatmap; depths off the grid
    # (--ask-other: where the asked needle sits) go to the nearest grid depth
    agg: dict = {}
    grid = max(1, a.depths - 1)
    for c in result["cells"]:
        agg.setdefault((c["mode"], c["length"], round(round(c["depth"] * grid) / grid, 2)), []).append(c["acc"])
    result["cells"] = [{"mode": m, "length": n, "depth": d, "acc": sum(v) / len(v), "n": len(v)}
                       for (m, n, d), v in sorted(agg.items())]
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}")
    if a.heatmap:
        heatmap(result, Path(a.heatmap), mode="focus" if "focus" in a.modes else a.modes[0])
        print(f"wrote {a.heatmap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
