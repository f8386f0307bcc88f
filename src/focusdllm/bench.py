"""End-to-end decode speed: vanilla, Fast-dLLM (dual / prefix cache) and Focus-dLLM through one harness.

    python -m focusdllm.bench --model llada-8b --contexts 4096 8192 16384 32768 \\
        --out bench/results/e2e_{gpu}.json --device cuda --profile

Random bf16 weights of the real shape (speed does not depend on weight values when the decode schedule is
fixed), batch 1, one random prompt per context (seeded), the same fixed schedule for every mode. Per
(context, mode): a warm-up (outside the timed region: compiles flex, warms kernels), one timed
`generate(timing=False)` for tokens/s, one `generate(timing=True)` for ms per refresh / in-block step.
Vanilla at long contexts is timed over a few full-forward steps and extrapolated to its NFE. Every timer is
read after a device synchronize. Output: pytest-benchmark-style JSON, rewritten after every measurement, so
a run cut short still leaves its results. What each number means: bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from .config import FocusConfig
from .decode.generate import generate

SCHEMA = "focusdllm.bench/1"


# ----------------------------------------------------------------------------------------------- modes


def _has_reuse() -> bool:
    return "reuse_prompt_kv" in {f.name for f in dataclasses.fields(FocusConfig)}


def mode_kwargs(name: str) -> dict | None:
    """`generate` keyword arguments of a bench mode; None if this library version lacks it."""
    if name == "vanilla":
        return {"mode": "vanilla"}
    if name == "fastdllm-dual":
        return {"mode": "fastdllm", "cache": "dual"}
    if name == "fastdllm-prefix":
        return {"mode": "fastdllm", "cache": "prefix"}
    if name == "focus":
        return {"mode": "focus", "cache": "dual", "focus": FocusConfig.paper()}
    if name == "focus-lossless":
        return {"mode": "focus", "cache": "dual", "focus": FocusConfig.lossless()}
    if name == "focus+reuse":
        if not _has_reuse() or not hasattr(FocusConfig, "fast"):
            return None
        return {"mode": "focus", "cache": "dual", "focus": FocusConfig.fast()}
    raise ValueError(f"unknown bench mode {name!r}; known: {ALL_MODES}")


ALL_MODES = ("vanilla", "fastdllm-dual", "fastdllm-prefix", "focus", "focus+reuse", "focus-lossless")


def default_modes() -> list[str]:
    base = ["vanilla", "fastdllm-dual", "fastdllm-prefix", "focus"]
    return base + (["focus+reuse"] if mode_kwargs("focus+reuse") is not None else [])


def _jsonable_kwargs(kw: dict) -> dict:
    out = {k: v for k, v in kw.items() if k != "focus"}
    if kw.get("focus") is not None:
        out["focus"] = dataclasses.asdict(kw["focus"])
    return out


# --------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_memory_gib": None, "peak_reserved_gib": None}
    return {
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_prompt(cfg, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """(1, length) token ids drawn below every special id (mask / eos / pad / bos), seeded per length."""
    specials = [i for i in (cfg.mask_id, cfg.eos_id, cfg.pad_id, cfg.bos_id) if i is not None]
    hi = min([cfg.vocab_size, *specials])
    g = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return torch.randint(0, hi, (1, length), generator=g).to(device)  # (1, L)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class _Stop(Exception):
    """Raised from a generate callback to end a run after a set number of steps."""


def run_steps(model, ids, kw: dict, common: dict, warm: int, measure: int) -> dict:
    """Run `warm` + `measure` steps of one generate call, then stop it; time the last `measure` steps.

    The timer starts after the `warm`-th step has finished on the device and stops after step
    warm + measure has (both read after a synchronize). Used for warm-ups (measure=0) and for vanilla,
    whose steps are all the same full forward over the canvas.
    """
    dev = ids.device
    marks: dict[int, float] = {}
    last = warm + measure

    def cb(step, x, info):
        n = step + 1  # steps finished
        if n == warm or n == last:
            sync(dev)
            marks[n] = time.perf_counter()
        if n >= last:
            raise _Stop

    if warm == 0:
        sync(dev)
        marks[0] = time.perf_counter()
    try:
        generate(model, ids, callback=cb, **common, **kw)
    except _Stop:
        pass
    sync(dev)
    seconds = marks[last] - marks[warm] if measure else 0.0
    return {"seconds": seconds, "steps": measure, "s_per_step": seconds / measure if measure else None}


def _density(stats: dict) -> tuple[float | None, float | None]:
    """(mean density over the sparse layers, mean over all layers counting dense layers as 1)."""
    per = stats.get("density_per_layer")
    if not per:
        return None, 1.0
    sparse = [d for d in per if d is not None]
    if not sparse:
        return None, 1.0
    return sum(sparse) / len(sparse), sum(1.0 if d is None else d for d in per) / len(per)


def _timed_metrics(out_stats: dict) -> dict:
    keep = ("ms_per_refresh", "ms_per_step", "ms_per_full")
    m = {k: out_stats.get(k) for k in keep}
    nfe, ref = out_stats["nfe"], out_stats["refreshes"]
    m["refresh_total_s"] = (m["ms_per_refresh"] or 0.0) * ref / 1e3 if m["ms_per_refresh"] is not None else None
    n_steps = nfe - ref
    if out_stats.get("ms_per_full") is not None:
        m["full_total_s"] = out_stats["ms_per_full"] * out_stats["nfe"] / 1e3
    m["step_total_s"] = m["ms_per_step"] * n_steps / 1e3 if m["ms_per_step"] is not None else (0.0 if ref else None)
    m["timing_run_seconds"] = out_stats["seconds"]
    return m


# ------------------------------------------------------------------------------------------- measuring


def measure_mode(model, ids, name: str, kw: dict, args, common: dict) -> dict:
    """Warm-up, timed run(s) and a timing run of one cached mode (or vanilla run to the end)."""
    dev = ids.device
    n_blocks = args.gen_length // args.block_length
    spb = args.steps // n_blocks
    reuse = kw.get("focus") is not None and getattr(kw["focus"], "reuse_prompt_kv", False)
    warm_steps = spb * min(n_blocks, 2 if reuse else 1) if kw["mode"] != "vanilla" else 1
    t0 = time.perf_counter()
    run_steps(model, ids, kw, common, warm=warm_steps, measure=0)  # same canvas, same shapes
    warm_s = time.perf_counter() - t0

    m: dict = {"warmup_steps": warm_steps, "warmup_seconds": warm_s}
    rounds = []
    out = None
    if not args.quick:
        for _ in range(args.repeats):
            reset_peak(dev)
            sync(dev)
            w0 = time.perf_counter()
            out = generate(model, ids, timing=False, **common, **kw)
            sync(dev)
            rounds.append({"seconds": out.stats["seconds"], "wall_s": time.perf_counter() - w0})
            m.update(peak_gib(dev))
        st = out.stats
        m.update(nfe=out.nfe, refreshes=st["refreshes"], mean_active_rows=st.get("mean_active_rows"))
        m["density_sparse_layers"], m["density_all_layers"] = _density(st)
        m["backend"] = st.get("backend")
        del out
    reset_peak(dev)
    sync(dev)
    w0 = time.perf_counter()
    out = generate(model, ids, timing=True, **common, **kw)
    sync(dev)
    tw = time.perf_counter() - w0
    st = out.stats
    m.update(_timed_metrics(st))
    if args.quick:
        rounds.append({"seconds": st["seconds"], "wall_s": tw})
        m.update(peak_gib(dev))
        m.update(nfe=out.nfe, refreshes=st["refreshes"], mean_active_rows=st.get("mean_active_rows"))
        m["density_sparse_layers"], m["density_all_layers"] = _density(st)
        m["backend"] = st.get("backend")
    else:
        m["timing_run_peak_memory_gib"] = peak_gib(dev)["peak_memory_gib"]
    m["density_per_layer"] = st.get("density_per_layer")
    del out
    secs = [r["seconds"] for r in rounds]
    m["seconds"] = sum(secs) / len(secs)
    m["tokens_per_s"] = args.gen_length / m["seconds"]
    m["tokens_per_s_includes_sync"] = bool(args.quick)
    m["extrapolated"] = False
    m["rounds"] = rounds
    return m


def measure_vanilla(model, ids, args, common: dict) -> tuple[dict, dict]:
    """Vanilla: every step is a full forward over the canvas (no cache), so time a few steps after a
    warm-up step and multiply the per-step time by the NFE. Returns (same schedule, 1 token per step)."""
    dev = ids.device
    kw = mode_kwargs("vanilla")
    full = args.vanilla_full_max_context and ids.shape[1] <= args.vanilla_full_max_context
    if full:
        m = measure_mode(model, ids, "vanilla", kw, args, common)
        per_step = m["seconds"] / m["nfe"]
        m["s_per_step"] = per_step
    else:
        reset_peak(dev)
        r = run_steps(model, ids, kw, common, warm=1, measure=args.vanilla_steps)
        per_step = r["s_per_step"]
        nfe = args.steps
        m = {
            "warmup_steps": 1, "measured_steps": args.vanilla_steps, "s_per_step": per_step,
            "nfe": nfe, "refreshes": 0, "seconds": per_step * nfe, "tokens_per_s": args.gen_length / (per_step * nfe),
            "ms_per_full": per_step * 1e3, "full_total_s": per_step * nfe, "refresh_total_s": None,
            "step_total_s": None, "mean_active_rows": None, "density_sparse_layers": None,
            "density_all_layers": 1.0, "extrapolated": True, "tokens_per_s_includes_sync": False,
            "rounds": [{"seconds": r["seconds"], "steps": r["steps"]}],
            "extrapolation": f"{args.vanilla_steps} full-forward steps timed after 1 warm-up step; "
            f"seconds = s_per_step x NFE ({nfe})",
        }
        m.update(peak_gib(dev))
    nfe1 = args.gen_length
    one = {
        k: m.get(k) for k in ("s_per_step", "ms_per_full", "peak_memory_gib", "peak_reserved_gib", "density_all_layers")
    }
    one.update(
        nfe=nfe1, refreshes=0, seconds=per_step * nfe1, tokens_per_s=args.gen_length / (per_step * nfe1),
        full_total_s=per_step * nfe1, ms_per_full=per_step * 1e3, extrapolated=True,
        extrapolation=f"1 token per step (paper-style): seconds = s_per_step x NFE ({nfe1}), s_per_step from "
        "the vanilla row at this context",
        tokens_per_s_includes_sync=False,
    )
    return m, one


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
            for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:20]
        ],
    }
    if busy_us is not None and busy_us > 0:
        out["share_of_gpu_time"] = {k: v / busy_us for k, v in by_cat.items()}
    return out


def profile_mode(model, ids, kw: dict, args, common: dict, n_steps: int = 3) -> dict:
    """torch.profiler over in-block steps 1..n_steps of block 0 (after its refresh), with timing=True so
    every step is bracketed by synchronizes; the profiler starts after the refresh has finished."""
    from torch.profiler import ProfilerActivity, profile

    dev = ids.device
    run_steps(model, ids, kw, common, warm=n_steps + 1, measure=0)  # warm-up, same shapes
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    prof = profile(activities=acts)
    marks: dict[str, float] = {}

    def cb(step, x, info):
        if step == 0:  # the refresh is done (synced by timing=True)
            prof.start()
            sync(dev)
            marks["t0"] = time.perf_counter()
        elif step == n_steps:
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


# --------------------------------------------------------------------------------------- provenance


def _git(*cmd: str) -> str | None:
    try:
        r = subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def commit_info() -> dict:
    cid = _git("rev-parse", "HEAD")
    if cid:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return {
            "id": cid, "dirty": bool(dirty), "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "time": _git("show", "-s", "--format=%cI", "HEAD"), "source": "git",
        }
    env = os.environ.get("FOCUSDLLM_COMMIT") or os.environ.get("GIT_COMMIT")
    return {"id": env, "dirty": None, "source": "env FOCUSDLLM_COMMIT / GIT_COMMIT" if env else "unknown"}


def gpu_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
    m = re.search(r"[a-z]+\d+[a-z]*", name)
    return m.group(0) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def machine_info(device: torch.device) -> dict:
    info = {
        "node": socket.gethostname(), "processor": platform.processor(), "machine": platform.machine(),
        "python_implementation": platform.python_implementation(), "python_version": platform.python_version(),
        "system": platform.system(), "release": platform.release(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional on CPU
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device), gpu_capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=p.total_memory / 2**30, gpu_count=torch.cuda.device_count(),
        )
        try:
            r = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            )
            info["driver"] = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["gpu"] = None
    return info


# -------------------------------------------------------------------------------------------- report


def _stats_block(rounds: list[float]) -> dict:
    if not rounds:
        return {"min": None, "max": None, "mean": None, "median": None, "stddev": None, "rounds": 0,
                "iterations": 1, "ops": None}
    n = len(rounds)
    mean = sum(rounds) / n
    srt = sorted(rounds)
    med = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
    sd = (sum((r - mean) ** 2 for r in rounds) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"min": srt[0], "max": srt[-1], "mean": mean, "median": med, "stddev": sd, "rounds": n,
            "iterations": 1, "total": sum(rounds), "ops": 1.0 / mean if mean else None}


def _entry(name: str, ctx: int, args, kw: dict | None, extra: dict) -> dict:
    rounds = [r["seconds"] for r in extra.get("rounds", [])] if not extra.get("extrapolated") else []
    if extra.get("extrapolated") and extra.get("seconds") is not None:
        rounds = [extra["seconds"]]
    params = {
        "mode": name, "context": ctx, "gen_length": args.gen_length, "block_length": args.block_length,
        "steps": extra.get("nfe_schedule", args.steps), "batch": 1,
    }
    if kw is not None:
        params["generate_kwargs"] = _jsonable_kwargs(kw)
    return {
        "group": f"context={ctx}", "name": f"{name}[{ctx}]", "fullname": f"focusdllm.bench::{name}[{ctx}]",
        "params": params, "param": f"{name}-{ctx}", "stats": _stats_block(rounds), "extra_info": extra,
        "options": {"timer": "time.perf_counter after device synchronize", "warmup": "outside the timed region"},
    }


def add_ratios(entries: list[dict]) -> None:
    """Per context: tokens/s of each mode over fastdllm-dual's and vanilla's (same schedule) of this run."""
    by_ctx: dict[int, dict[str, dict]] = {}
    for e in entries:
        by_ctx.setdefault(e["params"]["context"], {})[e["params"]["mode"]] = e
    for modes in by_ctx.values():
        ref = {k: (modes[k]["extra_info"].get("tokens_per_s") if k in modes else None)
               for k in ("fastdllm-dual", "vanilla", "vanilla-1tok")}
        for e in modes.values():
            tps = e["extra_info"].get("tokens_per_s")
            for k, key in (("fastdllm-dual", "speedup_vs_fastdllm_dual"), ("vanilla", "speedup_vs_vanilla"),
                           ("vanilla-1tok", "speedup_vs_vanilla_1tok")):
                e["extra_info"][key] = tps / ref[k] if tps and ref[k] else None


def write_report(path: Path, report: dict) -> None:
    add_ratios(report["benchmarks"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m focusdllm.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llada-8b", help="preset (random weights) or checkpoint folder")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="prompt tokens")
    p.add_argument("--modes", nargs="+", default=None,
                   help=f"subset of {ALL_MODES} (default: all but focus-lossless; focus+reuse if available)")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --device cpu, where runs are smoke tests and extra "
                   "threads stall on shared machines; untouched on CUDA); 0 = torch's default")
    p.add_argument("--out", default="bench/results/e2e_{gpu}.json", help="{gpu} becomes e.g. h100 / cpu")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per (context, mode)")
    p.add_argument("--quick", action="store_true",
                   help="one run per (context, mode) with timing=True for everything (tokens/s then includes "
                   "the per-forward synchronizes)")
    p.add_argument("--vanilla-steps", type=int, default=3, help="timed full-forward steps of extrapolated vanilla")
    p.add_argument("--vanilla-full-max-context", type=int, default=0,
                   help="run vanilla to the end up to this context, extrapolate above (default 0: always extrapolate)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over 3 in-block steps at the largest context (see --profile-modes)")
    p.add_argument("--profile-modes", nargs="+", default=["fastdllm-dual", "focus"])
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run in-block steps eagerly (default on CUDA: CUDA-graph replay of cached-mode steps)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="skip (context, mode) pairs that would start after this many seconds")
    return p


def main(argv=None) -> int:
    if argv and argv[0] == "--":  # `focusdllm bench -- --model ...` (the CLI passes its remainder through)
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    from .models.loading import load_model

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available; pass --device cpu", file=sys.stderr)
        return 2
    dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    if args.threads is None and dev.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = args.modes or default_modes()
    for m in modes:
        mode_kwargs(m)  # raises on unknown names
    # One compiled flex variant per KV capacity (context): allow more than the default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)

    out_path = Path(args.out.replace("{gpu}", gpu_slug(dev)))
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    log(f"loading {args.model} ({dtype}) on {dev}")
    model = load_model(args.model, dtype=dtype, device=dev, seed=args.seed)
    cfg = model.config
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    log(f"loaded: {cfg.n_layers} layers, d_model {cfg.d_model}, {weights_gib:.2f} GiB of weights")
    common = {"gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps}
    report = {
        "schema": SCHEMA,
        "machine_info": machine_info(dev),
        "commit_info": commit_info(),
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": SCHEMA,
        "config": {
            "model": args.model, "model_config": cfg.to_dict(), "dtype": str(dtype), "weights_gib": weights_gib,
            "contexts": args.contexts, "modes": modes, "gen_length": args.gen_length,
            "block_length": args.block_length, "steps": args.steps, "batch": 1, "seed": args.seed,
            "repeats": args.repeats, "quick": args.quick,
            "torch_threads": torch.get_num_threads(), "vanilla_steps": args.vanilla_steps,
            "vanilla_full_max_context": args.vanilla_full_max_context,
            "unavailable_modes": [m for m in modes if mode_kwargs(m) is None],
        },
        "command": " ".join([sys.executable, "-m", "focusdllm.bench", *(argv if argv is not None else sys.argv[1:])]),
        "benchmarks": [],
    }
    entries = report["benchmarks"]
    for ctx in args.contexts:
        ids = random_prompt(cfg, ctx, args.seed, dev)
        for name in modes:
            kw = mode_kwargs(name)
            if kw is None:
                log(f"ctx={ctx} {name}: skipped (this FocusConfig has no reuse_prompt_kv)")
                continue
            if args.cuda_graphs and dev.type == "cuda" and kw["mode"] != "vanilla":
                kw = {**kw, "cuda_graphs": True}
            if args.max_seconds is not None and time.perf_counter() - t_start > args.max_seconds:
                log(f"ctx={ctx} {name}: skipped (--max-seconds {args.max_seconds} reached)")
                entries.append(_entry(name, ctx, args, kw, {"skipped": "max-seconds"}))
                write_report(out_path, report)
                continue
            log(f"ctx={ctx} {name}: running")
            err = None
            extra_1tok = None
            try:
                if name == "vanilla":
                    extra, extra_1tok = measure_vanilla(model, ids, args, common)
                else:
                    extra = measure_mode(model, ids, name, kw, args, common)
            except Exception as e:  # noqa: BLE001 - record and go on: one batched run must finish
                err = (e, traceback.format_exc())
            if err is not None:
                e, tb = err
                oom = _is_oom(e)
                extra = {"oom": oom, "error": None if oom else f"{type(e).__name__}: {e}"[:2000]}
                if not oom:
                    extra["traceback"] = tb[-4000:]
                    print(tb, file=sys.stderr, flush=True)
                log(f"ctx={ctx} {name}: {'OUT OF MEMORY' if oom else 'ERROR ' + extra['error'][:300]}")
                del e, err
            else:
                extra["oom"] = False
                log(f"ctx={ctx} {name}: " + _summary(extra))
            free_memory(dev)
            entries.append(_entry(name, ctx, args, kw, extra))
            if extra_1tok is not None:
                extra_1tok["oom"] = False
                extra_1tok["nfe_schedule"] = args.gen_length
                entries.append(_entry("vanilla-1tok", ctx, args, kw, extra_1tok))
                log(f"ctx={ctx} vanilla-1tok: " + _summary(extra_1tok))
            write_report(out_path, report)
        del ids
        free_memory(dev)

    if args.profile and args.max_seconds is not None and time.perf_counter() - t_start > args.max_seconds:
        log(f"profile: skipped (--max-seconds {args.max_seconds} reached)")
        report["profile"] = {"skipped": "max-seconds"}
    elif args.profile:
        ctx = max(args.contexts)
        ids = random_prompt(cfg, ctx, args.seed, dev)
        report["profile"] = {"context": ctx, "modes": {}}
        variants = [(n, False) for n in args.profile_modes]
        if args.cuda_graphs and dev.type == "cuda":  # before (eager launches) and after (graph replay)
            variants += [(n, True) for n in args.profile_modes]
        for name, graphed in variants:
            kw = mode_kwargs(name)
            if kw is None or kw["mode"] == "vanilla":
                continue
            if graphed:
                kw, name = {**kw, "cuda_graphs": True}, name + "+graphs"
            log(f"profile ctx={ctx} {name}")
            try:
                res = profile_mode(model, ids, kw, args, common)
                log(f"profile {name}: wall {res['wall_ms_per_step']:.2f} ms/step, attention "
                    f"{res['attention_ms_per_step']:.2f}, linear {res['linear_ms_per_step']:.2f}, other "
                    f"{res['other_ms_per_step']:.2f}, cpu overhead {res['cpu_overhead_ms_per_step']}")
            except Exception as e:  # noqa: BLE001
                res = {"oom": _is_oom(e), "error": f"{type(e).__name__}: {e}"[:2000],
                       "traceback": traceback.format_exc()[-4000:]}
                log(f"profile {name}: ERROR {res['error'][:300]}")
            report["profile"]["modes"][name] = res
            free_memory(dev)
            write_report(out_path, report)
    report["total_seconds"] = time.perf_counter() - t_start
    write_report(out_path, report)
    log(f"wrote {out_path}")
    return 0


def _summary(x: dict) -> str:
    def f(k, fmt):
        v = x.get(k)
        return "-" if v is None else format(v, fmt)

    return (
        f"{f('tokens_per_s', '.2f')} tok/s{' (extrapolated)' if x.get('extrapolated') else ''}, "
        f"NFE {x.get('nfe')}, refresh {f('ms_per_refresh', '.1f')} ms, step {f('ms_per_step', '.2f')} ms, "
        f"full {f('ms_per_full', '.1f')} ms, peak {f('peak_memory_gib', '.2f')} GiB, "
        f"density {f('density_sparse_layers', '.3f')}"
    )


if __name__ == "__main__":
    sys.exit(main())
