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


def response_importance(q, k, prompt_len, gen_length: int, prompt_host: list[int]) -> torch.Tensor:
    """Head-averaged attention probability the response rows give each prompt key: (B, P_max) float32.

    Args:
        q: (B, Hq, L, D), k: (B, Hkv, L, D) of one layer of the full forward (post-RoPE).
    """
    d = q.shape[-1]
    resp = prompt_len[:, None] + torch.arange(gen_length, device=q.device)  # (B, G)
    q_resp = q.gather(2, resp[:, None, :, None].expand(-1, q.shape[1], -1, d))  # (B, Hq, G, D)
    imp = sink_scores(q_resp, k[:, :, : max(prompt_host)], torch.ones_like(resp, dtype=torch.bool), prompt_len)
    return imp.masked_fill(imp.isnan(), NEG)


def kept_rows(imp, prompt_len, row_len, n: int, gen_length: int, keep_ratio: float, prompt_host: list[int]):
    """Rows that keep being computed: the top `keep_ratio` prompt rows by importance, the last prompt row
    and all response rows.

    Args:
        imp: (B, P_max) `response_importance`; n: canvas rows; prompt_len, row_len: (B,);
            prompt_host: the same prompt lengths on the host.
    Returns:
        (B, N) ascending canvas rows, N static (padding repeats the row's first response slot).
    """
    dev = imp.device
    p_max = max(prompt_host)
    n_keep = torch.tensor([math.ceil(keep_ratio * p) for p in prompt_host], device=dev)
    keep_p = stable_rank(imp) < n_keep[:, None]  # (B, P)
    slot = torch.arange(n, device=dev)[None, :]
    keep = (slot >= prompt_len[:, None] - 1) & (slot < row_len[:, None])  # response rows + the last prompt
    # row (Dream reads the first generated position's logits from it)
    keep[:, :p_max] |= keep_p & (slot[:, :p_max] < prompt_len[:, None])
    n_rows = min(n, max(math.ceil(keep_ratio * p) for p in prompt_host) + gen_length + 1)
    order = torch.where(keep, slot, n + slot).argsort(-1)[:, :n_rows]  # kept rows first, ascending
    real = torch.gather(keep, 1, order)
    return torch.where(real, order, prompt_len[:, None].expand(-1, n_rows))
