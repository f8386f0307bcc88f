"""Plots and a Markdown table from `python -m focusdllm.bench` JSON.

    python bench/plot.py bench/results/e2e_h100.json            # PNGs next to the JSON
    python bench/plot.py bench/results/e2e_h100.json --table    # Markdown table on stdout (no matplotlib needed)

PNGs: <stem>_tokens_per_s.png (tokens/s vs context per mode, log y) and <stem>_breakdown.png (total time in
refresh forwards vs in-block steps per mode at each context, from the timing=True run; vanilla omitted).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Official Fast-dLLM (NVlabs/Fast-dLLM @ 24cc59e) measured on an H100 80GB by this project's research notes
# (research/fastdllm_h100.md): LLaDA-8B shape, random bf16 weights, torch 2.11, batch 1, gen 256, block 32,
# steps 128; vanilla = 1 token per step. Not this run: a different session and torch version.
OFFICIAL_H100 = {
    4096: {"refresh_ms": 175, "step_ms": 46, "dual": 33.5, "prefix": 41.4, "vanilla": 5.7, "peak": "28.7"},
    8192: {"refresh_ms": 356, "step_ms": 70, "dual": 28.5, "prefix": 27.5, "vanilla": 2.8, "peak": "41.6"},
    16384: {"refresh_ms": 844, "step_ms": 93, "dual": 14.7, "prefix": 14.0, "vanilla": 1.2, "peak": "67.7"},
    32768: {"refresh_ms": 2050, "step_ms": 145, "dual": None, "prefix": None, "vanilla": 0.49, "peak": "74+"},
}
OFFICIAL_NOTE = (
    "† official Fast-dLLM code (NVlabs/Fast-dLLM @ 24cc59e) measured on an H100 80GB by the project's research "
    "notes (research/fastdllm_h100.md: torch 2.11, same shape and schedule, medians), not in this run; its "
    "vanilla decodes 1 token per step (NFE 256), × vanilla for † rows is against that; at 32K its cached modes "
    "run out of memory and its vanilla figure is forward-only."
)
MODE_ORDER = ["vanilla-1tok", "vanilla", "fastdllm-dual", "fastdllm-prefix", "focus", "focus-lossless", "focus+reuse",
              "focus+reuse+slim", "focus+reuse+sparse", "focus+reuse+slim+sparse"]


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def merge(reports: list[dict]) -> dict:
    """One report from several runs: a context measured by a later run replaces it whole (every ratio in a row
    stays within one run); `runs` records which run gave which contexts."""
    out = {**reports[0], "benchmarks": []}
    owner = {}  # context -> index of the run that supplies it
    for i, rep in enumerate(reports):
        for b in rep.get("benchmarks", []):
            owner[b["params"]["context"]] = i
    for i, rep in enumerate(reports):
        out["benchmarks"] += [b for b in rep.get("benchmarks", []) if owner[b["params"]["context"]] == i]
    out["runs"] = [
        {"contexts": sorted(c for c, j in owner.items() if j == i),
         "commit": str((rep.get("commit_info") or {}).get("id"))[:10],
         "gpu": (rep.get("machine_info") or {}).get("gpu")}
        for i, rep in enumerate(reports)
    ]
    return out


def _order(mode: str) -> int:
    return MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)


def rows(report: dict) -> list[dict]:
    """One flat dict per benchmark: mode, context, and every extra_info metric."""
    out = []
    for b in report.get("benchmarks", []):
        r = dict(b.get("extra_info", {}))
        r["mode"], r["context"] = b["params"]["mode"], b["params"]["context"]
        out.append(r)
    out.sort(key=lambda r: (r["context"], _order(r["mode"])))
    return out


def _ok(r: dict) -> bool:
    return not r.get("oom") and not r.get("error") and not r.get("skipped") and r.get("tokens_per_s") is not None


def _f(v, fmt: str, dash: str = "—") -> str:
    return dash if v is None else format(v, fmt)


def _x(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt) + "×"


def _ctx(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _official_dual(ctx: int, on_h100: bool) -> float | None:
    o = OFFICIAL_H100.get(ctx) if on_h100 else None
    return o["dual"] if o else None


def table(report: dict, official: bool = True) -> str:
    gpu = (report.get("machine_info") or {}).get("gpu") or "CPU"
    on_h100 = "H100" in gpu
    head = ("| context | mode | tok/s | ms / refresh | ms / step | step floor ms | NFE | peak GiB | key density "
            "| × dual | × vanilla | × vanilla 1 tok | × official dual† |")
    lines = [head, "|---:|:---|" + "---:|" * 11]
    rs = rows(report)
    ctxs = sorted({r["context"] for r in rs})
    for ctx in ctxs:
        for r in (r for r in rs if r["context"] == ctx):
            mode = r["mode"]
            if not _ok(r):
                why = "OOM" if r.get("oom") else ("skipped" if r.get("skipped") else "error")
                lines.append(f"| {_ctx(ctx)} | {mode} | {why} |" + " — |" * 10)
                continue
            star = "*" if r.get("extrapolated") else ("§" if r.get("tokens_per_s_includes_sync") else "")
            if r.get("ms_per_refresh") is None and r.get("ms_per_full") is not None:
                refresh = f"{r['ms_per_full']:.1f} (full fwd)"
            else:
                refresh = _f(r.get("ms_per_refresh"), ".1f")
                if r.get("ms_first_refresh") is not None:
                    refresh += f" (first {r['ms_first_refresh']:.0f})"
            dens = r.get("density_sparse_layers")
            dens_s = _f(dens, ".3f") if dens is not None else ("1" if r.get("density_all_layers") == 1.0 else "—")
            od = _official_dual(ctx, on_h100)
            lines.append(
                f"| {_ctx(ctx)} | {mode} | {r['tokens_per_s']:.2f}{star} | {refresh} "
                f"| {_f(r.get('ms_per_step'), '.2f')} | {_f(r.get('step_floor_ms'), '.2f')} "
                f"| {r.get('nfe')} | {_f(r.get('peak_memory_gib'), '.1f')} | {dens_s} "
                f"| {_x(r.get('speedup_vs_fastdllm_dual'), '.2f')} | {_x(r.get('speedup_vs_vanilla'), '.1f')} "
                f"| {_x(r.get('speedup_vs_vanilla_1tok'), '.0f')} "
                f"| {_x(r['tokens_per_s'] / od if od else None, '.2f')} |"
            )
        o = OFFICIAL_H100.get(ctx)
        if official and o:
            for name, key in (("dual", "dual"), ("prefix", "prefix"), ("vanilla (1 tok/step)", "vanilla")):
                tps = o[key]
                if tps is None:
                    lines.append(f"| {_ctx(ctx)} | official Fast-dLLM {name}† | OOM |" + " — |" * 10)
                    continue
                ref, step = (f"{o['refresh_ms']}", f"{o['step_ms']}") if key == "dual" else ("—", "—")
                nfe = 256 if key == "vanilla" else 128
                x_dual = _f(tps / o["dual"], ".2f") + "×" if o["dual"] else "—"
                lines.append(
                    f"| {_ctx(ctx)} | official Fast-dLLM {name}† | {tps} | {ref} | {step} | — | {nfe} | "
                    f"{o['peak'] if key == 'dual' else '—'} | 1 | {x_dual} | — | {tps / o['vanilla']:.0f}× | — |"
                )
    cfg = report.get("config", {})
    quick = any(r.get("tokens_per_s_includes_sync") for r in rs)
    notes = [
        "",
        f"This run: {gpu}, {cfg.get('model')} (random {cfg.get('dtype', '').replace('torch.', '')} weights), "
        f"gen {cfg.get('gen_length')}, block {cfg.get('block_length')}, steps {cfg.get('steps')}, batch 1, "
        f"torch {(report.get('machine_info') or {}).get('torch')}, "
        f"commit {str((report.get('commit_info') or {}).get('id'))[:10]}."
        + "".join(f" Contexts {', '.join(_ctx(c) for c in r['contexts'])}: run at commit {r['commit']}."
                  for r in report.get("runs", []) if r["contexts"]),
        "tok/s = generated tokens / wall seconds of one timed run (synchronized, warm-up excluded); "
        "* = extrapolated (vanilla: timed full-forward steps × NFE). ms / refresh and ms / step come from a separate "
        "timing run that synchronizes around every forward (vanilla: ms per full forward; first = the prefill, where "
        "recorded); with CUDA graphs, ms / step averages the replayed steps: the one step per graph key that ran "
        "eagerly and was recorded is timed apart (capture_total_s in the JSON; tok/s includes it). × dual / × vanilla: "
        f"tokens/s over fastdllm-dual's / vanilla's (same {cfg.get('steps')}-step schedule) at the same context, same "
        "run; vanilla-1tok decodes 1 token per step (NFE = gen length), × vanilla 1 tok is over it. Step floor: "
        "(weights but the input embedding + the K/V bytes the step reads) / the run's measured copy bandwidth. "
        "Key density: mean fraction of valid keys "
        "attended in Focus's sparse layers (1 = dense). Peak GiB: torch.cuda.max_memory_allocated during the timed "
        "run, weights included.",
    ]
    if quick:
        notes.append("§ --quick: tokens/s from the timing run, so it includes the per-forward synchronizes.")
    if official:
        notes.append(OFFICIAL_NOTE + ("" if on_h100 else " This run is not on an H100: × official dual is not shown."))
    return "\n".join(lines + notes)


def _plt():
    try:
        import matplotlib
    except ImportError:
        sys.exit("bench/plot.py needs matplotlib: pip install focusdllm[viz]  (or pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tokens(report: dict, out: Path, official: bool = True) -> Path:
    plt = _plt()
    rs = rows(report)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    modes = sorted({r["mode"] for r in rs}, key=_order)
    ctxs = sorted({r["context"] for r in rs})
    for mode in modes:
        pts = [(r["context"], r["tokens_per_s"]) for r in rs if r["mode"] == mode and _ok(r)]
        if not pts:
            continue
        x, y = zip(*pts)
        extrap = any(r.get("extrapolated") for r in rs if r["mode"] == mode and _ok(r))
        ax.plot(x, y, marker="o", ls="--" if extrap else "-", label=mode + (" (extrapolated)" if extrap else ""))
        for r in rs:
            if r["mode"] == mode and r.get("oom"):
                ax.annotate("OOM", (r["context"], min(y)), fontsize=7)
    gpu = (report.get("machine_info") or {}).get("gpu") or "CPU"
    if official and "H100" in gpu:
        pts = [(c, o["dual"]) for c, o in OFFICIAL_H100.items() if o["dual"] and (not ctxs or c <= max(ctxs))]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, color="grey", ls=":", marker="x", label="official Fast-dLLM dual† (research notes)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ctxs)
    ax.set_xticklabels([_ctx(c) for c in ctxs])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("tokens / s (log)")
    cfg = report.get("config", {})
    ax.set_title(f"{cfg.get('model')} on {gpu}: gen {cfg.get('gen_length')}, block {cfg.get('block_length')}, "
                 f"steps {cfg.get('steps')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def plot_breakdown(report: dict, out: Path) -> Path:
    plt = _plt()
    rs = [r for r in rows(report) if _ok(r) and not r["mode"].startswith("vanilla")]
    ctxs = sorted({r["context"] for r in rs})
    fig, axes = plt.subplots(1, max(1, len(ctxs)), figsize=(max(5.0, 3.2 * len(ctxs)), 4), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        sub = [r for r in rs if r["context"] == ctx]
        names = [r["mode"] for r in sub]
        ref = [r.get("refresh_total_s") or 0.0 for r in sub]
        step = [r.get("step_total_s") or 0.0 for r in sub]
        cap = [r.get("capture_total_s") or 0.0 for r in sub]
        xs = range(len(sub))
        ax.bar(xs, ref, label="refresh forwards", color="tab:orange")
        ax.bar(xs, step, bottom=ref, label="in-block steps", color="tab:blue")
        ax.bar(xs, cap, bottom=[a + b for a, b in zip(ref, step)], label="CUDA-graph capture steps", color="tab:gray")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"prompt {_ctx(ctx)}", fontsize=9)
        ax.set_ylabel("seconds per generation (timing run)", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    if ctxs:
        axes[0][0].legend(fontsize=7)
    fig.suptitle("Where decode time goes: refresh vs in-block steps (vanilla omitted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="output(s) of python -m focusdllm.bench; later runs replace contexts")
    p.add_argument("--table", action="store_true", help="print the Markdown table instead of plotting")
    p.add_argument("--no-official", action="store_true", help="leave out the official Fast-dLLM H100 figures")
    p.add_argument("--outdir", default=None, help="where PNGs go (default: next to the JSON)")
    args = p.parse_args(argv)
    report = merge([load(j) for j in args.json])
    if args.table:
        print(table(report, official=not args.no_official))
        return 0
    src = Path(args.json[-1])
    outdir = Path(args.outdir) if args.outdir else src.parent
    outdir.mkdir(parents=True, exist_ok=True)
    a = plot_tokens(report, outdir / f"{src.stem}_tokens_per_s.png", official=not args.no_official)
    b = plot_breakdown(report, outdir / f"{src.stem}_breakdown.png")
    print(a)
    print(b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
