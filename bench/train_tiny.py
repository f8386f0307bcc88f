"""Train focus-tiny: a small LLaDA-architecture DiffusionLM on the synthetic long-context tasks.

Masked-diffusion SFT: the prompt stays clean, the answer + EOS region is masked with ratio
t ~ U(eps, 1) per example, and the loss is the mean CE on masked positions (--t-weight 1: LLaDA's 1/t).
Retrieval does not form from the sparse task answers alone (loss plateau, 0% exact match); auxiliary
induction "copy rows" (random tokens then copies of them, every copied token a masked target; half of
them one exact copy at a per-row offset, half 8-64-token chunks) give a dense copy signal and break the
plateau (--aux-*). Lengths follow a curriculum: --min-len for the first --hold of the run, then up to
--max-len at --ramp; batches hold about --batch-tokens tokens. Data are generated from the seed and the
step (focusdllm.tasks), so there is no dataset file; in a fixed-step run (--steps N) DataLoader workers
build them ahead of the GPU and the data are reproducible (the GPU arithmetic is not).

The shipped weights (run 13: bench/results/train_log_run9_stage1.jsonl, train_log_run13_stage2.jsonl,
train_log_run13.jsonl) came from these three presets on one H100:

    python bench/train_tiny.py --preset h100 --out runs/stage1                                       # 408-460 s
    python bench/train_tiny.py --preset h100-refine --init-from runs/stage1 --out runs/stage2         # 263-271 s
    python bench/train_tiny.py --preset h100-multikey --init-from runs/stage2 --out runs/focus-tiny   # 91 s
    python bench/train_tiny.py --preset smoke --out /tmp/smoke                                       # CPU, seconds

(the times: runs 20 and 21 in one process, bench/train_recipe.py, 780 s and 845 s start to weights, with 12
DataLoader workers; with 8 the short steps waited on data and the stages took 479, ~313 and ~140 s alone). The chain
passes the suite only in some runs: 13 and 19 did; 20 and 21 learned multikey only with the needle at depth 0 or 1
(suite 75-80 %). Runs part in stage 1: its final loss was 0.56-1.15 in the chains that pass, 1.26-1.36 in the others.

Every shorter chain tried left multikey right only with the needle at depth 0 or 1 (40-50 % of the suite): stage 2 at
5,000 steps (run 16a), no stage 2 and a 6,000-step stage 3 (run 16b), stage 1 ended at 70 % or 90 % of its schedule
by --end-at (runs 17 and 18: 766 s and 866 s end to end, measured alone). A second stage 3 on run 18 taught multikey
(90-100 %) but span copy then missed depth 1 (bench/README.md).

Stage 1 starts from random weights at 320 tokens with 70 % copy rows (the plateau breaks near step 2000; a 512-token
start with 60 % copy rows had not left it by step 10000: train_log_run5_plateau.jsonl) and ramps to 16.5K. It learns
passkey and span copy in every run; multikey (4 needles whose digits it must tell apart) only in runs 7 and 19, not
in runs 9, 20, 21 (same preset) nor 14 (weights 1:3:2). Stage 2 continues at 1K-24.6K with LR 5e-4, 2-5 % copy rows
and batches weighted 1:4:2 toward multikey; it keeps span copy at 100 % to 16K but lifts multikey only at the needle
depths 0 and 1 (40-60 %). Stage 3 restarts the LR at 5e-4 for 3000 steps with only 5 % of the needles at those
edges: multikey reached 100 % in run 13, not in runs 20-21 (with no edge needles at all span copy forgot depth 0,
run 15). Stages 1-2 put a fifth to a quarter of the needles at depth exactly 0 or 1 (the suite's edges). The recipe
is not bit-reproducible on the GPU: check a re-trained model with --suite-lengths. bench/probe_train.py: compiled
forward + workers run 2.4x (8K) to 4.5x (1K) the tokens/s of the loop before (bench/results/probe_train_h100.json).
Earlier weights (runs 1-12) and their recipes: bench/README.md and the "args" of each log's start event.

With --steps 0 the schedule follows the wall clock (--minutes) instead, and the log records the steps reached.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from focusdllm import DiffusionLM, ModelConfig, load_model, save_model  # noqa: E402
from focusdllm.models.loading import init_random  # noqa: E402
from focusdllm.tasks import TASKS, VOCAB  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_data import StepBatches, log_top_length, loss_rows, step_batch, to_length  # noqa: E402
from train_eval import run_eval, suite_eval  # noqa: E402
from train_step import SDPA, compiled_forward, diffusion_loss, optimizer_step  # noqa: E402

PRESETS = {
    # CI: a few steps on CPU, seconds
    "smoke": dict(d_model=64, n_layers=2, n_heads=2, mlp_hidden=128, min_len=320, max_len=384,
                  batch_tokens=2048, steps=30, minutes=1.0, lr=3e-3, warmup=5, eval_every=0,
                  eval_lengths=[384], eval_n=2, device="cpu", log_every=5),
    # CPU validation of the recipe at short lengths (tens of minutes on 2 cores)
    "cpu": dict(d_model=128, n_layers=4, n_heads=2, mlp_hidden=384, min_len=320, max_len=640,
                batch_tokens=8192, steps=1200, minutes=60.0, lr=2e-3, warmup=50, eval_every=200,
                eval_lengths=[384, 640, 1024], eval_n=16, device="cpu", log_every=20),
    # the shipped model: one H100, one call (bench/probe_train.py: ~2.4x the old loop's tokens/s at 8K)
    "h100": dict(d_model=256, n_layers=4, n_heads=4, mlp_hidden=768, min_len=320, max_len=16576,
                 batch_tokens=65536, steps=22000, minutes=15.0, lr=1.5e-3, warmup=100, eval_every=0,
                 eval_lengths=[2048, 4096, 8192, 16384], eval_n=16, device="cuda", log_every=100,
                 weight_decay=0.05, aux_start=0.7, aux_end=0.05, aux_decay=0.6, aux_exact=0.5, gate_acc=0.0,
                 hold=0.2, ramp=0.65, save_every=60.0, save_dtype="float32", final_generate=1, rope_theta=1e6,
                 workers=12, compile=1, task_weights=[1.0, 2.0, 2.0], edge_depth=0.2, seed=0),
    # stage 2 of the shipped model: continue stage 1 (--init-from) at 1K-24.6K with a lower LR, few copy rows
    "h100-refine": dict(d_model=256, n_layers=4, n_heads=4, mlp_hidden=768, min_len=1024, max_len=24640,
                        batch_tokens=65536, steps=10000, minutes=15.0, lr=5e-4, warmup=50, eval_every=0,
                        eval_lengths=[2048, 4096, 8192, 16384], eval_n=16, device="cuda", log_every=100,
                        weight_decay=0.05, aux_start=0.05, aux_end=0.02, aux_decay=0.5, aux_exact=0.5,
                        gate_acc=0.0, hold=0.0, ramp=0.35, save_every=60.0, save_dtype="float32", final_generate=1,
                        rope_theta=1e6, workers=12, compile=1, task_weights=[1.0, 4.0, 2.0], edge_depth=0.25, seed=6),
}
# every stage: full forward, SDPA's own backend (cuDNN on the H100), 12 workers (8 left the GPU waiting on data at
# short lengths: run 20's stage 1 took 408 s against 479 s); --loss-rows 1 / --sdpa flash were slower end to end
# stage 3: continue stage 2 (--init-from) with a fresh LR over the whole 1K-24.6K range and few edge needles, which
# teaches multikey at the inner depths that stage 2 leaves at chance
PRESETS["h100-multikey"] = {**PRESETS["h100-refine"], "steps": 3000, "aux_start": 0.02, "ramp": 0.0,
                            "edge_depth": 0.05, "seed": 7}
TAIL_STEPS = 2000  # the "trained" event's tail_loss: the mean logged loss over a run's last 2,000 steps
CONTINUING = ("h100-refine", "h100-multikey")  # presets that continue a model and need --init-from


def build_config(a) -> ModelConfig:
    return ModelConfig(
        arch="llada", d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_heads,
        mlp_hidden=a.mlp_hidden, rope_theta=a.rope_theta, **VOCAB.model_ids(),
    )


def snapshot(model, cfg, out: Path, dtype) -> None:
    """Write the shippable config.json + model.safetensors (a CPU copy in `dtype`) to `out`."""
    ship = DiffusionLM(cfg)
    ship.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_model(ship.to(dtype), out)


def parse_args(argv=None) -> argparse.Namespace:
    """The recipe's arguments: the preset's values where a flag is not given."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    ap.add_argument("--out", required=True, help="folder for config.json, model.safetensors, logs")
    for k in ("d_model", "n_layers", "n_heads", "mlp_hidden", "min_len", "max_len", "batch_tokens", "steps",
              "warmup", "eval_every", "eval_n", "log_every"):
        ap.add_argument("--" + k.replace("_", "-"), type=int)
    for k in ("minutes", "lr"):
        ap.add_argument("--" + k, type=float)
    ap.add_argument("--eval-lengths", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--device")
    ap.add_argument("--rope-theta", type=float, default=None)
    ap.add_argument("--hold", type=float, default=None, help="fraction of the run spent at --min-len")
    ap.add_argument("--ramp", type=float, default=None, help="fraction of the run to reach --max-len")
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--aux-start", type=float, default=None, help="share of induction copy rows at the start")
    ap.add_argument("--aux-end", type=float, default=None, help="share of copy rows from --aux-decay on")
    ap.add_argument("--aux-decay", type=float, default=None, help="fraction of the run over which it decays")
    ap.add_argument("--t-weight", type=int, default=0, help="1: LLaDA's 1/t loss weight; 0: mean CE on masks")
    ap.add_argument("--gate-acc", type=float, default=None,
                    help="hold --min-len until the periodic eval's passkey+multikey mean reaches this (0: off)")
    ap.add_argument("--gate-max", type=float, default=None, help="open the gate anyway at this fraction")
    ap.add_argument("--save-every", type=float, default=None, help="seconds between shippable snapshots in OUT")
    ap.add_argument("--final-generate", type=int, default=None,
                    help="1: final eval through focusdllm.generate(mode='vanilla', steps=gen_length)")
    ap.add_argument("--init-from", help="a model folder (config.json + model.safetensors) to start from")
    ap.add_argument("--aux-alphabet", type=int, default=VOCAB.marker0, help="copy rows draw ids below this")
    ap.add_argument("--aux-chunk", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    ap.add_argument("--aux-src", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.7])
    ap.add_argument("--aux-exact", type=float, default=None,
                    help="share of copy rows that are one exact copy (src, copy, random) instead of chunks")
    ap.add_argument("--aux-keyed", type=float, default=None,
                    help="share of copy rows that are key-matching rows (train_data.keyed_rows)")
    ap.add_argument("--tasks", type=lambda s: tuple(s.split(",")), default=TASKS)
    ap.add_argument("--task-weights", type=lambda s: [float(x) for x in s.split(",")], default=None,
                    help="sampling weights of --tasks in training batches (default: uniform)")
    ap.add_argument("--span-other", type=float, default=0.0,
                    help="share of span-copy rows asking another needle's span than the longest (not yet run on GPU)")
    ap.add_argument("--edge-depth", type=float, default=None,
                    help="share of task rows whose target needle sits at depth exactly 0 or 1")
    ap.add_argument("--suite-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[],
                    help="after training: dense exact match per task on the fidelity suite's grid (bf16 "
                         "weights, as `focusdllm.evaluate` loads them) at these prompt lengths")
    ap.add_argument("--suite-per-depth", type=lambda s: [int(x) for x in s.split(",")], default=[2],
                    help="cases per depth of each suite eval: the first uses the suite's seed 1234 (its exact "
                         "cases at 2), further ones seed 4321, 5321, ... (other cases)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--eval-seed", type=int, default=1000)
    ap.add_argument("--eval-tokens-per-step", type=int, default=1)
    ap.add_argument("--eval-batch-tokens", type=int, default=262144)
    ap.add_argument("--save-dtype", choices=["bfloat16", "float32"], default=None)
    ap.add_argument("--ckpt", help="where to write the training checkpoint (default: OUT/ckpt.pt)")
    ap.add_argument("--resume", help="a ckpt.pt written by an earlier run (continues its schedule)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader processes building batches ahead (needs --steps; 0: inline)")
    ap.add_argument("--compile", type=int, default=None,
                    help="torch.compile the training forward: 1 the whole model, 2 per block (a shorter cold compile)")
    ap.add_argument("--sdpa", choices=sorted(SDPA), default=None,
                    help="training attention on CUDA: SDPA's own choice or flash only")
    ap.add_argument("--loss-rows", type=int, default=None,
                    help="1: the last layer on the answer tail only in task-row batches (train_data.loss_rows)")
    ap.add_argument("--end-at", type=float, default=None,
                    help="train the first fraction of a fixed-step run's schedule (LR, lengths, data) and finish there")
    ap.add_argument("--stop-after", type=float, default=0.0,
                    help="minutes: write the checkpoint and stop (a fixed-step run continues with --resume)")
    a = ap.parse_args(argv)
    defaults = dict(weight_decay=0.1, aux_start=0.5, aux_end=0.1, aux_decay=0.5, aux_exact=0.5, aux_keyed=0.0,
                    gate_acc=0.0, gate_max=0.5, hold=0.2, ramp=0.6, save_every=0.0, rope_theta=500000.0,
                    final_generate=0, save_dtype="bfloat16", workers=0, compile=0, edge_depth=0.0, seed=0, end_at=1.0,
                    loss_rows=0, sdpa="default")
    for k, v in {**defaults, **PRESETS[a.preset]}.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.preset in CONTINUING and not (a.init_from or a.resume):
        raise SystemExit(f"--preset {a.preset} continues a model: pass --init-from <previous stage's output folder>")
    if a.task_weights is not None and len(a.task_weights) != len(a.tasks):
        raise SystemExit(f"--task-weights needs one weight per task in {a.tasks}")
    if not 0.0 < a.end_at <= 1.0 or (a.end_at < 1.0 and not a.steps):
        raise SystemExit("--end-at is a fraction in (0, 1] of a fixed-step run's schedule: pass --steps N with it")
    if a.workers and not a.steps:
        raise SystemExit("--workers builds the batches of a fixed-step run: pass --steps N (or --workers 0)")
    if a.workers and a.gate_acc > 0:
        raise SystemExit("--gate-acc changes the lengths at run time, so batches cannot be built ahead: "
                         "pass --workers 0 or --gate-acc 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; pass --device cpu")
    return a


def main(argv=None, keep: dict | None = None):
    """One run (a stage) of the recipe. keep: carries the model and its compiled forward from stage to stage in
    one process (bench/train_recipe.py); a stage loads its --init-from weights into the kept model."""
    a = parse_args(argv)
    dev = torch.device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    cfg = build_config(a)
    kept = keep is not None and keep.get("key") == (cfg, dev, a.compile)
    model = init_random(keep["model"] if kept else DiffusionLM(cfg).to(dev), seed=a.seed).train()
    fwd = keep["fwd"] if kept else compiled_forward(model, a.compile)
    if keep is not None:
        keep.update(key=(cfg, dev, a.compile), model=model, fwd=fwd)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), fused=True)
    if a.init_from:
        model.load_state_dict(load_model(a.init_from, device=dev).state_dict())
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    step, trained_s = 0, 0.0
    if a.resume:
        ck = torch.load(a.resume, map_location=dev)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, trained_s = ck["step"], ck["trained_s"]
        gen.set_state(ck["gen"].cpu())  # map_location moved the ByteTensor state
    log = (out / "train_log.jsonl").open("a")

    def emit(rec):
        rec = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in rec.items()}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(json.dumps(rec), flush=True)

    n_params = sum(p.numel() for p in model.parameters())
    emit({"event": "start", "preset": a.preset, "params": n_params, "config": cfg.to_dict(),
          "args": {k: v for k, v in vars(a).items()}, "device": str(dev),
          "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None, "resume_step": step})
    budget = a.minutes * 60.0
    t_start = time.time() - trained_s
    tok_since, t_log = 0, time.time()
    losses, logged = [], []  # logged: (step, mean loss since the last log line)
    gate_p, t_save = None, time.time()
    last = round(a.steps * a.end_at)  # the step the run ends at (fixed-step runs)
    batches = None
    if a.workers:  # fixed-step runs: batches are built ahead by worker processes
        batches = iter(torch.utils.data.DataLoader(
            StepBatches(a), batch_size=None, sampler=range(step, last), num_workers=a.workers,
            pin_memory=dev.type == "cuda", prefetch_factor=4, persistent_workers=False))
    while True:
        elapsed = time.time() - t_start
        p = step / a.steps if a.steps else elapsed / budget
        if (step >= last) if a.steps else (elapsed >= budget):  # fixed-step or wall-clock run ends
            break
        if a.gate_acc > 0 and gate_p is None and p >= a.gate_max:
            gate_p = p
            emit({"event": "gate", "step": step, "p": p, "forced": True})
        if batches is not None:
            L, ids, region, rows = next(batches)
        else:
            L, ids, region = step_batch(a, step, p, gate_p)
            rows = loss_rows(region) if a.loss_rows else None
        ids, region = ids.to(dev, non_blocking=True), region.to(dev, non_blocking=True)
        rows = None if rows is None else rows.to(dev, non_blocking=True)
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, ce = diffusion_loss(fwd, ids, region, gen, t_weight=bool(a.t_weight), rows=rows,
                                  sdpa=SDPA[a.sdpa])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = optimizer_step(model, opt)
        step += 1
        tok_since += ids.numel()
        losses.append(loss.detach())
        if step % a.log_every == 0:
            logged.append((step, torch.stack(losses).float().mean().item()))
            now = time.time()
            emit({"step": step, "p": p, "len": L, "rows": ids.shape[0], "loss": logged[-1][1], "ce": ce.item(),
                  "gnorm": gnorm.item(), "lr": lr, "tok_s": tok_since / (now - t_log),
                  "elapsed": now - t_start})
            losses, tok_since, t_log = [], 0, time.time()
        if a.eval_every and step % a.eval_every == 0:
            cur = to_length(log_top_length(p, a, gate_p), a)  # the longest length trained so far
            te = time.time()
            res = run_eval(model, [cur], 8, 2, a.eval_seed + step, a.eval_batch_tokens, a.tasks)
            for r in res:
                emit({"event": "eval", "step": step, **r})
            gated = [r["acc"] for r in res if r["task"] in ("passkey", "multikey")]
            if a.gate_acc > 0 and gate_p is None and gated and sum(gated) / len(gated) >= a.gate_acc:
                gate_p = p
                emit({"event": "gate", "step": step, "p": p, "forced": False})
            t_start += time.time() - te  # eval time does not count against the training budget
            t_log = time.time()
        if a.save_every and time.time() - t_save >= a.save_every:
            snapshot(model, cfg, out, getattr(torch, a.save_dtype))
            t_save = time.time()
        if a.stop_after and a.steps and time.time() - t_start >= a.stop_after * 60:  # pause: --resume continues the run
            emit({"event": "paused", "step": step})
            break
    trained_s = time.time() - t_start
    tail = [x for st, x in logged if st > step - TAIL_STEPS]
    tail_loss = sum(tail) / len(tail) if tail else None  # stage 1 of the chains that failed the suite: > 1.25
    emit({"event": "trained", "steps": step, "train_secs": trained_s, "tail_loss": tail_loss})
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "trained_s": trained_s,
                "gen": gen.get_state()}, a.ckpt or out / "ckpt.pt")
    snapshot(model, cfg, out, getattr(torch, a.save_dtype))
    if keep is not None:
        # the weights are written: the recipe's clock stops
        keep.update(saved_at=time.time(), train_secs=trained_s, tail_loss=tail_loss)
    if a.steps and step < last:  # paused by --stop-after: no final eval yet
        log.close()
        return []
    del model, opt
    shipped = load_model(out, device=dev)  # evaluate exactly what ships (fp32 from the saved weights)
    te = time.time()
    results = run_eval(shipped, a.eval_lengths, a.eval_n, a.eval_tokens_per_step, a.eval_seed,
                       a.eval_batch_tokens, a.tasks, use_generate=bool(a.final_generate))
    for r in results:
        emit({"event": "final_eval", "step": step, **r})
    suite = []
    if a.suite_lengths:
        del shipped
        bf16 = load_model(out, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, device=dev)
        for i, pd in enumerate(a.suite_per_depth):
            for r in suite_eval(bf16, a.suite_lengths, a.tasks, per_depth=pd, seed=1234 if i == 0 else 4321 + 1000 * i):
                emit({"event": "suite_eval", "step": step, **r})
                suite.append(r)
    if keep is not None:
        keep["suite"] = suite  # the recipe's verdict reads it here
    (out / "eval.json").write_text(json.dumps({"steps": step, "train_secs": trained_s, "results": results,
                                               "suite": suite, "eval_secs": time.time() - te}, indent=1))
    log.close()
    return results


if __name__ == "__main__":
    main()
