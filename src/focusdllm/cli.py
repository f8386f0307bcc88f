"""`focusdllm` command line: demo (the shipped model, offline, CPU), eval, bench."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .config import FocusConfig


def _demo(args) -> int:
    from . import generate, load_model
    from .tasks import make_cases, render

    torch.manual_seed(0)
    model = load_model(args.model, dtype=torch.float32, device=args.device)
    case = make_cases("passkey", 1, args.length, seed=args.seed, depth=args.depth)[0]
    ids = torch.tensor([case["input"]], device=args.device)
    g = case["gen_length"]
    print(f"model {args.model}: {model.config.n_layers} layers, d={model.config.d_model}; "
          f"passkey case: {args.length} prompt tokens, needle at depth {case['depth']:.2f}")
    print("prompt (rendered, truncated):", render(case, max_tokens=24))
    runs = [
        ("dense (vanilla)", dict(mode="vanilla")),
        ("fastdllm dual", dict(mode="fastdllm", cache="dual")),
        # gather + SDPA executor: on a CPU a one-off demo would spend its time compiling flex
        ("focus (paper)", dict(mode="focus", focus=FocusConfig.paper(block_size=args.focus_block, backend="torch"))),
        ("focus fast()", dict(mode="focus", focus=FocusConfig.fast(block_size=args.focus_block, backend="torch"))),
    ]
    rows, ref = [], None
    for name, kw in runs:
        t0 = time.perf_counter()
        out = generate(model, ids, gen_length=g, block_length=args.block_length, steps=g // 2,
                       progress=True, **kw)
        dt = time.perf_counter() - t0
        gen = out.sequences[0, len(case["input"]):].tolist()
        ans = gen[: len(case["outputs"])]
        ref = gen if ref is None else ref
        agree = sum(a == b for a, b in zip(gen, ref)) / len(gen)
        rows.append((name, ans == case["outputs"], agree, out.nfe, dt, out.stats.get("density_per_layer")))
    print(f"\nexpected answer: {case['outputs']}")
    print(f"{'mode':<18}{'correct':>8}{'agree w/ dense':>16}{'nfe':>6}{'seconds':>9}{'tok/s':>8}  kept keys")
    for name, ok, agree, nfe, dt, dens in rows:
        d = [x for x in (dens or []) if x is not None]
        kept = f"{100 * sum(d) / len(d):.0f}% (sparse layers)" if d else "100%"
        print(f"{name:<18}{str(ok):>8}{100 * agree:>15.1f}%{nfe:>6}{dt:>9.2f}{g / dt:>8.1f}  {kept}")
    return 0 if rows[0][1] or not args.strict else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="focusdllm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the shipped model on a passkey case in every mode (CPU, offline)")
    d.add_argument("--model", default="focus-tiny")
    d.add_argument("--length", type=int, default=3000, help="prompt tokens")
    d.add_argument("--depth", type=float, default=0.35, help="needle depth in [0, 1]")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--block-length", type=int, default=32)
    d.add_argument("--focus-block", type=int, default=64)
    d.add_argument("--device", default="cpu")
    d.add_argument("--strict", action="store_true", help="exit 1 if dense decoding misses the answer")
    sub.add_parser("eval", help="accuracy of every mode on generated long-context cases", add_help=False)
    sub.add_parser("bench", help="end-to-end speed report (see bench/README.md)", add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.cmd == "demo":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        return _demo(args)
    if args.cmd == "eval":
        from .evaluate import main as eval_main

        return eval_main(rest)
    from .bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
