"""Network passes of the decode loop: the full (refresh / vanilla) forward and the row step.

A row step computes only `StepRows.rows` against the cache. Layers 0..sink_layer attend to every
valid key; at sink_layer the sinks are found once and reused by every later layer, which attends
to top-K prompt blocks ∪ sinks ∪ all response keys (DESIGN.md steps 4-6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..attention.backend import sparse_attention
from ..attention.selection import KeySelection, block_counts, kept_density
from ..cache import KVCache
from ..compiled import compiled_on_cuda
from ..focus.indicator import StepRows
from ..focus.prefill import kept_rows, response_importance
from ..focus.selection import block_bounds, block_representatives, pick_blocks
from ..focus.sinks import sink_scores, top_sinks
from ..focus.sparse_prefill import query_block_keep, sparse_prefill_attention
from ..models.transformer import DiffusionLM, dense_attention


def short_query_kernels():
    """SDPA backends for a few queries over a long cache: flash (split over keys) before cuDNN.

    H100, 32K keys, 6-32 queries: flash 0.19 ms vs the default cuDNN pick 0.42-0.69 ms
    (bench/results/probe_dense_h100.json)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass
class Canvas:
    """The compacted batch: row b holds its prompt (left padding removed) at slots [0, P_b), its
    G generation slots after it, then unused slots. Positions (RoPE) are slot indices.

    Attributes:
        x: (B, L) tokens, L = max P_b + G.
        prompt_len, row_len: (B,) prompt length and P_b + G.
        valid: (B, Cap) bool slot holds a real token; Cap >= L + 1 (the last slot is scratch).
        padded: some row is shorter than L (dense attention then needs the valid mask).
    """

    x: torch.Tensor
    prompt_len: torch.Tensor
    row_len: torch.Tensor
    valid: torch.Tensor
    gen_length: int
    padded: bool
    max_prompt: int
    prompt_host: list[int]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    def kv_valid(self, n: int) -> torch.Tensor | None:
        return self.valid[:, :n] if self.padded else None


@dataclass
class SparsePlan:
    """Per-generate constants of Focus-dLLM's sparse layers."""

    sink_layer: int
    num_sinks: int
    per_head: bool
    block_size: int
    n_blocks_host: int  # prompt blocks of the longest prompt
    n_blocks_row: torch.Tensor  # (B,)
    n_keep: torch.Tensor  # (B,) K per row
    response: torch.Tensor  # (B, Cap) bool: slots [P_b, P_b + G)
    backend: str  # in-block steps
    prefill_backend: str  # sparse prefill (long queries)
    prefill_keep: float  # fraction of prompt rows the refresh keeps computing after prefill_layer
    prefill_layer: int
    prefill_sparse: float  # fraction of prompt key blocks a prompt query block attends to after prefill_layer
    prefill_band: int  # key blocks kept either side of a query block's own rows
    n_keep_prefill: torch.Tensor  # (B,) top-scored prompt key blocks per query block
    block_score: str  # "mean" (paper: mean-pooled key) or "bound" (channel-wise min/max bound)
    max_keys: int  # static bound on kept keys per row (keeps the gather backend sync-free)
    record: bool = False  # keep the step's sinks / kept blocks for callbacks
    last: dict = field(default_factory=dict)


@dataclass
class StepStats:
    """Device-side accumulators (no host sync inside the loop)."""

    density_sum: torch.Tensor  # (n_layers,) sum over sparse steps of mean attended-key density
    sparse_steps: int = 0
    active_rows: int = 0
    row_steps: int = 0


def set_block_rep(cache: KVCache, i: int, canvas: Canvas, plan: SparsePlan) -> None:
    """Layer i's prompt-block summaries for the sparse steps' block scores: one fused pass over its keys."""
    rep = block_bounds if plan.block_score == "bound" else block_representatives
    cache.set_block_rep(i, compiled_on_cuda(rep)(cache.k[i], canvas.prompt_len, plan.block_size, plan.n_blocks_host))


def full_forward(model: DiffusionLM, canvas: Canvas, cache: KVCache | None, rep_plan: SparsePlan | None):
    """Dense forward over the whole canvas (vanilla step or cache refresh). Returns (B, L, C).

    With a Focus plan, layers after `prefill_layer` may compute only the kept prompt rows
    (`prefill_keep`, focus/prefill.py) and attend block-sparsely (`prefill_sparse`, focus/sparse_prefill.py).
    """
    b, n = canvas.x.shape
    pos = torch.arange(n, device=canvas.x.device).expand(b, -1)
    cos, sin = model.rope.cos_sin(pos, model.dtype)
    valid = canvas.kv_valid(n)
    h = model.embed(canvas.x)
    plan = rep_plan
    prune = plan is not None and plan.prefill_keep < 1.0
    sparse = plan is not None and cache is not None and plan.prefill_sparse < 1.0
    keep = None  # (B, N) rows still computed after the prune layer (focus/prefill.py)
    token_keep = None  # (B, Cap) sinks + response keys of the sparse prefill
    for i, blk in enumerate(model.blocks):
        if cache is None:
            q, k, v = blk.qkv(h, model.rope, cos, sin, q_rows=keep)  # pruned rows: keys and values only
        else:  # K/V go straight into the cache (no copy of the layer's K/V); attention reads them there
            q = blk.qkv_into(h, model.rope, cos, sin, cache.k[i], cache.v[i], pos, q_rows=keep)
            k, v = cache.k[i, :, :, :n], cache.v[i, :, :, :n]
            if plan is not None and i > plan.sink_layer:
                set_block_rep(cache, i, canvas, plan)
        if token_keep is not None:  # block-sparse prompt queries against the cache
            rows = pos if keep is None else keep
            bk = compiled_on_cuda(query_block_keep)(q, cache.k[i], rows, canvas.prompt_len, plan.n_keep_prefill,
                                                    plan.prefill_band, plan.block_size, plan.n_blocks_host,
                                                    canvas.valid.shape[1])
            o = sparse_prefill_attention(q, cache.k[i], cache.v[i], bk, token_keep, canvas.valid,
                                         plan.block_size, plan.prefill_backend)
        else:
            o = dense_attention(q, k, v, valid)
        if keep is None:
            h = blk.finish(h, o)
        else:  # pruned prompt rows: K/V from their frozen hidden state, no attention or MLP
            idx = keep[..., None].expand(-1, -1, h.shape[-1])  # (B, N, C)
            h.scatter_(1, idx, blk.finish(h.gather(1, idx), o))
        if (prune or sparse) and i == plan.prefill_layer:
            imp = response_importance(q, k, canvas.prompt_len, canvas.gen_length, canvas.prompt_host)
            if prune:
                keep = kept_rows(imp, canvas.prompt_len, canvas.row_len, n, canvas.gen_length, plan.prefill_keep,
                                 canvas.prompt_host)
            if sparse:
                token_keep = plan.response.clone()
                if plan.num_sinks > 0:
                    token_keep[:, : imp.shape[1]] |= top_sinks(imp, plan.num_sinks, canvas.prompt_len)
    return h


def row_forward(
    model: DiffusionLM,
    canvas: Canvas,
    cache: KVCache,
    rows: StepRows,
    plan: SparsePlan | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `rows` through the network against the cache; their K/V are written first (in place).

    No host syncs, static shapes for a given row count: CUDA-graph capturable (decode/graphs.py).
    Returns the last layer's output for the rows (B, T, C) and the mean attended-key density per
    layer (n_layers,) (0 for dense layers).
    """
    n = canvas.length
    cos, sin = model.rope.cos_sin(rows.rows, model.dtype)
    h = model.embed(torch.gather(canvas.x, 1, rows.rows))
    valid = canvas.kv_valid(n)
    token_keep = counts = None
    n_layers = len(model.blocks)
    density = torch.zeros(n_layers, device=h.device)
    kept = []  # block_keep of each sparse layer; densities are computed once after the loop
    slots = cache.slots(rows.rows, rows.write)  # (B, T)
    for i, blk in enumerate(model.blocks):
        q = blk.qkv_into(h, model.rope, cos, sin, cache.k[i], cache.v[i], slots)  # K/V written in place
        if plan is None or i <= plan.sink_layer:
            with short_query_kernels():
                o = dense_attention(q, cache.k[i, :, :, :n], cache.v[i, :, :, :n], valid)
            if plan is not None and i == plan.sink_layer and i < n_layers - 1:
                token_keep = plan.response
                if plan.num_sinks > 0:
                    p = plan.n_blocks_host * plan.block_size
                    s = compiled_on_cuda(sink_scores)(q, cache.k[i, :, :, :p], rows.active, canvas.prompt_len)
                    sinks = top_sinks(s, plan.num_sinks, canvas.prompt_len)  # (B, p)
                    token_keep = token_keep.clone()
                    token_keep[:, :p] |= sinks
                    if plan.record:
                        plan.last["sinks"] = sinks
                token_keep = token_keep[:, None, :]  # (B, 1, Cap)
                counts = block_counts(token_keep, canvas.valid, plan.block_size)  # once per step
        else:
            nb = canvas.valid.shape[1] // plan.block_size
            block_keep = compiled_on_cuda(pick_blocks)(
                q, rows.focus, cache.block_rep[i], plan.per_head, plan.n_keep, plan.n_blocks_row, nb
            )  # (B, Hs, NB): one fused kernel chain on CUDA
            sel = KeySelection(block_keep, token_keep.expand(-1, block_keep.shape[1], -1), canvas.valid,
                               plan.block_size, counts)
            o = sparse_attention(q, cache.k[i], cache.v[i], sel, plan.backend, max_keys=plan.max_keys)
            kept.append(block_keep)
            if plan.record:
                plan.last.setdefault("kept_blocks", {})[i] = sel.block_keep
        h = blk.finish(h, o)
    if kept:  # sparse layers are the last len(kept): their densities in a few kernels, not a few per layer
        vc, tc = counts
        density[n_layers - len(kept):] = kept_density(torch.stack(kept, 1), vc, tc).mean(0)
    return h, density
