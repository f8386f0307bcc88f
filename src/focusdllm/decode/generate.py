"""The one decode loop: vanilla, Fast-dLLM (dual / prefix cache) and Focus-dLLM are policies of it.

A policy decides which rows run through the network at a step, which keys they attend to, and
when the cache is refreshed (DESIGN.md, "The one decode loop"). Semantics: reference/SPEC.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..cache import KVCache
from ..config import FocusConfig
from ..focus.indicator import StepRows, build_rows, dense_rows, focus_positions, grow_windows, response_rows
from ..models.transformer import DiffusionLM
from . import schedule as S
from .forward import Canvas, SparsePlan, StepStats, row_forward
from .step import DecodeState, StepRunner
from .validate import make_canvas, validate_args


@dataclass
class GenerateOutput:
    """`sequences` (B, L + G) in the caller's layout (prompt as given, then the generation)."""

    sequences: torch.Tensor
    nfe: int
    stats: dict = field(default_factory=dict)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Policy:
    """vanilla: a dense forward over the whole canvas at every step, no cache."""

    cached = False
    sparse: SparsePlan | None = None

    def rows(self, t: int, st: DecodeState) -> StepRows | None:
        return None  # None = full forward

    def step_key(self, t: int, st: DecodeState) -> tuple:
        """Host values `rows(t, st)` depends on besides the schedule (decode/graphs.py keys graphs by them)."""
        return ()


class CachePolicy(Policy):
    """fastdllm: refresh at step 0 of a block; then the block (dual) or block + suffix (prefix)."""

    cached = True

    def __init__(self, cache: str, shift: int, gen_length: int, block_length: int):
        self.cache, self.shift, self.g, self.bl = cache, shift, gen_length, block_length

    def _suffix(self, st):
        return self.g - (st.block + 1) * self.bl if self.cache == "prefix" else 0

    def rows(self, t, st):
        if t == 0:
            return None
        return dense_rows(st.block_start, st.row_len, st.masked, self.shift, self._suffix(st))

    def step_key(self, t, st):
        return (self._suffix(st),)


class FocusPolicy(CachePolicy):
    """focus: like dual, but later steps compute only windows around the predicted focus set."""

    def __init__(self, cfg: FocusConfig, shift: int, gen_length: int, block_length: int, plan, rule):
        super().__init__("dual", shift, gen_length, block_length)
        self.cfg, self.sparse, self.rule = cfg, plan, rule
        self.radius = cfg.window // 2 if cfg.window_past_block else 0

    def rows(self, t, st):
        if t == 0:
            every, blk = self.cfg.prompt_refresh_every, st.block
            if self.cfg.reuse_prompt_kv and blk > 0 and (every == 0 or blk % every):
                return response_rows(st.prompt_len, st.row_len, st.masked, blk, self.shift, self.g,
                                     self.cfg.refresh_prompt_tail)
            return None
        masked, conf, bl = st.masked, st.conf_buf, self.bl
        kind, arg = self.rule
        if kind == "fixed":
            n_focus = torch.full_like(st.block_start, st.sched[t])
            host_nf = st.sched[t] + self.cfg.extra_focus
        elif kind == "threshold":
            n_focus = ((conf >= arg) & masked).sum(-1).clamp(min=1)
            host_nf = None
        else:
            n_focus = S.factor_count(conf, masked, arg)
            host_nf = None
        focus_b = focus_positions(conf, masked, n_focus + self.cfg.extra_focus)  # (B, bl)
        lead = self.radius + self.shift
        w = lead + bl + self.radius
        strip = torch.zeros(masked.shape[0], w, dtype=torch.bool, device=masked.device)
        strip[:, lead:lead + bl] = focus_b
        active = grow_windows(strip, self.cfg.window)
        if not self.cfg.window_past_block:
            active[:, :lead] = False
            active[:, lead + bl:] = False
        n_rows = None
        if host_nf is not None:
            n_rows = min(w, max(1, host_nf) * (self.cfg.window + self.shift))
        return build_rows(
            st.block_start, st.row_len, active, masked, focus_b, self.radius, self.shift, n_rows
        )


def _rule(threshold, factor):
    if threshold is not None:
        return ("threshold", float(threshold))
    if factor is not None:
        return ("factor", float(factor))
    return ("fixed", None)


@torch.no_grad()
def generate(
    model: DiffusionLM,
    input_ids: torch.Tensor,
    *,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    factor: float | None = None,
    attention_mask: torch.Tensor | None = None,
    mode: str = "vanilla",
    cache: str | None = "dual",
    focus: FocusConfig | None = None,
    mask_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    capacity: int | None = None,
    seed: int = 0,
    callback=None,
    progress: bool = False,
    timing: bool = False,
    cuda_graphs: bool = False,
) -> GenerateOutput:
    """Block-wise masked-diffusion decoding (LLaDA reference semantics, reference/SPEC.md).

    Args:
        model: a `DiffusionLM` (see `load_model`).
        input_ids: (B, L) prompts, left-padded when B > 1 (pass `attention_mask`).
        gen_length, block_length, steps: canvas = prompt + gen_length masks, decoded block by
            block, steps // (gen_length // block_length) steps per block (fixed-count rule).
        temperature: 0 = argmax; > 0 = Gumbel-max in float64 (per-row generators seeded seed + b).
        remasking: "low_confidence" (softmax probability) or "random".
        threshold / factor: Fast-dLLM parallel decoding rules (steps then only bounds nothing).
        mode: "vanilla" (no cache), "fastdllm" (block KV cache) or "focus" (Focus-dLLM).
        cache: "dual" or "prefix" for fastdllm; focus runs on the dual cache.
        focus: FocusConfig for mode="focus" (default FocusConfig.paper()).
        mask_id, eos_id, pad_id: override the model config's ids (eos_id: stats["non_eos_tokens"]).
        capacity: KV buffer slots (fixed so lengths up to it never recompile the fast path).
        callback: called as callback(step, x, info) after every step; x is (B, L + G).
        progress: show a tqdm bar over steps.
        timing: synchronize around every forward to report ms per refresh / step (stats "ms_per_step" averages
            the in-block steps). With cuda_graphs, consecutive replayed steps are timed back to back (synchronized
            before the first and after the last, as an untimed decode runs them), and the step of each graph key
            that ran eagerly and was then recorded is reported apart, as "ms_per_capture" over "captures" steps.
        cuda_graphs: replay in-block steps as CUDA graphs (CUDA only). Fixed-count greedy steps are captured
            whole (rows, network, LM head, sampling, commit: no launches from Python,
            stats["cuda_graphs"] == "step"); otherwise only the row forward is ("forward"). Same kernels,
            so tokens match up to cuBLAS algorithm choice under capture (bf16 near-ties).
    Returns:
        GenerateOutput with sequences, nfe and stats.
    """
    cfg = model.config
    mask_id = cfg.mask_id if mask_id is None else mask_id
    pad_id = cfg.pad_id if pad_id is None else pad_id
    eos_id = cfg.eos_id if eos_id is None else eos_id
    steps = gen_length if steps is None else steps
    validate_args(
        model, input_ids, gen_length, block_length, steps, temperature, remasking, threshold, factor,
        attention_mask, mode, cache, focus, mask_id, pad_id,
    )
    if mode == "focus" and focus is None:
        focus = FocusConfig.paper()
    dev = input_ids.device
    bsz = input_ids.shape[0]
    n_blocks, spb = gen_length // block_length, steps // (gen_length // block_length)
    shift = 1 if cfg.shift_logits else 0
    rule = _rule(threshold, factor)
    block_size = focus.block_size if focus is not None else 64
    canvas, pad_left = make_canvas(input_ids, attention_mask, gen_length, mask_id, pad_id, capacity, block_size)
    gens = [torch.Generator(device=dev).manual_seed(seed + b) for b in range(bsz)]
    needs_gen = temperature > 0 or remasking == "random"

    policy: Policy
    kv = None
    if mode == "vanilla":
        policy = Policy()
    else:
        kv = KVCache(cfg.n_layers, bsz, cfg.n_kv_heads, canvas.valid.shape[1], cfg.head_dim, model.dtype, dev)
        if mode == "fastdllm":
            policy = CachePolicy(cache, shift, gen_length, block_length)
        else:
            plan = _sparse_plan(
                focus, cfg.n_layers, canvas, model.dtype, record=callback is not None and not cuda_graphs,
                group=cfg.n_heads // cfg.n_kv_heads,
            )
            policy = FocusPolicy(focus, shift, gen_length, block_length, plan, rule)

    stats = StepStats(density_sum=torch.zeros(cfg.n_layers, device=dev))
    st = DecodeState(
        canvas, 0, torch.zeros_like(canvas.prompt_len), torch.zeros(bsz, block_length, dtype=torch.long, device=dev),
        torch.zeros(bsz, block_length, dtype=torch.bool, device=dev),
        torch.zeros(bsz, block_length, dtype=torch.float64, device=dev), S.num_transfer_tokens(block_length, spb),
    )
    runner = StepRunner(model, kv, policy, stats, row_forward, mask_id, shift, temperature, remasking,
                        gens if needs_gen else None, rule)
    step = runner
    if cuda_graphs:
        from .graphs import GraphedRowForward, GraphedSteps

        if dev.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device; pass cuda_graphs=False")
        if mode == "vanilla":
            raise ValueError("cuda_graphs applies to cached modes (fastdllm, focus), not mode='vanilla'")
        runner.forward = GraphedRowForward()
        step = GraphedSteps(runner)  # whole in-block steps as one graph where the step has no host sync
    times = {"refresh": [], "step": [], "full": [], "capture": []}
    run = _ReplayRun(dev)
    nfe = refreshes = 0
    bar = tqdm(total=n_blocks * spb, disable=not progress, desc=f"{mode} decode", unit="step")
    _sync(dev)
    t_start = time.perf_counter()
    for blk in range(n_blocks):
        run.flush(times)
        st.start_block(blk, mask_id)
        t = 0
        while True:
            if rule[0] == "fixed" and t >= spb:
                break
            if rule[0] != "fixed" and not bool(st.masked.any()):
                break
            replay = timing and cuda_graphs and step.replays(st, t)
            if timing and not replay:
                run.flush(times)
                _sync(dev)
                t0 = time.perf_counter()
            elif replay:
                run.start()
            res = step(st, t)
            refreshes += res.kind == "refresh"
            if res.kind == "step":
                stats.active_rows += res.n_rows
                stats.row_steps += 1
                stats.sparse_steps += policy.sparse is not None
            nfe += 1
            if timing and not replay:
                _sync(dev)
                times["capture" if res.captured else res.kind].append((time.perf_counter() - t0) * 1e3)
            if callback is not None:
                info = {  # copies: a replayed graph overwrites its outputs at the next step
                    "block": blk, "step_in_block": t, "kind": res.kind, "decoded": res.transfer.clone(),
                    "confidence": res.conf.clone(), "candidates": res.cand.clone(),
                    "rows": None if res.rows is None else res.rows.rows + pad_left[:, None],
                }
                if policy.sparse is not None and res.rows is not None:
                    info.update(policy.sparse.last)
                callback(nfe - 1, _user_layout(input_ids, canvas), info)
            t += 1
            bar.update(1)
    run.flush(times)
    _sync(dev)
    elapsed = time.perf_counter() - t_start
    bar.close()
    out = _user_layout(input_ids, canvas)
    stats_d = _stats(stats, nfe, refreshes, elapsed, bsz * gen_length, times, policy, dev)
    # Fast-dLLM's speed report counts only non-EOS answer tokens; give both so either can be quoted
    stats_d["non_eos_tokens"] = int((out[:, input_ids.shape[1]:] != eos_id).sum())
    if cuda_graphs:
        stats_d["cuda_graphs"] = "step" if step.graphs else "forward"
    return GenerateOutput(out, nfe, stats_d)


class _ReplayRun:
    """Times consecutive replayed steps back to back, as an untimed decode runs them (no synchronize between
    them): the mean of a run is recorded once per step when the run ends."""

    def __init__(self, dev):
        self.dev, self.n, self.t0 = dev, 0, None

    def start(self):
        """Count one more replayed step, starting the timer at the first of a run."""
        if self.t0 is None:
            _sync(self.dev)
            self.t0 = time.perf_counter()
        self.n += 1

    def flush(self, times: dict):
        if self.t0 is None:
            return
        _sync(self.dev)
        times["step"] += [(time.perf_counter() - self.t0) * 1e3 / self.n] * self.n
        self.n, self.t0 = 0, None


def _sparse_plan(focus: FocusConfig, n_layers: int, canvas: Canvas, dtype, record: bool, group: int = 1) -> SparsePlan:
    from ..attention.backend import resolve_backend

    bs = focus.block_size
    dev = canvas.x.device
    nb_row = (canvas.prompt_len + bs - 1) // bs
    keep_host = [focus.n_keep_blocks(int(n)) for n in nb_row.tolist()]
    n_keep = torch.tensor(keep_host, device=dev, dtype=torch.long)
    cap = canvas.valid.shape[1]
    slot = torch.arange(cap, device=dev)[None, :]
    response = (slot >= canvas.prompt_len[:, None]) & (slot < canvas.row_len[:, None])
    return SparsePlan(
        sink_layer=focus.resolve_sink_layer(n_layers), num_sinks=focus.num_sinks,
        per_head=focus.per_head, block_size=bs, n_blocks_host=-(-canvas.max_prompt // bs),
        n_blocks_row=nb_row, n_keep=n_keep, response=response,
        backend=resolve_backend(focus.backend, dev, dtype, group),
        prefill_backend=resolve_backend(focus.backend, dev, dtype), record=record, block_score=focus.block_score,
        prefill_keep=focus.prefill_keep,
        prefill_layer=focus.resolve_prefill_layer(n_layers),
        max_keys=max(keep_host) * bs + focus.num_sinks + canvas.gen_length,
        prefill_sparse=focus.prefill_sparse, prefill_band=focus.prefill_band,
        n_keep_prefill=torch.tensor(
            [max(1, math.ceil(focus.prefill_sparse * int(n) - 1e-9)) for n in nb_row.tolist()], device=dev
        ),
    )


def _user_layout(input_ids: torch.Tensor, canvas: Canvas) -> torch.Tensor:
    """(B, L) prompts as given + each row's G generated tokens."""
    g = canvas.gen_length
    idx = canvas.prompt_len[:, None] + torch.arange(g, device=input_ids.device)
    return torch.cat([input_ids, torch.gather(canvas.x, 1, idx)], 1)


def _stats(stats: StepStats, nfe, refreshes, elapsed, n_tokens, times, policy, dev) -> dict:
    out = {
        "nfe": nfe, "refreshes": refreshes, "seconds": elapsed,
        "tokens_per_s": n_tokens / max(elapsed, 1e-9),
        "mean_active_rows": stats.active_rows / max(stats.row_steps, 1) if stats.row_steps else None,
    }
    plan = policy.sparse
    if plan is not None:
        dens = (stats.density_sum / max(stats.sparse_steps, 1)).tolist()
        out["backend"] = plan.backend
        out["density_per_layer"] = [None if i <= plan.sink_layer else d for i, d in enumerate(dens)]
    for k, v in times.items():
        if v:
            out[f"ms_per_{k}"] = sum(v) / len(v)
    out["captures"] = len(times["capture"])
    if times.get("refresh"):  # the prefill: with prompt KV reuse the later refreshes are response-only
        out["ms_first_refresh"] = times["refresh"][0]
    if dev.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out
