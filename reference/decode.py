"""The decode loop: vanilla, Fast-dLLM (dual / prefix cache) and Focus-dLLM, as plain Python.

Read `generate` top to bottom: canvas -> blocks -> steps; each step picks the rows to run and the
keys they attend to (`_vanilla_step`, `_refresh_step`, `_cached_step`, `_focus_step`), then the
transfer rule commits tokens (reference/sampling.py). Batch size 1: `prompt` is a list of ids.
"""

from __future__ import annotations

import torch

from . import focus as fx
from .model import Checkpoint, full_forward, logits_of, rows_forward
from .sampling import Noise, choose, fixed_counts, predict


def _logits_for(ckpt: Checkpoint, cands: list[int], rows: list[int], hidden: torch.Tensor) -> torch.Tensor:
    """Logits (C, V) of candidate positions. SPEC.md, Logit source: LLaDA reads row p, Dream
    (shifted) reads row p-1 (position 0 would reuse its own row; a prompt is never empty)."""
    where = {p: j for j, p in enumerate(rows)}
    src = [max(p - 1, 0) if ckpt.shift_logits else p for p in cands]
    return logits_of(ckpt, hidden[[where[s] for s in src]])


def _extra_rows(ckpt: Checkpoint, cands: list[int], rows: list[int]) -> list[int]:
    """Dream's query-only rows: p-1 for each candidate p whose row p-1 is not computed anyway."""
    if not ckpt.shift_logits:
        return []
    have = set(rows)
    return sorted({p - 1 for p in cands if p - 1 not in have})


def _vanilla_step(ckpt, x, masked):
    """Vanilla (LLaDA reference sampler): dense forward over the whole canvas, no cache."""
    hidden, _, _ = full_forward(ckpt, x)
    return masked, _logits_for(ckpt, masked, list(range(len(x))), hidden)


def _refresh_step(ckpt, x, masked, state, n_prompt, fc):
    """Step 0 of a block in every cached mode (Fast-dLLM refresh; Paper Fig. 1 t=0): a dense
    forward that fills the cache with every position's post-RoPE K/V and decodes. For focus the
    prompt block representative keys of the sparse layers are computed here, once per block."""
    hidden, ks, vs = full_forward(ckpt, x)
    state["k"], state["v"] = [k.clone() for k in ks], [v.clone() for v in vs]
    if fc is not None:
        state["reps"] = {i: fx.block_reps(ks[i][:, :n_prompt], fc["block_size"])
                         for i in range(fc["sink_layer"] + 1, ckpt.n_layers)}
    return masked, _logits_for(ckpt, masked, list(range(len(x))), hidden)


def _cached_step(ckpt, x, masked, state, lo, hi):
    """Fast-dLLM step t >= 1: rows [lo, hi) (dual: the block; prefix: block + suffix) run against
    the cache, write their K/V in place and attend densely to every cached key (SPEC.md)."""
    rows = list(range(lo, hi))
    extra = _extra_rows(ckpt, masked, rows)
    allrows = rows + extra
    write = [True] * len(rows) + [False] * len(extra)
    hidden = rows_forward(ckpt, x, allrows, state["k"], state["v"], write)
    return masked, _logits_for(ckpt, masked, allrows, hidden)


def _focus_step(ckpt, x, masked, state, n_prompt, bounds, fc, rule_kw):
    """Focus-dLLM step t >= 1 (SPEC.md Modes/focus 1-7; Paper §3 / Fig. 1).

    1-2. focus set F_t from the buffered confidences; 3. active rows A = windows around F_t;
    4. A (+ Dream's extra rows) runs, A's K/V overwrite the cache, candidates = masked A in block;
    5. layers <= sink_layer dense; 6. sinks at sink_layer from A's head-averaged prompt softmax;
    7. deeper layers: top-K prompt blocks by focus-query scores ∪ sinks ∪ all response keys.
    Returns None when there is nothing to run (|F_t| = 0; our choice, the step still counts).
    """
    bs, be = bounds
    buffered = [state["conf"][p] for p in masked]
    size = fx.focus_size(buffered, extra_focus=fc["extra_focus"], **rule_kw)
    focus = fx.focus_set(masked, buffered, size)
    lo, hi = (0, len(x)) if fc["window_past_block"] else (bs, be)
    active = fx.active_rows(focus, fc["window"], lo, hi)
    mset = set(masked)
    cands = [p for p in active if bs <= p < be and p in mset]
    if not cands:
        return [], None
    extra = _extra_rows(ckpt, cands, active)
    rows = active + extra
    write = [True] * len(active) + [False] * len(extra)
    a_idx = list(range(len(active)))
    f_idx = [rows.index(f) for f in focus]
    n_blocks = -(-n_prompt // fc["block_size"])
    k_blocks = fx.n_keep_blocks(n_blocks, fc["keep_ratio"], fc["min_blocks"])
    sinks: list[int] = []

    def key_rule(i, q, k_layer):
        if i < fc["sink_layer"]:
            return None
        if i == fc["sink_layer"]:
            if fc["num_sinks"] > 0:
                scores = fx.sink_scores(q[:, a_idx], k_layer[:, :n_prompt])
                sinks.extend(fx.find_sinks(scores, fc["num_sinks"]))
            return None
        scores = fx.block_scores(q[:, f_idx], state["reps"][i], fc["per_head"])
        return fx.kept_keys(scores, n_prompt, len(x), fc["block_size"], k_blocks, sinks)

    hidden = rows_forward(ckpt, x, rows, state["k"], state["v"], write, key_rule)
    state["last_sinks"] = list(sinks)
    return cands, _logits_for(ckpt, cands, rows, hidden)


def generate(ckpt: Checkpoint, prompt: list[int], *, gen_length: int, block_length: int, steps: int,
             mode: str = "vanilla", cache: str = "dual", temperature: float = 0.0,
             remasking: str = "low_confidence", threshold: float | None = None,
             factor: float | None = None, seed: int = 0, focus: dict | None = None):
    """Decode `gen_length` tokens after `prompt` (SPEC.md Canvas and blocks, Transfer rules, Modes).

    mode: "vanilla" | "fastdllm" (cache "dual" or "prefix") | "focus" (dual cache underneath).
    Rules: fixed count (threshold and factor None; steps // num_blocks steps per block),
    threshold, or factor. Every step is one forward (nfe += 1); a block whose masks are gone ends.
    Returns (tokens: prompt + generation, nfe).
    """
    assert mode in ("vanilla", "fastdllm", "focus") and cache in ("dual", "prefix")
    assert remasking in ("low_confidence", "random")
    assert threshold is None or factor is None, "pick one transfer rule"
    assert gen_length % block_length == 0 and len(prompt) >= 1
    fc = None
    if mode == "focus":
        fc = {**fx.DEFAULTS, **(focus or {})}
        if fc["sink_layer"] is None:
            fc["sink_layer"] = ckpt.n_layers // 4  # our default where the paper is silent
        assert fc["window"] % 2 == 1 and 0 <= fc["sink_layer"] < ckpt.n_layers
    n_prompt, num_blocks = len(prompt), gen_length // block_length
    spb = steps // num_blocks
    fixed = threshold is None and factor is None
    assert not fixed or spb >= 1, "steps must give every block at least one step"
    x = list(prompt) + [ckpt.mask_id] * gen_length
    noise = Noise(seed, row=0)
    nfe = 0
    for b in range(num_blocks):
        bs, be = n_prompt + b * block_length, n_prompt + (b + 1) * block_length
        counts = fixed_counts(sum(x[p] == ckpt.mask_id for p in range(bs, be)), spb) if fixed else None
        state: dict = {"conf": {}}
        t = 0
        while any(x[p] == ckpt.mask_id for p in range(bs, be)) and (not fixed or t < spb):
            masked = [p for p in range(bs, be) if x[p] == ckpt.mask_id]
            rule_kw = {"count": counts[t]} if fixed else {"threshold": threshold, "factor": factor}
            if mode == "vanilla":
                cands, logits = _vanilla_step(ckpt, x, masked)
            elif t == 0:
                cands, logits = _refresh_step(ckpt, x, masked, state, n_prompt, fc)
            elif mode == "fastdllm":
                cands, logits = _cached_step(ckpt, x, masked, state, bs, be if cache == "dual" else len(x))
            else:
                cands, logits = _focus_step(ckpt, x, masked, state, n_prompt, (bs, be), fc, rule_kw)
            nfe += 1
            u, r = noise.draw(block_length, ckpt.vocab_size, temperature, remasking)
            if cands:
                rel = [p - bs for p in cands]
                x0, conf = predict(logits, ckpt.mask_id, temperature, None if u is None else u[rel])
                if r is not None:
                    conf = r[rel].tolist()
                for j in choose(conf, k=counts[t] if fixed else None, threshold=threshold, factor=factor):
                    x[cands[j]] = x0[j]
                state["conf"].update(zip(cands, conf))  # the focus confidence buffer (SPEC.md 1, 8)
            t += 1
    return x, nfe
