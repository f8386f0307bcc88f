"""Beyond the paper: sink-aware block-sparse attention for the prompt queries of a prefill / refresh.

In layers after `prefill_layer`, each block of `q_block` query rows attends to
  * the top `prefill_sparse` fraction of prompt key blocks, scored by (mean query of the block) .
    (mean key of the key block), summed over heads (one set per query block, shared by all heads),
  * the key blocks around its own rows (the first / last row's block, +- `band` blocks),
  * the sinks: the `num_sinks` prompt keys the response rows attend to most at `prefill_layer`,
  * every response key;
and a query block holding any response row attends to every key (the rows that decode stay dense).
On the flex backend the BlockMask is built from the per-query-block lists (`attention/flex.py`); the
torch backend materialises the mask (B, rows, Cap) for 2048 query rows at a time (the plain reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch.nn.attention.flex_attention import BlockMask

from ..attention.flex import Q_BLOCK, block_lists, kernel_options, run_flex
from ..attention.selection import block_counts
from ..compiled import compiled_on_cuda
from .selection import block_representatives, top_blocks


def query_block_keep(q, k, rows, prompt_len, n_keep, band: int, block_size: int, n_blocks_host: int, cap: int):
    """Kept key blocks of every query block.

    Args:
        q: (B, Hq, N, D) queries of canvas rows `rows` (B, N) (ascending); k: (B, Hkv, Cap, D) cache keys.
        prompt_len: (B,); n_keep: (B,) top-scored prompt blocks per query block.
    Returns:
        (B, NQ, NB) bool, NQ = ceil(N / Q_BLOCK), NB = Cap // block_size.
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    nq, nb = -(-n // Q_BLOCK), cap // block_size
    pad = nq * Q_BLOCK - n
    qf = F.pad(q.float(), (0, 0, 0, pad))  # (B, Hq, NQ * Qb, D), zero rows past N
    rows_in = (n - torch.arange(nq, device=q.device) * Q_BLOCK).clamp(max=Q_BLOCK)  # (NQ,) real rows per block
    # mean query of each block per query head, summed within each KV-head group: (B, Hkv, NQ, D)
    qm = reduce(qf, "b (h g) (n q) d -> b h n d", "sum", h=hkv, q=Q_BLOCK) / rows_in[:, None]
    rep = block_representatives(k, prompt_len, block_size, n_blocks_host).float()  # (B, Hkv, NBp, D)
    scores = torch.einsum("bhnd,bhkd->bnk", qm, rep)  # (B, NQ, NBp): one set per query block
    n_blocks_row = (prompt_len + block_size - 1) // block_size
    keep = top_blocks(scores, n_keep, n_blocks_row, nb)  # (B, NQ, NB)
    rows_p = F.pad(rows, (0, pad), value=-1)  # (B, NQ * Qb)
    first, last = rows[:, ::Q_BLOCK], rows_p.view(b, nq, Q_BLOCK).amax(-1)  # (B, NQ)
    kb = torch.arange(nb, device=q.device)
    near = (kb >= (first // block_size - band)[..., None]) & (kb <= (last // block_size + band)[..., None])
    dense = (last >= prompt_len[:, None])[..., None]  # query block holds a response row
    return keep | near | dense


def prefill_mask_mod(block_keep, token_keep, valid, block_size: int):
    """Token-level semantics of the prefill selection: (kept block of this query block | token kept) & valid."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (block_keep[b, q_idx // Q_BLOCK, kv_idx // block_size] | token_keep[b, kv_idx]) & valid[b, kv_idx]

    return mask_mod


def prefill_block_mask(block_keep, token_keep, valid, block_size: int, n_rows: int) -> BlockMask:
    """BlockMask with a block list per query block (full: kept blocks of valid keys; partial: sinks, ragged)."""
    vc, tc = block_counts(token_keep[:, None, :], valid, block_size)  # (B, 1, NB) each
    lists = compiled_on_cuda(block_lists)(block_keep, vc, tc, block_size, 1, 1)  # (B, NQ, 1[, W])
    lists = [rearrange(x, "b n 1 ... -> b 1 n ...").contiguous() for x in lists]  # (B, 1, NQ[, W])
    return BlockMask.from_kv_blocks(
        *lists, BLOCK_SIZE=(Q_BLOCK, block_size), mask_mod=prefill_mask_mod(block_keep, token_keep, valid, block_size),
        seq_lengths=(n_rows, valid.shape[1]), compute_q_blocks=False,
    )


def sparse_prefill_attention(q, k, v, block_keep, token_keep, valid, block_size: int, backend: str):
    """Attention of prefill queries q (B, Hq, N, D) over cache k, v (B, Hkv, Cap, D) restricted to the
    per-query-block selection; backend "flex" (compiled) or "torch" (materialised mask)."""
    if backend == "flex":
        mask = prefill_block_mask(block_keep, token_keep, valid, block_size, q.shape[2])
        return run_flex(q, k, v, mask, kernel_options=kernel_options(q.device, block_size, q.shape[2]))
    out = torch.empty_like(q)
    step = 16 * Q_BLOCK  # query rows per chunk: the (B, rows, Cap) mask stays small at any length
    for r0 in range(0, q.shape[2], step):
        r1 = min(r0 + step, q.shape[2])
        blk = block_keep[:, r0 // Q_BLOCK : -(-r1 // Q_BLOCK)].repeat_interleave(Q_BLOCK, 1)[:, : r1 - r0]
        keep = (blk.repeat_interleave(block_size, -1) | token_keep[:, None, :]) & valid[:, None, :]  # (B, rows, Cap)
        out[:, :, r0:r1] = F.scaled_dot_product_attention(
            q[:, :, r0:r1], k, v, attn_mask=keep[:, None], enable_gqa=q.shape[1] != k.shape[1]
        )
    return out
