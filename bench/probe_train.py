"""Training throughput of focus-tiny's recipe (bench/train_tiny.py) by loop variant and length.

For each model shape and length: steps timed after a warm-up, with the batch built inline (the CPU then
waits on the GPU and vice versa), built ahead by DataLoader workers, with the forward compiled too (SDPA picks the
attention backend), with flash attention forced (`flash`), and with the last layer on the loss rows only as well
(`rows`: `train_tiny --loss-rows 1`; `rows-flash` with flash), and with one compiled graph per block (`regional`,
`rows-regional`: `train_tiny --compile 2`). warmup_s: the warm-up steps' time, the first length's with the compile
(run each variant in a fresh process and fresh inductor/Triton caches to time a cold one). Sets --steps of a fixed-
step run that must fit a time budget. Each row is a few dozen steps: a compile or a cuDNN shape preparation that
falls inside one skews it (bench/README.md, probe_train_rows_h100.json); the recipe's own logs are the measure of a
whole run.

    python bench/probe_train.py --lengths 1024 8192 16384 --layers 4 6 --out probe_train.json
    python bench/probe_train.py --lengths 320 4096 16384 --mixed 24640 --variants compile rows rows-flash \
        --out probe_train_rows.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny  # noqa: E402
from train_data import StepBatches, step_batch  # noqa: E402


def run(a, variant: str, steps: int, warmup: int) -> tuple[float, float | None]:
    """tokens/s of `steps` training steps after `warmup` ones (fresh model and optimizer), and for `rows` the
    relative difference of its first loss from the full-logits loss (bf16 autocast, the same masks)."""
    dev = torch.device(a.device)
    model = train_tiny.init_random(train_tiny.DiffusionLM(train_tiny.build_config(a)).to(dev), seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    mode = 0 if variant in ("inline", "workers") else 2 if variant.endswith("regional") else 1
    fwd = train_tiny.compiled_forward(model, mode)
    sdpa = train_tiny.SDPA["flash" if variant.endswith("flash") else "default"]
    gen = torch.Generator(device=dev).manual_seed(0)
    a.steps, a.loss_rows = warmup + steps, int(variant.startswith("rows"))  # the workers build rows for `rows*`
    loader = None
    if variant != "inline":
        loader = iter(torch.utils.data.DataLoader(StepBatches(a), batch_size=None, sampler=range(a.steps),
                                                  num_workers=a.workers, pin_memory=True, prefetch_factor=4))
    tok, rel, first = 0, None, time.perf_counter()
    for i in range(a.steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0, tok = time.perf_counter(), 0
            first = t0 - first  # the warm-up steps: a compile or cuDNN shape preparation lands here
        _, ids, region, rows = next(loader) if loader else (*step_batch(a, i, 0.5), None)
        rows = None if rows is None else rows.to(dev, non_blocking=True)
        ids, region = ids.to(dev, non_blocking=True), region.to(dev, non_blocking=True)
        if rows is not None and rel is None:  # the rows loss against the full loss on the first batch, same masks
            state = gen.get_state()
            full, _ = train_tiny.diffusion_loss(fwd, ids, region, gen, t_weight=False, sdpa=sdpa)
            gen.set_state(state)
        loss, _ = train_tiny.diffusion_loss(fwd, ids, region, gen, t_weight=False, rows=rows, sdpa=sdpa)
        if rows is not None and rel is None:
            rel = abs(loss.item() - full.item()) / abs(full.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if variant == "inline":
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if torch.isfinite(gnorm):  # the old loop's per-step host sync
                opt.step()
        else:
            train_tiny.optimizer_step(model, opt)
        tok += ids.numel()
    torch.cuda.synchronize()
    return tok / (time.perf_counter() - t0), rel, first


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 16384])
    ap.add_argument("--layers", type=int, nargs="+", default=[4])
    ap.add_argument("--variants", nargs="+", default=["inline", "workers", "compile"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--mixed", type=int, default=0, help="also a row of lengths drawn from 1K to this, per step")
    ap.add_argument("--out", required=True)
    p = ap.parse_args()
    rows = []
    for layers in p.layers:
        for variant in p.variants:
            torch._dynamo.reset()  # one dynamic-shape compile serves every length
            for L in p.lengths + ([-p.mixed] if p.mixed else []):  # -M: lengths 1K..M, the top reached at once
                lo, hi = (1024, -L) if L < 0 else (L, L)
                a = train_tiny.parse_args(["--preset", "h100", "--out", "/tmp/probe", "--n-layers", str(layers),
                                           "--min-len", str(lo), "--max-len", str(hi), "--steps", "1", "--hold", "0",
                                           "--ramp", "1e-6"])
                a.workers = p.workers
                tps, rel, first = run(a, variant, p.steps, p.warmup)
                rows.append({"layers": layers, "variant": variant, "length": L, "tokens_per_s": tps,
                             "warmup_s": round(first, 2),
                             **({"loss_rel_diff": rel} if rel is not None else {})})
                print(json.dumps(rows[-1]), flush=True)
                Path(p.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                   "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
