"""Compiled FlexAttention (CPU C++ template) equals gather + SDPA and dense attention on the kept keys.

Shapes come from a small fixed list so each compiles once (2-4 s each); selection values and valid
lengths vary freely, which must never recompile (fixed KV capacity).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from focusdllm.attention import KeySelection, masked_attention
from focusdllm.attention import flex as flex_mod
from focusdllm.attention.backend import sparse_attention
from focusdllm.attention.flex import (
    FlexFallbackError,
    build_block_mask,
    compiled_variants,
    flex_available,
    flex_sparse_attention,
    kv_block_lists,
    mask_kv_block,
    run_flex,
)
from focusdllm.attention.gather import gather_attention

pytestmark = pytest.mark.skipif(not flex_available("cpu")[0], reason=flex_available("cpu")[1])

CAP, BS, D = 256, 32, 16
# (B, Hq, Hkv, Hs, T): MHA per-head; GQA packed per-KV-head / shared; GQA unpacked (G*T > 128); 2 Q tiles
SHAPES = [(1, 4, 4, 4, 8), (2, 4, 2, 2, 8), (2, 4, 2, 1, 8), (1, 4, 2, 2, 70), (1, 2, 2, 1, 130)]


def make_case(seed, b, hq, hkv, hs, t, p_block=0.3, n_sinks=3, n_resp=5, dtype=torch.float32, bs=BS):
    """Random q/k/v and a selection: blocks, sinks (in and out of kept blocks), response keys, ragged length."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, D, generator=g, dtype=torch.float64) for h, n in ((hq, t), (hkv, CAP), (hkv, CAP)))
    lens = torch.randint(n_resp + 1, CAP + 1, (b,), generator=g)  # non-multiple valid lengths
    valid = torch.arange(CAP)[None] < lens[:, None]  # (B, Cap)
    block_keep = torch.rand(b, hs, CAP // bs, generator=g) < p_block
    token_keep = torch.zeros(b, hs, CAP, dtype=torch.bool)
    for i in range(b):
        prompt = int(lens[i]) - n_resp
        token_keep[i].scatter_(-1, torch.randint(0, prompt, (hs, n_sinks), generator=g), True)  # sinks
        token_keep[i, :, prompt : int(lens[i])] = True  # response positions
    return q.to(dtype), k.to(dtype), v.to(dtype), KeySelection(block_keep, token_keep, valid, bs)


def ref64(q, k, v, sel):
    return masked_attention(q.double(), k.double(), v.double(), sel.dense_mask())


@pytest.fixture(autouse=True)
def _inference():
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=32):
        yield


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES), p_block=st.floats(0.0, 1.0))
def test_flex_equals_gather_equals_dense_fp32(seed, shape, p_block):
    q, k, v, sel = make_case(seed, *shape, p_block=p_block)
    ref = ref64(q, k, v, sel)
    out = flex_sparse_attention(q, k, v, sel)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, gather_attention(q, k, v, sel), atol=1e-5, rtol=0)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES[:3]), bs=st.sampled_from([64, 128]),
       p_block=st.floats(0.0, 1.0), p_run=st.floats(0.0, 0.5))
def test_sub_block_tiles_equal_dense(seed, shape, bs, p_block, p_run):
    """64/128-key selection blocks run as 16-key mask tiles on CPU (`mask_kv_block`): still exact, with
    ragged valid lengths, lone sinks and whole token-kept tiles (full tiles outside kept blocks)."""
    q, k, v, sel = make_case(seed, *shape, p_block=p_block, bs=bs)
    g = torch.Generator().manual_seed(seed)
    run = (torch.rand(*sel.token_keep.shape[:2], CAP // 32, 1, generator=g) < p_run).expand(-1, -1, -1, 32)
    sel.token_keep |= run.flatten(-2)  # (B, Hs, Cap): some whole 32-key tiles token-kept
    out = flex_sparse_attention(q, k, v, sel)
    torch.testing.assert_close(out.double(), ref64(q, k, v, sel), atol=1e-5, rtol=0)


def test_mask_kv_block():
    assert mask_kv_block(torch.device("cpu"), 64) == 16 and mask_kv_block(torch.device("cpu"), 32) == 16
    assert mask_kv_block(torch.device("cpu"), 16) == 16 and mask_kv_block(torch.device("cpu"), 40) == 40
    assert mask_kv_block(torch.device("cuda"), 64) == 64
    with pytest.raises(ValueError, match="must divide"):
        build_block_mask(make_case(0, *SHAPES[0])[3], 8, 4, kv_block=12)


def _partial(q, k, v, keep):
    """Attention of q over the keys in `keep` (B, 1, S) and its log-sum-exp, in float64."""
    logits = torch.einsum("bhtd,bhsd->bhts", q.double(), k.double()) / q.shape[-1] ** 0.5
    logits = logits.masked_fill(~keep[:, :, None, :], float("-inf"))
    return torch.einsum("bhts,bhsd->bhtd", logits.softmax(-1).nan_to_num(0.0), v.double()), logits.logsumexp(-1)


@pytest.mark.parametrize("splits", [2, 3, 4])
def test_merge_splits_equals_dense(splits):
    """Log-sum-exp merge of attention over disjoint key subsets == attention over their union (one empty)."""
    g = torch.Generator().manual_seed(splits)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (5, 40, 40))
    owner = torch.randint(0, splits - 1, (2, 1, 40), generator=g)  # split splits-1 gets no key
    parts = [_partial(q, k, v, owner == s) for s in range(splits)]
    out = torch.cat([o for o, _ in parts], 2)  # (B, H, S * T, D)
    lse = torch.cat([x for _, x in parts], 2)
    full = flex_mod.merge_splits(out, lse, splits, 5)
    torch.testing.assert_close(full, _partial(q, k, v, torch.ones(2, 1, 40, dtype=torch.bool))[0])
    naive = out.unflatten(2, (splits, -1)).mean(2)  # the planted bug: average instead of lse weights
    assert (naive - full).abs().max() > 1e-2


def test_split_kv_needs_lse_on_cpu():
    q, k, v, sel = make_case(11, *SHAPES[0])
    with pytest.raises(ValueError, match="splits=1"):
        flex_sparse_attention(q, k, v, sel, splits=2)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), splits=st.integers(1, 5), repeat=st.sampled_from([1, 3]))
def test_kv_block_lists_deal_round_robin(seed, splits, repeat):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(2, 2, 13, generator=g) < 0.4
    counts, ids = kv_block_lists(blocks, splits, repeat)
    assert counts.shape == (2, 2 * repeat, splits) and ids.shape == (2, 2 * repeat, splits, -(-13 // splits))
    for b in range(2):
        for h in range(2 * repeat):
            kept = torch.nonzero(blocks[b, h // repeat]).flatten().tolist()
            for s in range(splits):
                assert ids[b, h, s, : counts[b, h, s]].tolist() == kept[s::splits]


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES[:2]))
def test_flex_bf16_flash_rule(seed, shape):
    q, k, v, sel = make_case(seed, *shape, dtype=torch.bfloat16)
    ref = ref64(q, k, v, sel)
    plain = masked_attention(q, k, v, sel.dense_mask())
    base = (plain.double() - ref).abs().max()
    for fast in (flex_sparse_attention(q, k, v, sel), gather_attention(q, k, v, sel)):
        err = (fast.double() - ref).abs().max()
        assert err <= 2 * base + 1e-3, (err, base)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_budget_all_equals_dense(shape):
    q, k, v, sel = make_case(1, *shape)
    sel.block_keep[:] = True
    sel.valid[:] = True
    dense = F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    torch.testing.assert_close(flex_sparse_attention(q, k, v, sel), dense, atol=1e-5, rtol=0)


def test_eager_flex_is_correct_without_indices():
    """The mask_mod alone carries the selection: the eager path (which ignores block indices) is right."""
    q, k, v, sel = make_case(5, *SHAPES[1])
    out = flex_sparse_attention(q, k, v, sel, compiled=False)
    torch.testing.assert_close(out.double(), ref64(q, k, v, sel), atol=1e-5, rtol=0)


def test_auto_backend_uses_flex_on_cpu():
    q, k, v, sel = make_case(6, *SHAPES[0])
    torch.testing.assert_close(sparse_attention(q, k, v, sel, "auto"), flex_sparse_attention(q, k, v, sel))
    torch.testing.assert_close(sparse_attention(q, k, v, sel, "flex"), flex_sparse_attention(q, k, v, sel))


def test_no_recompile_over_valid_lengths():
    """Fixed capacity: 10 valid lengths and new selections reuse one compiled variant."""
    flex_sparse_attention(*make_case(0, *SHAPES[1]))  # warm-up (compiled once per shape)
    n0 = compiled_variants()
    assert n0 >= 1
    for i, length in enumerate(range(20, CAP + 1, 24)):
        q, k, v, sel = make_case(100 + i, *SHAPES[1])
        sel.valid[:] = torch.arange(CAP)[None] < length
        sel.token_keep[:, :, length - 5 : length] = True
        out = flex_sparse_attention(q, k, v, sel)
        torch.testing.assert_close(out.double(), ref64(q, k, v, sel), atol=1e-5, rtol=0)
    assert compiled_variants() == n0


def test_planted_bug_is_caught():
    """A mask_mod that drops token_keep (sinks, response) must make the flex output differ."""
    q, k, v, sel = make_case(7, *SHAPES[0])
    bs, blk, valid = sel.block_size, sel.block_keep, sel.valid

    def broken(b, h, q_idx, kv_idx):
        return blk[b, h, kv_idx // bs] & valid[b, kv_idx]

    ref = ref64(q, k, v, sel)
    good = run_flex(q, k, v, build_block_mask(sel, q.shape[2], q.shape[1]))
    bad = run_flex(q, k, v, build_block_mask(sel, q.shape[2], q.shape[1], mask_mod=broken))
    torch.testing.assert_close(good.double(), ref, atol=1e-5, rtol=0)
    assert (bad.double() - ref).abs().max() > 1e-2


def test_detects_force_eager():
    q, k, v, sel = make_case(8, *SHAPES[0])
    with torch.compiler.set_stance("force_eager"), pytest.raises(FlexFallbackError, match="eagerly"):
        flex_sparse_attention(q, k, v, sel)


def test_detects_recompile_limit():
    """New shapes beyond the recompile limit raise instead of silently running eager flex."""
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            flex_sparse_attention(*make_case(9, *SHAPES[0]))
            q, k, v, sel = make_case(9, *SHAPES[0])
            half = KeySelection(sel.block_keep[..., :4], sel.token_keep[..., :128], sel.valid[:, :128], BS)
            with pytest.raises(FlexFallbackError, match="recompile_limit"):
                flex_sparse_attention(q, k[:, :, :128], v[:, :, :128], half)  # capacity changed
    finally:
        torch._dynamo.reset()
