"""model.fuse(): compiled block halves equal the eager block (CPU inductor; a few seconds of compile)."""

import pytest
import torch

import focusdllm


@pytest.fixture()
def fused_model():
    torch._dynamo.reset()
    m = focusdllm.load_model("llada-tiny", dtype=torch.float32, seed=1)
    yield m
    m.fuse(False)
    torch._dynamo.reset()


def test_fused_block_equals_eager_and_decodes_the_same(fused_model):
    m = fused_model
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    eager = m(ids)
    m.fuse()
    assert (m(ids) - eager).abs().max() < 1e-4
    kw = dict(gen_length=16, block_length=8, steps=8, mode="focus",
              focus=focusdllm.FocusConfig(block_size=16, backend="torch"))
    fused = focusdllm.generate(m, ids[:1], **kw)
    m.fuse(False)
    assert torch.equal(fused.sequences, focusdllm.generate(m, ids[:1], **kw).sequences)


def test_fused_refuses_silent_eager_fallback(fused_model):
    m = fused_model.fuse()
    ids = torch.randint(0, 100, (1, 12))
    with torch.compiler.set_stance("force_eager"), pytest.raises(RuntimeError, match="ran eagerly"):
        m(ids)


def test_packed_weights_are_views_and_follow_replaced_parameters(fused_model):
    """fuse() packs q/k/v and gate/up into one tensor each without copies (the parameters become its views, the
    state_dict keeps its names); a parameter replaced afterwards (e.g. by model.to) is packed again, not ignored."""
    m = fused_model
    keys = set(m.state_dict())
    n_bytes = sum(p.numel() for p in m.parameters())
    m.fuse()
    blk = m.blocks[0]
    assert set(m.state_dict()) == keys and sum(p.numel() for p in m.parameters()) == n_bytes
    w = blk._packed_qkv_weight
    assert blk.k_proj.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    assert torch.equal(w[blk.q_proj.weight.shape[0]:][: blk.k_proj.weight.shape[0]], blk.k_proj.weight)
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        blk.up_proj.weight = torch.nn.Parameter(blk.up_proj.weight * 1.5)  # no longer a view of the pack
        fused_out = m(ids)
        m.fuse(False)
        assert (fused_out - m(ids)).abs().max() < 1e-4


def test_query_rows_equal_the_rows_of_full_queries(fused_model):
    """qkv(q_rows=...) (the SlimInfer-pruned prefill: queries of kept rows only) gives exactly those rows of the
    full q, and the same k, v, fused and eager."""
    m = fused_model
    blk = m.blocks[1]
    x = torch.randn(2, 30, m.config.d_model, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(30).expand(2, -1)
    cos, sin = m.rope.cos_sin(pos, x.dtype)
    rows = torch.tensor([[0, 3, 4, 17, 29], [1, 2, 2, 20, 28]])
    for fuse in (False, True):
        m.fuse(fuse)
        q, k, v = blk.qkv(x, m.rope, cos, sin)
        qr, kr, vr = blk.qkv(x, m.rope, cos, sin, q_rows=rows)
        want = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        assert (qr - want).abs().max() < 1e-5 and (kr - k).abs().max() < 1e-5 and (vr - v).abs().max() < 1e-5


def test_out_rows_equal_the_rows_of_the_full_forward(fused_model):
    """forward(out_rows=...) (training's loss rows: the last layer on those rows only) gives exactly those rows
    of the full logits, eager and fused, and the same gradients as the full forward's rows."""
    m = fused_model
    ids = torch.randint(0, 100, (2, 30), generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([[29, 28, 27, 3, 0], [5, 6, 7, 8, 1]])
    for fuse in (False, True):
        m.fuse(fuse)
        full = m(ids)
        want = full.gather(1, rows[..., None].expand(-1, -1, full.shape[-1]))
        got = m(ids, out_rows=rows)
        assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    m.fuse(False)
    w = torch.randn(want.shape, generator=torch.Generator().manual_seed(4))
    grads = []
    for out in (lambda: m(ids).gather(1, rows[..., None].expand(-1, -1, w.shape[-1])), lambda: m(ids, out_rows=rows)):
        m.zero_grad()
        (out() * w).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all((a - b).abs().max() <= 1e-5 * a.abs().max() for a, b in zip(*grads))  # fp32 sums in another order


def test_fused_cache_write_equals_eager_and_touches_only_its_slots(fused_model):
    """qkv_into (row steps: K/V scattered into the cache inside the compiled kernel) writes exactly the eager
    K/V at the given slots, leaves every other slot alone (the cache layer is a view of the whole cache), and
    returns the eager q."""
    m = fused_model
    blk, cfg = m.blocks[2], m.config
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, cfg.d_model, generator=g)
    slots = torch.tensor([[3, 9, 10, 11, 63], [0, 1, 2, 40, 63]])
    cos, sin = m.rope.cos_sin(slots, x.dtype)
    caches = []
    for fuse in (False, True):
        m.fuse(fuse)
        ck = torch.randn(3, 2, cfg.n_kv_heads, 64, cfg.head_dim, generator=torch.Generator().manual_seed(5))
        cv = ck.clone() * 2
        before = ck.clone()
        q = blk.qkv_into(x, m.rope, cos, sin, ck[1], cv[1], slots)
        caches.append((q, ck, cv))
        assert not torch.equal(ck[1], before[1])  # it wrote
        untouched = torch.ones(2, 64, dtype=torch.bool)
        untouched.scatter_(1, slots, False)
        assert torch.equal(ck[0], before[0]) and torch.equal(ck[2], before[2])  # other layers
        assert torch.equal(ck[1].transpose(1, 2)[untouched], before[1].transpose(1, 2)[untouched])  # other slots
    (q0, k0, v0), (q1, k1, v1) = caches
    assert (q0 - q1).abs().max() < 1e-5 and (k0 - k1).abs().max() < 1e-5 and (v0 - v1).abs().max() < 1e-5
