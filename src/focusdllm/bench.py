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
import datetime
import sys
import time
import traceback
from pathlib import Path

import torch

from .bench_env import (  # noqa: F401
    SCHEMA,
    _density,
    _entry,
    _is_oom,
    _jsonable_kwargs,
    _Stop,
    _timed_metrics,
    add_ratios,
    commit_info,
    copy_bandwidth_gbs,
    free_memory,
    gpu_slug,
    machine_info,
    peak_gib,
    random_prompt,
    reset_peak,
    run_steps,
    step_floor_ms,
    sync,
    write_report,
)
from .bench_profile import profile_mode, profile_prefill
from .config import FocusConfig
from .decode.generate import generate

# ----------------------------------------------------------------------------------------------- modes


_FOCUS = {"mode": "focus", "cache": "dual"}
MODES = {
    "vanilla": {"mode": "vanilla"},
    "fastdllm-dual": {"mode": "fastdllm", "cache": "dual"},
    "fastdllm-prefix": {"mode": "fastdllm", "cache": "prefix"},
    "focus": {**_FOCUS, "focus": FocusConfig.paper()},
    "focus+reuse": {**_FOCUS, "focus": FocusConfig.fast()},
    "focus+reuse+slim": {**_FOCUS, "focus": FocusConfig.fast(prefill_keep=0.25)},
    "focus+reuse+sparse": {**_FOCUS, "focus": FocusConfig.fast_sparse()},
    # ablation: reuse without the prompt-tail refresh (fast_sparse() before 2026-11-25)
    "focus+reuse+sparse+notail": {**_FOCUS, "focus": FocusConfig.fast_sparse(refresh_prompt_tail=0)},
    "focus+reuse+slim50+sparse": {**_FOCUS, "focus": FocusConfig.fast_sparse(prefill_keep=0.5)},
    "focus+reuse+slim+sparse": {**_FOCUS, "focus": FocusConfig.fast_sparse(prefill_keep=0.25)},
    # SlimInfer pruning and sparse prefill after layer 16 of LLaDA-8B's 32 (focus-tiny's half depth is lossless)
    "focus+reuse+slim@16+sparse": {**_FOCUS, "focus": FocusConfig.fast_sparse(prefill_keep=0.25, prefill_layer=16)},
    "focus-lossless": {**_FOCUS, "focus": FocusConfig.lossless()},
}
ALL_MODES = tuple(MODES)


def mode_kwargs(name: str) -> dict:
    """`generate` keyword arguments of a bench mode (a fresh dict)."""
    if name not in MODES:
        raise ValueError(f"unknown bench mode {name!r}; known: {ALL_MODES}")
    return dict(MODES[name])


def default_modes() -> list[str]:
    return ["vanilla", "fastdllm-dual", "fastdllm-prefix", "focus", "focus+reuse", "focus+reuse+sparse",
            "focus+reuse+slim+sparse"]


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


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m focusdllm.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llada-8b", help="preset (random weights) or checkpoint folder")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="prompt tokens")
    p.add_argument("--modes", nargs="+", default=None,
                   help=f"subset of {ALL_MODES} (default: {' '.join(default_modes())})")
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
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="eager blocks (default on CUDA: model.fuse(), compiled norm/RoPE/MLP elementwise work)")
    p.add_argument("--dynamic-shapes", action="store_true",
                   help="keep torch.compile's automatic dynamic shapes (default: static kernels per shape)")
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
    # One compiled variant per shape (context, rows per step): allow more than the default 8, and keep every
    # variant static. The library default (automatic dynamic shapes: a second shape recompiles with symbolic
    # sizes) suits serving many lengths, but its kernels are slower (e.g. block top-K falls back from a fused
    # Triton sort to a radix sort: ~0.7 ms per 32K step), and which modes ran first would change the timings.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.automatic_dynamic_shapes = args.dynamic_shapes
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)

    out_path = Path(args.out.replace("{gpu}", gpu_slug(dev)))
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    log(f"loading {args.model} ({dtype}) on {dev}")
    model = load_model(args.model, dtype=dtype, device=dev, seed=args.seed)
    cfg = model.config
    if args.fuse and dev.type == "cuda":
        model.fuse()
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    log(f"loaded: {cfg.n_layers} layers, d_model {cfg.d_model}, {weights_gib:.2f} GiB of weights")
    common = {"gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps}
    bw = copy_bandwidth_gbs(dev)
    if bw is not None:
        log(f"measured copy bandwidth {bw:.0f} GB/s (byte floor of a step = its bytes / this)")
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
            "fused_blocks": bool(args.fuse and dev.type == "cuda"),
            "cuda_graphs": bool(args.cuda_graphs and dev.type == "cuda"),
            "torch_threads": torch.get_num_threads(), "vanilla_steps": args.vanilla_steps,
            "vanilla_full_max_context": args.vanilla_full_max_context, "dynamic_shapes": args.dynamic_shapes,
            "copy_bandwidth_gbs": bw,
        },
        "command": " ".join([sys.executable, "-m", "focusdllm.bench", *(argv if argv is not None else sys.argv[1:])]),
        "benchmarks": [],
    }
    entries = report["benchmarks"]
    for ctx in args.contexts:
        torch._dynamo.reset()  # static kernels per shape: each context compiles its own, within the recompile limit
        ids = random_prompt(cfg, ctx, args.seed, dev)
        for name in modes:
            kw = mode_kwargs(name)
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
                if bw is not None and extra.get("ms_per_step"):
                    extra.update(step_floor_ms(model, ctx + args.gen_length, extra.get("density_per_layer"), bw))
                    extra["step_over_floor"] = extra["ms_per_step"] / extra["step_floor_ms"]
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
            if kw["mode"] == "vanilla":
                continue
            if graphed:
                kw, name = {**kw, "cuda_graphs": True}, name + "+graphs"
            log(f"profile ctx={ctx} {name}")
            try:
                res = profile_mode(model, ids, kw, args, common)
                if not graphed:
                    pf = res["prefill"] = profile_prefill(model, ids, kw, common)
                    log(f"profile {name} prefill: wall {pf['wall_ms_per_step']:.1f} ms, attention "
                        f"{pf['attention_ms_per_step']:.1f}, linear {pf['linear_ms_per_step']:.1f}, "
                        f"other {pf['other_ms_per_step']:.1f}")
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
        f"density {f('density_sparse_layers', '.3f')}, step floor {f('step_floor_ms', '.2f')} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
