"""Train focus-tiny: a small LLaDA-architecture DiffusionLM on the synthetic long-context tasks.

Masked-diffusion SFT: the prompt stays clean, the answer + EOS region is masked with ratio
t ~ U(eps, 1) per example, and the loss is CE on masked positions weighted by 1/t. Lengths follow a
curriculum from short to --max-len; batches hold about --batch-tokens tokens. Data are generated on
the fly from the seed (focusdllm.tasks), so there is no dataset file.

    python bench/train_tiny.py --preset h100 --out runs/focus-tiny          # one H100, ~8 min
    python bench/train_tiny.py --preset smoke --out /tmp/smoke              # CPU, seconds

With --steps N the schedule (LR, lengths) follows the step count and the run is reproducible;
with --steps 0 it follows the wall clock (--minutes), and the log records the steps reached.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from focusdllm import DiffusionLM, ModelConfig, load_model, save_model  # noqa: E402
from focusdllm.models.loading import init_random  # noqa: E402
from focusdllm.tasks import GEN_LENGTH, TASKS, VOCAB, evaluate, generate_case, make_cases, target_ids  # noqa: E402

PRESETS = {
    # CI: a few steps on CPU, seconds
    "smoke": dict(d_model=64, n_layers=2, n_heads=2, mlp_hidden=128, min_len=320, max_len=384,
                  batch_tokens=2048, steps=30, minutes=1.0, lr=3e-3, warmup=5, eval_every=0,
                  eval_lengths=[384], eval_n=2, device="cpu", log_every=5),
    # CPU validation of the recipe at short lengths (tens of minutes on 2 cores)
    "cpu": dict(d_model=128, n_layers=4, n_heads=2, mlp_hidden=384, min_len=320, max_len=640,
                batch_tokens=8192, steps=1200, minutes=60.0, lr=2e-3, warmup=50, eval_every=200,
                eval_lengths=[384, 640, 1024], eval_n=16, device="cpu", log_every=20),
    # the shipped model: one H100
    "h100": dict(d_model=256, n_layers=6, n_heads=4, mlp_hidden=768, min_len=384, max_len=8192,
                 batch_tokens=65536, steps=0, minutes=6.5, lr=1.5e-3, warmup=100, eval_every=400,
                 eval_lengths=[2048, 4096, 8192, 16384], eval_n=24, device="cuda", log_every=25),
}


def build_config(a) -> ModelConfig:
    return ModelConfig(
        arch="llada", d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_heads,
        mlp_hidden=a.mlp_hidden, rope_theta=a.rope_theta, **VOCAB.model_ids(),
    )


def sample_length(rng: random.Random, p: float, a) -> int:
    """Curriculum: --min-len until --hold of the run, then the top grows log-linearly to --max-len at --ramp."""
    lo, hi = math.log(a.min_len), math.log(a.max_len)
    cur = lo + (hi - lo) * _ramp(p, a)
    if rng.random() < 0.5:  # half the batches from the top octave reached so far
        x = rng.uniform(max(lo, cur - math.log(2)), cur)
    else:
        x = rng.uniform(lo, cur)
    return max(a.min_len, int(math.exp(x)) // 64 * 64)


def _ramp(p: float, a) -> float:
    return min(1.0, max(0.0, (p - a.hold) / max(1e-9, a.ramp - a.hold)))


def make_batch(rng: random.Random, length: int, rows: int):
    """rows cases of random tasks, each `length` tokens in all (prompt + answer region)."""
    ids, starts = [], []
    for _ in range(rows):
        task = TASKS[rng.randrange(len(TASKS))]
        gl = GEN_LENGTH[task]
        c = generate_case(task, rng, length - gl)
        ids.append(c["input"] + target_ids(c))
        starts.append(length - gl)
    return torch.tensor(ids), torch.tensor(starts)


def diffusion_loss(model, ids, starts, gen: torch.Generator, eps: float = 1e-3):
    """LLaDA SFT loss: mask the answer region with ratio t per row, CE / t on masked tokens."""
    b, n = ids.shape
    dev = ids.device
    t = eps + (1 - eps) * torch.rand(b, 1, device=dev, generator=gen)
    region = torch.arange(n, device=dev)[None] >= starts[:, None]
    masked = region & (torch.rand(b, n, device=dev, generator=gen) < t)
    x = torch.where(masked, model.config.mask_id, ids)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        logits = model(x)
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")
    loss = (ce / t.expand(b, n)[masked]).sum() / region.sum()
    return loss, ce.mean().detach() if ce.numel() else ce.sum().detach()


def run_eval(model, lengths, n, tokens_per_step, seed, max_batch_tokens) -> list[dict]:
    """Exact match per task and total length (prompt = length - gen_length) with dense decoding."""
    out = []
    model.eval()
    for L in lengths:
        for task in TASKS:
            cases = make_cases(task, n, L - GEN_LENGTH[task], seed=seed)
            t0 = time.time()
            r = evaluate(model, cases, max_batch_tokens=max_batch_tokens, tokens_per_step=tokens_per_step)
            out.append({"task": task, "length": L, "acc": r["acc"], "strict": r["strict"], "n": r["n"],
                        "secs": round(time.time() - t0, 2)})
    model.train()
    return out


def main(argv=None):
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
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--hold", type=float, default=0.2, help="fraction of the run spent at --min-len")
    ap.add_argument("--ramp", type=float, default=0.6, help="fraction of the run to reach --max-len")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=1000)
    ap.add_argument("--eval-tokens-per-step", type=int, default=1)
    ap.add_argument("--eval-batch-tokens", type=int, default=262144)
    ap.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--ckpt", help="where to write the training checkpoint (default: OUT/ckpt.pt)")
    ap.add_argument("--resume", help="a ckpt.pt written by an earlier run (continues its schedule)")
    a = ap.parse_args(argv)
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; pass --device cpu")
    dev = torch.device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    cfg = build_config(a)
    model = init_random(DiffusionLM(cfg).to(dev), seed=a.seed).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    step, trained_s = 0, 0.0
    if a.resume:
        ck = torch.load(a.resume, map_location=dev)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, trained_s = ck["step"], ck["trained_s"]
        gen.set_state(ck["gen"])
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
    losses = []
    while True:
        elapsed = time.time() - t_start
        p = step / a.steps if a.steps else elapsed / budget
        if p >= 1.0 or elapsed >= budget:
            break
        rng = random.Random(a.seed * 1_000_003 + step)
        L = sample_length(rng, p, a)
        rows = max(1, a.batch_tokens // L)
        ids, starts = make_batch(rng, L, rows)
        ids, starts = ids.to(dev, non_blocking=True), starts.to(dev, non_blocking=True)
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, ce = diffusion_loss(model, ids, starts, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tok_since += ids.numel()
        losses.append(loss.detach())
        if step % a.log_every == 0:
            ls = torch.stack(losses).float().cpu()
            now = time.time()
            emit({"step": step, "p": p, "len": L, "rows": rows, "loss": ls.mean().item(), "ce": ce.item(),
                  "gnorm": gnorm.item(), "lr": lr, "tok_s": tok_since / (now - t_log),
                  "elapsed": now - t_start})
            losses, tok_since, t_log = [], 0, time.time()
        if a.eval_every and step % a.eval_every == 0:
            lo, hi = math.log(a.min_len), math.log(a.max_len)
            cur = max(a.min_len, int(math.exp(lo + (hi - lo) * _ramp(p, a))) // 64 * 64)
            te = time.time()
            for r in run_eval(model, [cur], 8, 2, a.eval_seed + step, a.eval_batch_tokens):
                emit({"event": "eval", "step": step, **r})
            t_start += time.time() - te  # eval time does not count against the training budget
            t_log = time.time()
    trained_s = time.time() - t_start
    emit({"event": "trained", "steps": step, "train_secs": trained_s})
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "trained_s": trained_s,
                "gen": gen.get_state()}, a.ckpt or out / "ckpt.pt")
    dtype = getattr(torch, a.save_dtype)
    ship = DiffusionLM(cfg)
    ship.load_state_dict(model.state_dict())
    save_model(ship.to(dtype), out)
    del model, opt
    shipped = load_model(out, device=dev)  # evaluate exactly what ships (fp32 from the saved weights)
    te = time.time()
    results = run_eval(shipped, a.eval_lengths, a.eval_n, a.eval_tokens_per_step, a.eval_seed,
                       a.eval_batch_tokens)
    for r in results:
        emit({"event": "final_eval", "step": step, **r})
    (out / "eval.json").write_text(json.dumps({"steps": step, "train_secs": trained_s, "results": results,
                                               "eval_secs": time.time() - te}, indent=1))
    log.close()
    return results


if __name__ == "__main__":
    main()
