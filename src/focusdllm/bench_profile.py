"""Bench profiling: torch.profiler breakdown of in-block steps (attention / linear / other / CPU)."""

from __future__ import annotations

import time

import torch

from .bench_env import _Stop, run_steps, sync
from .decode.generate import generate

# ------------------------------------------------------------------------------------------- profiling


_ATTN = ("flash", "fmha", "attention", "attn", "sdpa", "flex", "cudnn")
_LINEAR = ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "matmul", "splitk", "addmm", "aten::mm", "aten::bmm",
           "aten::linear", "sm90_", "sm80_", "ampere_", "hopper_")


def classify_kernel(name: str) -> str:
    """'attention', 'linear', 'memory' or 'other' by kernel (GPU) or op (CPU) name."""
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "memory"
    if any(s in n for s in _ATTN):
        return "attention"
    if n.startswith("triton_tem"):  # compiled templates: mm, else flex attention (the only other one here)
        return "linear" if "mm" in n else "attention"
    if any(s in n for s in _LINEAR):
        return "linear"
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def profile_breakdown(events, wall_s: float, n_steps: int, device: torch.device) -> dict:
    """Attention / linear / memory / other kernel time and CPU-side overhead (wall - GPU busy time)."""
    from torch.autograd import DeviceType

    by_cat: dict[str, float] = {"attention": 0.0, "linear": 0.0, "memory": 0.0, "other": 0.0}
    by_name: dict[str, list] = {}
    intervals = []
    if device.type == "cuda":
        for e in events:
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            dur = e.time_range.end - e.time_range.start
            if dur <= 0:
                continue
            intervals.append((e.time_range.start, e.time_range.end))
            cat = classify_kernel(e.name)
            by_cat[cat] += dur
            rec = by_name.setdefault(e.name, [0.0, 0, cat])
            rec[0] += dur
            rec[1] += 1
        busy_us = _union_us(intervals)
        unit = "GPU kernel time"
    else:  # CPU: self time of each op, classified by op name
        for e in events:
            if e.device_type != DeviceType.CPU or e.is_async:
                continue
            dur = e.self_cpu_time_total
            if dur <= 0:
                continue
            cat = classify_kernel(e.name)
            by_cat[cat] += dur
            rec = by_name.setdefault(e.name, [0.0, 0, cat])
            rec[0] += dur
            rec[1] += 1
        busy_us = None
        unit = "CPU op self time (no GPU)"
    wall_ms = wall_s * 1e3
    per = {f"{k}_ms_per_step": v / 1e3 / n_steps for k, v in by_cat.items()}
    out = {
        "unit": unit, "steps": n_steps, "wall_ms_per_step": wall_ms / n_steps, **per,
        "gpu_busy_ms_per_step": None if busy_us is None else busy_us / 1e3 / n_steps,
        "cpu_overhead_ms_per_step": None if busy_us is None else (wall_ms - busy_us / 1e3) / n_steps,
        "top_kernels": [
            {"name": k[:160], "ms_per_step": v[0] / 1e3 / n_steps, "calls_per_step": v[1] / n_steps, "category": v[2]}
            for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]
        ],
    }
    if busy_us is not None and busy_us > 0:
        out["share_of_gpu_time"] = {k: v / busy_us for k, v in by_cat.items()}
    return out


def _activities(dev: torch.device) -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])


def profile_mode(model, ids, kw: dict, args, common: dict, n_steps: int = 3) -> dict:
    """torch.profiler over in-block steps 1..n_steps of block 1 (block 0 has captured every CUDA graph a
    step needs), with timing=True so every step is bracketed by synchronizes; the profiler starts after
    the block's refresh has finished."""
    from torch.profiler import profile

    dev = ids.device
    spb = common["steps"] // (common["gen_length"] // common["block_length"])
    if spb <= n_steps:
        raise RuntimeError(f"profiling needs more than {n_steps} steps per block (got {spb})")
    run_steps(model, ids, kw, common, warm=spb + n_steps + 1, measure=0)  # warm-up, same shapes
    prof = profile(activities=_activities(dev))
    marks: dict[str, float] = {}

    def cb(step, x, info):
        if info["block"] == 0:
            return
        if info["step_in_block"] == 0:  # the refresh is done (synced by timing=True)
            prof.start()
            sync(dev)
            marks["t0"] = time.perf_counter()
        elif info["step_in_block"] == n_steps:
            sync(dev)
            marks["t1"] = time.perf_counter()
            prof.stop()
            raise _Stop

    try:
        generate(model, ids, callback=cb, timing=True, **common, **kw)
    except _Stop:
        pass
    if "t1" not in marks:
        raise RuntimeError(f"profiled run ended before {n_steps} in-block steps (steps per block too small?)")
    wall = marks["t1"] - marks["t0"]
    res = profile_breakdown(prof.events(), wall, n_steps, dev)
    res["note"] = "profiler overhead inflates CPU time; compare wall_ms_per_step with the unprofiled ms_per_step"
    return res



def profile_prefill(model, ids, kw: dict, common: dict) -> dict:
    """torch.profiler over the first refresh (the prefill: step 0 of block 0), after a warm-up one."""
    from torch.profiler import profile

    dev = ids.device
    run_steps(model, ids, kw, common, warm=1, measure=0)  # compiles the prefill's shapes
    with profile(activities=_activities(dev)) as prof:
        sync(dev)
        t0 = time.perf_counter()
        run_steps(model, ids, kw, common, warm=1, measure=0)  # stops after step 0 has finished on the device
        wall = time.perf_counter() - t0
    res = profile_breakdown(prof.events(), wall, 1, dev)
    res["note"] = "one prefill (canvas set-up and KV allocation included); profiler overhead inflates CPU time"
    return res
