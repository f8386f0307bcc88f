"""End-to-end decode speed per mode at one context, as pytest-benchmark tests (CUDA; skipped without it).

    pytest bench/bench_e2e.py --benchmark-json=bench/results/e2e_pytest.json

The full sweep over contexts, with ratios and a profile, is `python -m focusdllm.bench` (bench/README.md);
this wrapper measures the same thing with the same helpers. Environment knobs (defaults in brackets):
FOCUSDLLM_BENCH_MODEL [llada-8b], FOCUSDLLM_BENCH_CONTEXT [8192], FOCUSDLLM_BENCH_DEVICE [cuda],
FOCUSDLLM_BENCH_GEN / _BLOCK / _STEPS [256 / 32 / 128]. Each test warms up outside the timed region, then
times one `generate` (pytest-benchmark's pedantic mode, one round: a 32K run takes seconds). Vanilla is timed
over 3 full-forward steps and its tokens/s extrapolated to its NFE (extra_info says so).
"""

from __future__ import annotations

import os

import pytest
import torch

from focusdllm import bench as B
from focusdllm.decode.generate import generate

MODEL = os.environ.get("FOCUSDLLM_BENCH_MODEL", "llada-8b")
CONTEXT = int(os.environ.get("FOCUSDLLM_BENCH_CONTEXT", "8192"))
DEVICE = torch.device(os.environ.get("FOCUSDLLM_BENCH_DEVICE", "cuda"))
GEN = int(os.environ.get("FOCUSDLLM_BENCH_GEN", "256"))
BLOCK = int(os.environ.get("FOCUSDLLM_BENCH_BLOCK", "32"))
STEPS = int(os.environ.get("FOCUSDLLM_BENCH_STEPS", "128"))
VANILLA_STEPS = 3

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="end-to-end speed needs CUDA"
)
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


@pytest.fixture(scope="module")
def model():
    from focusdllm.models.loading import load_model

    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    m = load_model(MODEL, dtype=dtype, device=DEVICE, seed=0)
    yield m
    del m
    B.free_memory(DEVICE)


@pytest.fixture(scope="module")
def prompt(model):
    return B.random_prompt(model.config, CONTEXT, 0, DEVICE)


COMMON = {"gen_length": GEN, "block_length": BLOCK, "steps": STEPS}


@pytest.mark.parametrize("mode", B.default_modes())
def test_e2e(benchmark, model, prompt, mode):
    kw = B.mode_kwargs(mode)
    benchmark.group = f"e2e-{MODEL}-context={CONTEXT}"
    benchmark.extra_info.update(mode=mode, context=CONTEXT, gen_length=GEN, block_length=BLOCK, steps=STEPS)
    dev = prompt.device
    try:
        if mode == "vanilla":
            B.run_steps(model, prompt, kw, COMMON, warm=1, measure=0)
            res = {}

            def run():
                res.update(B.run_steps(model, prompt, kw, COMMON, warm=0, measure=VANILLA_STEPS))

            B.reset_peak(dev)
            benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
            per_step = res["s_per_step"]
            benchmark.extra_info.update(
                extrapolated=True, measured_steps=VANILLA_STEPS, s_per_step=per_step, nfe=STEPS,
                tokens_per_s=GEN / (per_step * STEPS), tokens_per_s_1tok=GEN / (per_step * GEN),
                **B.peak_gib(dev),
            )
            return
        n_blocks = GEN // BLOCK
        reuse = kw.get("focus") is not None and getattr(kw["focus"], "reuse_prompt_kv", False)
        B.run_steps(model, prompt, kw, COMMON, warm=(STEPS // n_blocks) * min(n_blocks, 2 if reuse else 1), measure=0)
        out = {}

        def run():
            out["o"] = generate(model, prompt, timing=False, **COMMON, **kw)
            B.sync(dev)

        B.reset_peak(dev)
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
        st = out.pop("o").stats
        dens, dens_all = B._density(st)
        benchmark.extra_info.update(
            extrapolated=False, nfe=st["nfe"], refreshes=st["refreshes"], seconds=st["seconds"],
            tokens_per_s=st["tokens_per_s"], mean_active_rows=st.get("mean_active_rows"),
            density_sparse_layers=dens, density_all_layers=dens_all, backend=st.get("backend"), **B.peak_gib(dev),
        )
        timed = generate(model, prompt, timing=True, **COMMON, **kw).stats
        benchmark.extra_info.update({k: timed.get(k) for k in ("ms_per_refresh", "ms_per_step", "ms_per_full")})
    except torch.OutOfMemoryError:
        B.free_memory(dev)
        benchmark.extra_info["oom"] = True
        pytest.skip(f"{mode} at {CONTEXT}: CUDA out of memory")
    finally:
        B.free_memory(dev)
