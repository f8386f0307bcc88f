"""Bench support: device helpers, step runner, provenance and the pytest-benchmark-style report."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path

import torch

from .decode.generate import generate

SCHEMA = "focusdllm.bench/1"


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
    keep = ("ms_per_refresh", "ms_per_step", "ms_per_full", "ms_first_refresh", "ms_per_capture", "captures")
    m = {k: out_stats.get(k) for k in keep}
    nfe, ref, cap = out_stats["nfe"], out_stats["refreshes"], out_stats.get("captures") or 0
    m["refresh_total_s"] = (m["ms_per_refresh"] or 0.0) * ref / 1e3 if m["ms_per_refresh"] is not None else None
    m["capture_total_s"] = (m["ms_per_capture"] or 0.0) * cap / 1e3
    n_steps = nfe - ref - cap  # steady-state in-block steps (graph replays, or eager steps without graphs)
    if out_stats.get("ms_per_full") is not None:
        m["full_total_s"] = out_stats["ms_per_full"] * out_stats["nfe"] / 1e3
    m["step_total_s"] = m["ms_per_step"] * n_steps / 1e3 if m["ms_per_step"] is not None else (0.0 if ref else None)
    m["timing_run_seconds"] = out_stats["seconds"]
    return m


# --------------------------------------------------------------------------------------- provenance


def _git(*cmd: str) -> str | None:
    try:
        r = subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def commit_info() -> dict:
    """The code's commit: $FOCUSDLLM_COMMIT when set (a copied tree's .git may be stale), else git."""
    env = os.environ.get("FOCUSDLLM_COMMIT")
    if env:
        return {"id": env, "dirty": None, "source": "env FOCUSDLLM_COMMIT"}
    cid = _git("rev-parse", "HEAD")
    if cid:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return {
            "id": cid, "dirty": bool(dirty), "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "time": _git("show", "-s", "--format=%cI", "HEAD"), "source": "git",
        }
    env = os.environ.get("GIT_COMMIT")
    return {"id": env, "dirty": None, "source": "env GIT_COMMIT" if env else "unknown"}


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



# ---------------------------------------------------------------------------------------- byte floor


def copy_bandwidth_gbs(dev: torch.device, n_bytes: int = 2 << 30, reps: int = 10) -> float | None:
    """Measured device-to-device copy bandwidth (read + write bytes / s, in GB/s); None off CUDA."""
    if dev.type != "cuda":
        return None
    src = torch.empty(n_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    gbs = 2 * n_bytes * reps / (start.elapsed_time(end) / 1e3) / 1e9
    del src, dst
    return gbs


def step_floor_ms(model, n_keys: int, density_per_layer: list | None, bw_gbs: float) -> dict:
    """Byte floor of one in-block step: every weight but the input embedding (the LM head is read) plus the
    K/V bytes the step must read (all keys in dense layers, `density` of them in sparse ones) / bandwidth."""
    cfg = model.config
    w = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed."))
    per_layer = 2 * n_keys * cfg.n_kv_heads * (cfg.d_model // cfg.n_heads) * model.dtype.itemsize
    dens = density_per_layer or [None] * cfg.n_layers
    kv = sum(per_layer * (1.0 if d is None else d) for d in dens)
    return {"floor_weight_gb": w / 1e9, "floor_kv_gb": kv / 1e9, "step_floor_ms": (w + kv) / (bw_gbs * 1e9) * 1e3}
