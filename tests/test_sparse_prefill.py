"""Sparse prefill (beyond the paper): per-query-block key selection, flex == materialised-mask reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from focusdllm import FocusConfig, generate
from focusdllm.attention.flex import flex_available
from focusdllm.focus import sparse_prefill as sp

BS, D, CAP = 32, 16, 384


def _case(seed, b=2, hq=4, hkv=2, n=300, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, D, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, CAP, D, generator=g).to(dtype) for _ in range(2))
    prompt_len = torch.randint(100, n - 20, (b,), generator=g)
    valid = (torch.arange(CAP)[None] < n).expand(b, -1).clone()
    valid[0, n - 7 :] = False  # a ragged row
    token_keep = (torch.arange(CAP)[None] >= prompt_len[:, None]) & valid  # response keys
    token_keep |= torch.rand(b, CAP, generator=g) < 0.02  # sinks
    rows = torch.arange(n).expand(b, -1)
    n_keep = torch.tensor([2, 3])
    bk = sp.query_block_keep(q, k, rows, prompt_len, n_keep, 1, BS, -(-int(prompt_len.max()) // BS), CAP)
    return q, k, v, bk, token_keep, valid, prompt_len


def test_query_block_keep_structure():
    q, k, v, bk, tk, valid, plen = _case(0)
    nq, nb = bk.shape[1], bk.shape[2]
    assert (nq, nb) == (3, CAP // BS)
    for b in range(2):
        for j in range(nq):
            lo, hi = j * 128, min((j + 1) * 128, 300) - 1
            if hi >= plen[b]:  # holds a response row: dense
                assert bk[b, j].all()
                continue
            near = set(range(max(lo // BS - 1, 0), min(hi // BS + 1, nb - 1) + 1))
            kept = set(torch.nonzero(bk[b, j]).flatten().tolist())
            assert near <= kept and len(kept - near) <= int([2, 3][b])


@pytest.mark.skipif(not flex_available("cpu")[0], reason=flex_available("cpu")[1])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_flex_equals_masked_reference(seed):
    q, k, v, bk, tk, valid, _ = _case(seed)
    with torch.no_grad():
        ref = sp.sparse_prefill_attention(q.double(), k.double(), v.double(), bk, tk, valid, BS, "torch")
        out = sp.sparse_prefill_attention(q, k, v, bk, tk, valid, BS, "flex")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(not flex_available("cpu")[0], reason=flex_available("cpu")[1])
def test_planted_bug_dropping_sinks_is_caught(monkeypatch):
    q, k, v, bk, tk, valid, _ = _case(3)
    with torch.no_grad():
        ref = sp.sparse_prefill_attention(q.double(), k.double(), v.double(), bk, tk, valid, BS, "torch")

        def broken(block_keep, token_keep, valid, block_size):
            return real(block_keep, torch.zeros_like(token_keep), valid, block_size)

        real = sp.prefill_mask_mod
        monkeypatch.setattr(sp, "prefill_mask_mod", broken)
        bad = sp.sparse_prefill_attention(q, k, v, bk, tk, valid, BS, "flex")
    assert (bad.double() - ref).abs().max() > 1e-2


def test_all_blocks_equals_dense_prefill(llada64, monkeypatch):
    """Keeping every key block (prefill_sparse -> 1) gives the dense prefill's tokens, and the sparse path is
    really taken (layers after prefill_layer, every refresh); a tiny budget changes the answer."""
    from focusdllm.decode import forward

    calls = []
    real = forward.sparse_prefill_attention
    monkeypatch.setattr(forward, "sparse_prefill_attention", lambda *a: calls.append(1) or real(*a))
    kw = dict(gen_length=32, block_length=16, steps=16, mode="focus")
    base = FocusConfig(block_size=16, keep_ratio=1.0, num_sinks=4, backend="torch")
    diffs = 0
    for seed in range(3):
        ids = torch.randint(0, 100, (1, 300), generator=torch.Generator().manual_seed(seed))
        dense = generate(llada64, ids, focus=base, **kw).sequences
        assert not calls
        full = generate(llada64, ids, focus=base.with_(prefill_sparse=0.9999), **kw).sequences
        assert torch.equal(dense, full) and len(calls) == 2 * 2  # 2 refreshes x layers 2, 3
        calls.clear()
        tiny = generate(llada64, ids, focus=base.with_(prefill_sparse=0.01, prefill_band=0, num_sinks=0), **kw)
        calls.clear()
        diffs += not torch.equal(dense, tiny.sequences)
    assert diffs >= 1


def test_config_errors():
    with pytest.raises(ValueError, match="prefill_sparse"):
        FocusConfig(prefill_sparse=0.0)
    with pytest.raises(ValueError, match="prefill_band"):
        FocusConfig(prefill_band=-1)


def test_torch_reference_chunks_equal_one_mask():
    """The torch path works 2048 query rows at a time; across chunk borders it equals one full masked SDPA."""
    g = torch.Generator().manual_seed(0)
    n, cap, bs = 5000, 5120, 64
    q = torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, cap, 8, generator=g, dtype=torch.float64) for _ in range(2))
    valid = (torch.arange(cap) < n)[None]
    tk = (torch.rand(1, cap, generator=g) < 0.01) & valid
    bk = torch.rand(1, -(-n // sp.Q_BLOCK), cap // bs, generator=g) < 0.1
    keep = (bk.repeat_interleave(sp.Q_BLOCK, 1)[:, :n].repeat_interleave(bs, -1) | tk[:, None]) & valid[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], enable_gqa=True)
    torch.testing.assert_close(sp.sparse_prefill_attention(q, k, v, bk, tk, valid, bs, "torch"), ref)


@pytest.mark.skipif(not flex_available("cpu")[0], reason=flex_available("cpu")[1])
def test_pruned_and_sparse_prefill_flex_equals_torch():
    """With prefill pruning the sparse prefill's query blocks hold non-contiguous rows: flex == the torch
    reference token for token there too (fp32 tiny model, several prompts, batch of two)."""
    import focusdllm

    model = focusdllm.load_model("llada-tiny", dtype=torch.float32, seed=3)
    kw = dict(gen_length=32, block_length=16, steps=16, mode="focus")
    cfg = FocusConfig.fast(block_size=16, prefill_keep=0.5, prefill_sparse=0.2, num_sinks=4)
    for seed in range(2):
        ids = torch.randint(0, 100, (2, 700), generator=torch.Generator().manual_seed(seed))
        a = generate(model, ids, focus=cfg.with_(backend="torch"), **kw).sequences
        b = generate(model, ids, focus=cfg.with_(backend="flex"), **kw).sequences
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(3))
def test_compiled_block_choice_equals_eager_on_gpu(seed):
    """The refresh's compiled key-block summaries and sparse-prefill block choice (CUDA) == the eager functions."""
    from focusdllm.compiled import compiled_on_cuda
    from focusdllm.focus.selection import block_bounds, block_representatives

    q, k, _, _, _, _, prompt_len = (x.cuda() for x in _case(seed))
    rows = torch.arange(q.shape[2], device="cuda").expand(q.shape[0], -1)
    nbh = -(-int(prompt_len.max()) // BS)
    args = (q, k, rows, prompt_len, torch.tensor([2, 3], device="cuda"), 1, BS, nbh, CAP)
    assert torch.equal(compiled_on_cuda(sp.query_block_keep)(*args), sp.query_block_keep(*args))
    for rep in (block_representatives, block_bounds):
        got, want = compiled_on_cuda(rep)(k, prompt_len, BS, nbh), rep(k, prompt_len, BS, nbh)
        assert got.dtype == want.dtype == torch.float32 and (got - want).abs().max() < 1e-5
