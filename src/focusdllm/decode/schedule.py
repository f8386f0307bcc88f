"""Transfer rules: which masked positions are committed at a step (research/anchors.md §2.1-2.2).

All functions work on block-relative tensors (B, bl) and never leave the device.
"""

from __future__ import annotations

import torch

from ..compiled import compiled_on_cuda

NEG = float("-inf")


def num_transfer_tokens(n_masked: int, steps: int) -> list[int]:
    """Fixed-count schedule: n // steps per step, the first n % steps steps get one more."""
    base, rem = divmod(n_masked, steps)
    return [base + (1 if t < rem else 0) for t in range(steps)]


def stable_rank(score: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim when sorted descending, ties to the lower index."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return rank


def sample_tokens(
    logits: torch.Tensor,
    mask_id: int,
    temperature: float,
    remasking: str,
    generators: list[torch.Generator] | None,
    draw: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, bl, V) (any float dtype) -> tokens x0 (B, bl) and confidence (B, bl) float64.

    The mask id can never win (the official samplers let it). temperature > 0 is Gumbel-max in
    float64 with per-row noise `rand((bl, V))`; confidence is the float64 softmax probability of
    x0 under the un-noised logits ("low_confidence") or a per-row uniform draw ("random").
    `draw[b] = False` skips row b's draws (a row whose block is done keeps its random stream where
    it would be if it ran alone).
    """
    if temperature == 0 and remasking == "low_confidence":
        return compiled_on_cuda(greedy_confidence)(logits, mask_id)  # one fused pass on CUDA
    logits = _masked_fp32(logits, mask_id)
    draw = [True] * logits.shape[0] if draw is None else draw

    def rand(shape, g, d):
        if d:
            return torch.rand(shape, generator=g, dtype=torch.float64, device=logits.device)
        return torch.full(shape, 0.5, dtype=torch.float64, device=logits.device)

    if temperature > 0:
        noise = torch.stack([rand(logits.shape[1:], g, d) for g, d in zip(generators, draw)])  # (B, bl, V)
        noisy = logits.double().exp() / (-torch.log(noise)) ** temperature
        x0 = noisy.argmax(-1)
    else:
        x0 = logits.argmax(-1)
    if remasking == "low_confidence":
        p = torch.softmax(logits.double(), -1)
        conf = p.gather(-1, x0[..., None])[..., 0]
    elif remasking == "random":
        conf = torch.stack([rand((logits.shape[1],), g, d) for g, d in zip(generators, draw)])
    else:
        raise ValueError(f"remasking={remasking!r}: use 'low_confidence' or 'random'")
    return x0, conf


def transfer_fixed(conf: torch.Tensor, cand: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Commit the k (B,) most confident candidates per row (stable top-k)."""
    score = conf.masked_fill(~cand, NEG)
    k = torch.minimum(k, cand.sum(-1))
    return (stable_rank(score) < k[:, None]) & cand


def transfer_threshold(conf: torch.Tensor, cand: torch.Tensor, threshold: float) -> torch.Tensor:
    """Commit the best candidate always, plus every other candidate with confidence >= threshold."""
    score = conf.masked_fill(~cand, NEG)
    best = (stable_rank(score) == 0) & cand
    return best | (cand & (conf >= threshold))


def factor_count(conf: torch.Tensor, cand: torch.Tensor, factor: float) -> torch.Tensor:
    """Length of the longest sorted prefix whose n-th (1-based) entry has conf >= 1 - f/(n+1); >= 1."""
    score = conf.masked_fill(~cand, NEG)
    srt = torch.sort(score, dim=-1, descending=True, stable=True).values
    n = torch.arange(1, srt.shape[-1] + 1, device=conf.device, dtype=torch.float64)
    ok = srt >= 1.0 - factor / (n + 1.0)
    prefix = torch.cumprod(ok.long(), -1).sum(-1)
    return prefix.clamp(min=1)


def transfer_factor(conf: torch.Tensor, cand: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM's factor rule: commit the longest confident prefix (at least the best one)."""
    return transfer_fixed(conf, cand, factor_count(conf, cand, factor))


def greedy_confidence(logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax token and its float64 softmax probability, without the (B, bl, V) probability tensor.

    At the argmax, softmax_x0 = exp(0) / sum_j exp(l_j - max) (the official samplers' value, same formula)."""
    logits = _masked_fp32(logits, mask_id)  # (B, bl, V)
    x0 = logits.argmax(-1)
    ld = logits.double()
    conf = 1.0 / torch.exp(ld - ld.amax(-1, keepdim=True)).sum(-1)
    return x0, conf


def _masked_fp32(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """An fp32 copy of logits (B, bl, V) in which the mask id can never win."""
    out = logits.to(torch.float32, copy=True)
    out[..., mask_id] = NEG
    return out
