"""Beyond the paper: SlimInfer-style hidden-state pruning during the refresh / prefill forward.

After layer `prune_layer`, prompt rows that the response rows barely attend to stop being updated:
their hidden state is frozen, later layers still project it to K/V (so every key stays in the cache),
but skip their attention and MLP. Importance uses the sink machinery: the head-averaged attention
probability that the response rows give each prompt key at `prune_layer`.
"""

from __future__ import annotations

import math

import torch

from ..decode.schedule import NEG, stable_rank
from .sinks import sink_scores


def kept_rows(q, k, prompt_len, row_len, gen_length: int, keep_ratio: float, prompt_host: list[int]):
    """Rows that keep being computed: the top `keep_ratio` prompt rows by importance, the last prompt row
    and all response rows.

    Args:
        q: (B, Hq, L, D), k: (B, Hkv, L, D) of the prune layer (post-RoPE).
        prompt_len, row_len: (B,); prompt_host: the same prompt lengths on the host.
    Returns:
        (B, N) ascending canvas rows, N static (padding repeats the row's first response slot).
    """
    b, _, n, d = q.shape
    dev = q.device
    resp = prompt_len[:, None] + torch.arange(gen_length, device=dev)  # (B, G)
    q_resp = q.gather(2, resp[:, None, :, None].expand(-1, q.shape[1], -1, d))  # (B, Hq, G, D)
    p_max = max(prompt_host)
    imp = sink_scores(q_resp, k[:, :, :p_max], torch.ones_like(resp, dtype=torch.bool), prompt_len)  # (B, P)
    n_keep = torch.tensor([math.ceil(keep_ratio * p) for p in prompt_host], device=dev)
    keep_p = (stable_rank(imp.masked_fill(imp.isnan(), NEG)) < n_keep[:, None])  # (B, P)
    slot = torch.arange(n, device=dev)[None, :]
    keep = (slot >= prompt_len[:, None] - 1) & (slot < row_len[:, None])  # response rows + the last prompt
    # row (Dream reads the first generated position's logits from it)
    keep[:, :p_max] |= keep_p & (slot[:, :p_max] < prompt_len[:, None])
    n_rows = min(n, max(math.ceil(keep_ratio * p) for p in prompt_host) + gen_length + 1)
    order = torch.where(keep, slot, n + slot).argsort(-1)[:, :n_rows]  # kept rows first, ascending
    real = torch.gather(keep, 1, order)
    return torch.where(real, order, prompt_len[:, None].expand(-1, n_rows))
