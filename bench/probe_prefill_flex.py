"""GPU probe: the sparse prefill's flex attention at one context, against cuDNN dense SDPA.

    python bench/probe_prefill_flex.py --context 32768 --out probe_prefill_flex.json

One layer of LLaDA-8B heads (32 x 128, bf16), every canvas row a query. Times (CUDA events, median of
--reps after a warm-up): dense SDPA; flex with the prefill's selection (top `--sparse` key blocks per
128-row query block, the +-1 band, 16 sinks, 256 response keys) under several kernel tilings; the same
without sinks (the sinks' partial blocks); flex over every block (flex's own efficiency). A development
aid for `FocusConfig.prefill_sparse`; the speed report is `python -m focusdllm.bench`.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from focusdllm.attention.flex import kernel_options, run_flex
from focusdllm.focus.sparse_prefill import prefill_block_mask, query_block_keep


def _time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--sparse", type=float, default=0.1)
    p.add_argument("--sinks", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch._dynamo.config.recompile_limit = 64  # one compiled flex per tiling and mask
    dev, bs, h, d = torch.device("cuda"), 64, 32, 128
    n = a.context + a.gen
    cap = -(-(n + 1) // bs) * bs
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, h, n, d, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, h, cap, d, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, h, cap, d, device=dev, dtype=torch.bfloat16, generator=g)
    plen = torch.tensor([a.context], device=dev)
    slot = torch.arange(cap, device=dev)[None]
    valid = slot < n
    response = (slot >= a.context) & valid
    nbh = -(-a.context // bs)
    n_keep = torch.tensor([max(1, round(a.sparse * nbh))], device=dev)
    rows = torch.arange(n, device=dev)[None]
    bk = query_block_keep(q, k, rows, plen, n_keep, 1, bs, nbh, cap)
    sinks = torch.zeros_like(response)
    sinks[0, torch.randperm(a.context, generator=g, device=dev)[: a.sinks]] = True
    res = {"context": a.context, "sparse": a.sparse, "kept_block_fraction": bk.float().mean().item(),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["dense_sdpa_ms"] = _time(lambda: F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n]), a.reps)
    tilings = {"default": {}, "m128_n64_w8_s3": dict(BLOCK_M=128, num_warps=8, num_stages=3),
               "m128_n64_w4_s3": dict(BLOCK_M=128, num_warps=4, num_stages=3),
               "m64_n64_w4_s3": dict(BLOCK_M=64, num_warps=4, num_stages=3)}
    base = kernel_options(dev, bs, n) or {}
    for label, tk, bkeep in (("sinks", response | sinks, bk), ("no_sinks", response, bk),
                             ("all_blocks", response, torch.ones_like(bk))):
        mask = prefill_block_mask(bkeep, tk, valid, bs, n)
        for name, extra in tilings.items():
            opts = {**base, **extra}
            try:
                ms = _time(lambda m=mask, o=opts: run_flex(q, k, v, m, kernel_options=o), a.reps)
            except Exception as e:  # noqa: BLE001 -- a tiling the compiler rejects is a result too
                ms = f"error: {type(e).__name__}: {str(e)[:200]}"
            res[f"flex_{label}_{name}_ms"] = ms
            print(label, name, ms, flush=True)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
