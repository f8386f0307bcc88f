"""Quick GPU probe: ms per refresh and per in-block step of each mode at one context length.

    python bench/probe_step.py --model llada-8b --context 32768 [--graphs] [--backend flex]

Runs one block (block_length 32, 2 tokens per step) per mode after a warm-up block and prints the
synchronized per-forward times from `generate(timing=True)`. A development aid; the speed report is
`python -m focusdllm.bench`.
"""

from __future__ import annotations

import argparse
import json

import torch

import focusdllm
from focusdllm import FocusConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llada-8b")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--graphs", action="store_true")
    p.add_argument("--backend", default="auto")
    p.add_argument("--fuse", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    model = focusdllm.load_model(a.model, dtype=torch.bfloat16, device="cuda").fuse(a.fuse)
    ids = torch.randint(0, model.config.vocab_size - 1000, (1, a.context), device="cuda")
    modes = {
        "fastdllm-dual": dict(mode="fastdllm"),
        "focus": dict(mode="focus", focus=FocusConfig.paper(backend=a.backend)),
        "focus+reuse": dict(mode="focus", focus=FocusConfig.fast(backend=a.backend)),
    }
    res = {}
    for name, kw in modes.items():
        for graphs in ([False, True] if a.graphs else [False]):
            run = dict(gen_length=a.gen_length, block_length=32, steps=a.gen_length // 2, timing=True,
                       cuda_graphs=graphs, **kw)
            focusdllm.generate(model, ids, **run)  # warm-up (compile, capture)
            torch.cuda.reset_peak_memory_stats()
            out = focusdllm.generate(model, ids, **run)
            s = {k: v for k, v in out.stats.items() if k != "density_per_layer"}
            d = [x for x in out.stats.get("density_per_layer") or [] if x is not None]
            s["mean_density_sparse_layers"] = sum(d) / len(d) if d else None
            res[f"{name}{'+graphs' if graphs else ''}"] = s
            print(name, "graphs" if graphs else "eager", json.dumps(s), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(a),
                       "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
