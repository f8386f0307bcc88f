"""Focus selection pieces in the library: block summaries, density, sinks and block scores."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from focusdllm.attention.selection import KeySelection, block_counts
from focusdllm.focus.selection import block_bounds, block_representatives, block_scores
from focusdllm.focus.sinks import sink_scores, top_sinks


@given(st.integers(0, 10**6), st.sampled_from([16, 32]), st.integers(1, 3), st.sampled_from([1, 4]))
def test_density_from_block_counts_is_exact(seed, bs, b, hs):
    g = torch.Generator().manual_seed(seed)
    nb = 6
    cap = nb * bs
    valid = torch.arange(cap)[None] < torch.randint(1, cap, (b, 1), generator=g)
    blk = torch.rand(b, hs, nb, generator=g) < 0.4
    tok = torch.rand(b, 1, cap, generator=g) < 0.2
    sel = KeySelection(blk, tok.expand(b, hs, -1), valid, bs)
    expect = sel.dense_mask().float().sum(-1).mean(1) / valid.float().sum(-1)
    assert torch.allclose(sel.density(), expect)
    pre = KeySelection(blk, tok.expand(b, hs, -1), valid, bs, block_counts(tok, valid, bs))
    assert torch.allclose(pre.density(), expect)


def test_planted_sink_and_relevant_block_are_found():
    torch.manual_seed(0)
    b, h, t, d, p = 1, 2, 3, 8, 64
    q = torch.randn(b, h, t, d)
    k = torch.randn(b, h, p, d) * 0.1
    k[:, :, 37] = q.mean(2) * 10  # every query loves key 37
    s = sink_scores(q, k, torch.ones(b, t, dtype=torch.bool), torch.tensor([p]))
    assert top_sinks(s, 1, torch.tensor([p]))[0].nonzero().item() == 37
    rep = block_representatives(k, torch.tensor([p]), 16, 4)  # (B, H, 4, D)
    sc = block_scores(q, torch.ones(b, t, dtype=torch.bool), rep, per_head=True)
    assert (sc.argmax(-1) == 37 // 16).all()


@given(st.integers(0, 10**6))
def test_bound_score_upper_bounds_every_key_and_finds_a_lone_needle(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, t, d, p, bs = 1, 2, 3, 8, 64, 16
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, h, p, d, generator=g)
    plen = torch.tensor([p - 5])
    bounds = block_bounds(k, plen, bs, 4)  # (B, H, 4, 2D) [kmax | kmin]
    assert bounds.dtype == torch.float32 and bounds.shape == (b, h, 4, 2 * d)
    focus = torch.ones(b, t, dtype=torch.bool)
    bound = block_scores(q, focus, bounds, per_head=True)  # (B, H, 4)
    exact = torch.einsum("bhtd,bhpd->bhtp", q, k)[..., : p - 5].amax(2)  # best q.k per key
    for j in range(4):
        lo, hi = j * bs, min((j + 1) * bs, p - 5)
        assert (bound[..., j] >= exact[..., lo:hi].amax(-1) - 1e-5).all()


def test_bound_score_sees_a_needle_that_the_mean_dilutes():
    torch.manual_seed(1)
    b, h, t, d, p, bs = 1, 1, 1, 16, 128, 64
    q = torch.zeros(b, h, t, d)
    q[..., 0] = 1.0
    k = torch.randn(b, h, p, d) * 0.3
    k[..., 0] = -0.5  # filler keys point away from the query ...
    k[:, :, 100, 0] = 8.0  # ... except one needle in block 1
    k[:, :, :64, 0] = -0.1  # block 0 is mildly negative everywhere: its mean beats block 1's
    plen = torch.tensor([p])
    focus = torch.ones(b, t, dtype=torch.bool)
    mean_s = block_scores(q, focus, block_representatives(k, plen, bs, 2), per_head=True)
    bound_s = block_scores(q, focus, block_bounds(k, plen, bs, 2), per_head=True)
    assert mean_s.argmax(-1).item() == 0 and bound_s.argmax(-1).item() == 1


def test_block_summaries_are_updated_in_place():
    """A refresh's block summaries land in the tensors captured CUDA graphs read (not a new, freed-later buffer)."""
    from focusdllm.cache import KVCache

    cache = KVCache(2, 1, 2, 64, 8, torch.float32, torch.device("cpu"))
    first = torch.zeros(1, 2, 4, 16)  # bounds: [kmax | kmin]
    cache.set_block_rep(1, first)
    cache.set_block_rep(1, torch.full((1, 2, 4, 16), 3.0))
    assert cache.block_rep[1] is first and bool((first == 3).all())
    mean = torch.zeros(1, 2, 4, 8)
    cache.set_block_rep(0, mean)
    cache.set_block_rep(0, torch.ones(1, 2, 4, 8))
    assert cache.block_rep[0] is mean and bool((mean == 1).all())
    cache.set_block_rep(0, torch.ones(1, 2, 5, 8))  # a new shape (another canvas) replaces the buffer
    assert cache.block_rep[0].shape[2] == 5
