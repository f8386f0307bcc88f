"""Transfer rules on hand-worked cases (research/anchors.md §2.1-2.2, reference/SPEC.md)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from focusdllm.decode import schedule as S


def test_fixed_count_schedule_front_loads_remainder():
    assert S.num_transfer_tokens(10, 4) == [3, 3, 2, 2]
    assert S.num_transfer_tokens(32, 16) == [2] * 16
    assert S.num_transfer_tokens(5, 5) == [1] * 5


@given(st.integers(1, 64), st.integers(1, 64))
def test_schedule_sums_to_masks(n, steps):
    s = S.num_transfer_tokens(n, steps)
    assert sum(s) == n and max(s) - min(s) <= 1 and s == sorted(s, reverse=True)


def test_fixed_picks_top_k_among_candidates_ties_to_lower_index():
    conf = torch.tensor([[0.5, 0.9, 0.5, 0.95, 0.5]], dtype=torch.float64)
    cand = torch.tensor([[True, True, True, False, True]])
    got = S.transfer_fixed(conf, cand, torch.tensor([2]))
    assert got.tolist() == [[True, True, False, False, False]]  # 0.95 is not a candidate; tie -> index 0


def test_threshold_keeps_best_always_and_others_above():
    conf = torch.tensor([[0.2, 0.3, 0.1], [0.95, 0.91, 0.5]], dtype=torch.float64)
    cand = torch.ones(2, 3, dtype=torch.bool)
    got = S.transfer_threshold(conf, cand, 0.9)
    assert got.tolist() == [[False, True, False], [True, True, False]]


def test_factor_rule_hand_worked():
    # sorted: 0.9 (n=1 needs >= 1-1/2=0.5), 0.7 (n=2 needs >= 1-1/3=0.667), 0.6 (n=3 needs >= 0.75: stop)
    conf = torch.tensor([[0.6, 0.9, 0.7, 0.1]], dtype=torch.float64)
    cand = torch.ones(1, 4, dtype=torch.bool)
    assert S.factor_count(conf, cand, 1.0).tolist() == [2]
    assert S.transfer_factor(conf, cand, 1.0).tolist() == [[False, True, True, False]]
    low = torch.tensor([[0.01, 0.02]], dtype=torch.float64)
    assert S.transfer_factor(low, torch.ones(1, 2, dtype=torch.bool), 1.0).tolist() == [[False, True]]


def test_mask_token_never_sampled():
    logits = torch.zeros(1, 3, 10)
    logits[..., 7] = 100.0  # the mask id would win the argmax
    x0, conf = S.sample_tokens(logits, mask_id=7, temperature=0.0, remasking="low_confidence", generators=None)
    assert (x0 != 7).all() and torch.isfinite(conf).all()


def test_gumbel_is_seeded_per_row():
    logits = torch.randn(2, 4, 50)
    g1 = [torch.Generator().manual_seed(s) for s in (0, 1)]
    g2 = [torch.Generator().manual_seed(s) for s in (0, 1)]
    a, _ = S.sample_tokens(logits, 49, 1.0, "low_confidence", g1)
    b, _ = S.sample_tokens(logits, 49, 1.0, "low_confidence", g2)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="remasking"):
        S.sample_tokens(logits, 49, 0.0, "nope", None)


@given(st.integers(0, 10**6), st.booleans())
def test_greedy_confidence_is_the_softmax_probability_of_the_argmax(seed, ties):
    """The fused greedy path (no probability tensor) == float64 softmax gathered at the argmax, mask id excluded."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 40, generator=g) * 4
    if ties:
        logits[..., 3] = logits[..., 11] = logits.amax(-1) + 1.0  # two winners: the lower index is taken
    logits[0, 0, 9] = 1e4  # the mask id never wins
    x0, conf = S.greedy_confidence(logits.bfloat16(), 9)
    ref = logits.bfloat16().float().double()
    ref[..., 9] = float("-inf")
    want_x0 = ref.argmax(-1)
    want = torch.softmax(ref, -1).gather(-1, want_x0[..., None])[..., 0]
    assert torch.equal(x0, want_x0) and conf.dtype == torch.float64
    assert torch.allclose(conf, want, rtol=1e-12, atol=0)
