"""Transfer rules: which masked positions a step commits, and to which tokens (SPEC.md, Transfer rules).

Plain Python over small lists: every rule is a sort and a count. Conventions used everywhere:
* "stable top-k": sort by score descending with a stable sort (ties -> lower index first), take k.
* confidences are float64 softmax probabilities of the predicted token under the un-noised
  logits, with the mask id's logit set to -inf first (never emit the mask token; the official
  samplers can, research/sampler_quirks.md §1).
"""

from __future__ import annotations

import torch


def stable_topk(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores, ties broken towards the lower index (SPEC.md preamble)."""
    order = sorted(range(len(scores)), key=lambda j: -scores[j])  # Python's sort is stable
    return order[: max(0, k)]


def fixed_counts(n: int, steps_per_block: int) -> list[int]:
    """LLaDA's linear schedule (anchors.md §2.1): n // spb per step, the first n % spb steps get +1."""
    base, extra = divmod(n, steps_per_block)
    return [base + (1 if t < extra else 0) for t in range(steps_per_block)]


def factor_prefix_len(sorted_conf: list[float], factor: float) -> int:
    """Fast-dLLM's factor rule on confidences sorted descending: the longest prefix whose n-th
    (1-based) entry has confidence >= 1 - factor / (n + 1); the first is always taken.

    Choice (SPEC.md): the clean rule; Fast-dLLM's code also takes the last entry when only it
    fails. Thresholds grow with n and sorted confidences shrink, so "prefix" = "count".
    """
    m = 1 if sorted_conf else 0
    while m < len(sorted_conf) and sorted_conf[m] >= 1.0 - factor / (m + 2):
        m += 1
    return m


def choose(conf: list[float], k: int | None = None, threshold: float | None = None,
           factor: float | None = None) -> list[int]:
    """Indices (into `conf`, the candidates' confidences) to commit this step.

    Exactly one of: k (fixed count: stable top-k, fewer if fewer candidates), threshold (the best
    candidate always, plus every other with confidence >= threshold), factor (factor_prefix_len
    of the stably sorted confidences).
    """
    if not conf:
        return []
    order = stable_topk(conf, len(conf))
    if threshold is not None:
        return [j for r, j in enumerate(order) if r == 0 or conf[j] >= threshold]
    if factor is not None:
        return order[: factor_prefix_len([conf[j] for j in order], factor)]
    return order[:k]


class Noise:
    """The random stream of one batch row: a CPU torch.Generator seeded `seed + b` (b = 0 here).

    Per step (SPEC.md): temperature > 0 draws u = rand((block_length, V), float64); then
    remasking="random" draws r = rand((block_length,), float64). Both are indexed by
    block-relative position. Nothing is drawn when neither is needed.
    """

    def __init__(self, seed: int, row: int = 0):
        self.g = torch.Generator().manual_seed(seed + row)

    def draw(self, block_length: int, vocab: int, temperature: float, remasking: str):
        u = None
        r = None
        if temperature > 0:
            u = torch.rand((block_length, vocab), generator=self.g, dtype=torch.float64)
        if remasking == "random":
            r = torch.rand((block_length,), generator=self.g, dtype=torch.float64)
        return u, r


def predict(logits: torch.Tensor, mask_id: int, temperature: float, u: torch.Tensor | None):
    """Predicted token and low-confidence score of each candidate row.

    logits (C, V) (any dtype); u (C, V) float64 uniforms for these rows, or None at temperature 0.
    Steps: logits -> float64, mask id's logit -> -inf; x0 = argmax(exp(l) / (-log u)**T)
    (Gumbel-max as the LLaDA reference) or argmax(l) at T = 0; confidence = softmax(l)[x0].
    Returns (x0 list[int], conf list[float]).
    """
    lg = logits.to(torch.float64).clone()
    lg[:, mask_id] = float("-inf")
    if temperature > 0:
        noisy = lg.exp() / (-torch.log(u)) ** temperature
        x0 = noisy.argmax(dim=-1)
    else:
        x0 = lg.argmax(dim=-1)
    probs = torch.softmax(lg, dim=-1)
    conf = probs.gather(-1, x0[:, None])[:, 0]
    return x0.tolist(), conf.tolist()
