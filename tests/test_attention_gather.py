"""gather + SDPA sparse attention equals dense attention restricted to the selected keys."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from focusdllm.attention import KeySelection, masked_attention
from focusdllm.attention import gather as gather_mod
from focusdllm.attention.backend import resolve_backend, sparse_attention
from focusdllm.attention.gather import gather_attention, gather_rows, kept_indices


def make_case(seed, b, hq, hkv, hs, t, d, cap, bs, p_block=0.2, n_sinks=3, n_resp=5, dtype=torch.float64):
    """Random q/k/v and a selection: top-K-like blocks, sinks (in and out of kept blocks), response keys."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, cap, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, cap, d, generator=g, dtype=torch.float64)
    lens = torch.randint(n_resp + 1, cap + 1, (b,), generator=g)  # non-multiple valid lengths
    lens[0] = max(cap - int(torch.randint(0, bs, (1,), generator=g)), n_resp + 1)  # ragged last block
    pos = torch.arange(cap)
    valid = pos[None] < lens[:, None]  # (B, Cap)
    block_keep = torch.rand(b, hs, cap // bs, generator=g) < p_block
    token_keep = torch.zeros(b, hs, cap, dtype=torch.bool)
    for i in range(b):
        prompt = int(lens[i]) - n_resp
        sinks = torch.randint(0, prompt, (hs, n_sinks), generator=g)
        token_keep[i].scatter_(-1, sinks, True)  # sinks, inside or outside kept blocks
        token_keep[i, :, prompt : int(lens[i])] = True  # all response positions
    block_keep[:, :, -1] |= torch.rand(b, hs, generator=g) < 0.5  # kept blocks beyond the valid length
    sel = KeySelection(block_keep, token_keep, valid, bs)
    return q.to(dtype), k.to(dtype), v.to(dtype), sel


def ref64(q, k, v, sel):
    return masked_attention(q.double(), k.double(), v.double(), sel.dense_mask())


def assert_fa_rule(fast, q, k, v, sel):
    """bf16: |fast - ref64| <= 2 |plain_bf16 - ref64| + 1e-3 (flash-attention rule, max norm)."""
    ref = ref64(q, k, v, sel)
    plain = masked_attention(q, k, v, sel.dense_mask())
    err, base = (fast.double() - ref).abs().max(), (plain.double() - ref).abs().max()
    assert err <= 2 * base + 1e-3, (err, base)


LAYOUTS = [(1, 4, 4, 4), (2, 4, 4, 1), (2, 6, 2, 2), (1, 6, 2, 1), (2, 7, 1, 1)]  # (B, Hq, Hkv, Hs)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    layout=st.sampled_from(LAYOUTS),
    t=st.integers(1, 20),
    d=st.sampled_from([8, 16]),
    bs=st.sampled_from([8, 16, 32]),
    nb=st.integers(1, 8),
    p_block=st.floats(0.0, 1.0),
    static_bound=st.booleans(),
    one_head_chunks=st.booleans(),
)
def test_gather_equals_masked_dense(seed, layout, t, d, bs, nb, p_block, static_bound, one_head_chunks):
    b, hq, hkv, hs = layout
    q, k, v, sel = make_case(seed, b, hq, hkv, hs, t, d, nb * bs, bs, p_block=p_block)
    with mock.patch.object(gather_mod, "CPU_CHUNK_BYTES", 1 if one_head_chunks else gather_mod.CPU_CHUNK_BYTES):
        out = gather_attention(q, k, v, sel, max_keys=nb * bs if static_bound else None)  # 1 or Hkv heads a chunk
    torch.testing.assert_close(out, ref64(q, k, v, sel), atol=1e-12, rtol=0)
    q32, k32, v32 = q.float(), k.float(), v.float()
    out32 = gather_attention(q32, k32, v32, sel)
    torch.testing.assert_close(out32.double(), ref64(q, k, v, sel), atol=1e-5, rtol=0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), layout=st.sampled_from(LAYOUTS), t=st.integers(1, 20))
def test_gather_bf16_flash_rule(seed, layout, t):
    b, hq, hkv, hs = layout
    q, k, v, sel = make_case(seed, b, hq, hkv, hs, t, 32, 256, 32, dtype=torch.bfloat16)
    assert_fa_rule(gather_attention(q, k, v, sel), q, k, v, sel)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_budget_all_equals_dense(layout):
    b, hq, hkv, hs = layout
    q, k, v, sel = make_case(0, b, hq, hkv, hs, 9, 16, 128, 16)
    sel.block_keep[:] = True
    sel.valid[:] = True
    dense = F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
    torch.testing.assert_close(gather_attention(q, k, v, sel), dense, atol=1e-12, rtol=0)
    torch.testing.assert_close(sparse_attention(q, k, v, sel, "torch"), dense, atol=1e-12, rtol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), h=st.integers(1, 4), shared=st.booleans(),
       m=st.integers(1, 9), strided=st.booleans())
def test_gather_rows_equals_loop(seed, b, h, shared, m, strided):
    """Row gather == a plain per-(b, h, m) loop, for one shared index head or one per head, any strides."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 11, h, 6, generator=g).transpose(1, 2) if strided else torch.randn(b, h, 11, 6, generator=g)
    idx = torch.randint(0, 11, (b, 1 if shared else h, m), generator=g)
    out = gather_rows(x, idx)
    ref = torch.stack([torch.stack([x[i, j, idx[i, 0 if shared else j]] for j in range(h)]) for i in range(b)])
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_kept_indices_packed_ascending():
    keep = torch.tensor([[[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0]]], dtype=torch.bool)
    idx, ok = kept_indices(keep)
    assert idx.tolist() == [[[1, 3, 4], [0, 0, 0]]]
    assert ok.tolist() == [[[True, True, True], [True, False, False]]]
    idx8, ok8 = kept_indices(keep, max_keys=8)  # static bound: padded, no host sync
    assert idx8.shape == (1, 2, 8) and ok8.sum() == 4 and idx8[0, 0, :3].tolist() == [1, 3, 4]


def test_planted_bug_is_caught():
    """Dropping the token-level keys (sinks, response) must change the output."""
    q, k, v, sel = make_case(3, 1, 4, 4, 4, 6, 16, 128, 16, p_block=0.3)
    broken = KeySelection(sel.block_keep, torch.zeros_like(sel.token_keep), sel.valid, sel.block_size)
    assert not torch.allclose(gather_attention(q, k, v, broken), ref64(q, k, v, sel), atol=1e-3)


def test_resolve_backend():
    assert resolve_backend("torch", "cpu", torch.float32) == "torch"
    assert resolve_backend("auto", "cpu", torch.float64) == "torch"
    with pytest.raises(ValueError):
        resolve_backend("triton", "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="backend='torch'"):
        resolve_backend("flex", "cpu", torch.float64)
    if torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX"):
        assert resolve_backend("auto", "cpu", torch.float32) == "flex"
        assert resolve_backend("auto", "cpu", torch.bfloat16) == "flex"
        assert resolve_backend("auto", "cpu", torch.float32, group=7) == "torch"  # GQA on CPU: gather is faster
        assert resolve_backend("flex", "cpu", torch.float32, group=7) == "flex"  # explicit wins
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="unavailable"):
            resolve_backend("flex", "cuda", torch.bfloat16)
        assert resolve_backend("auto", "cuda", torch.bfloat16) == "torch"
