"""Unit tests of reference/ (the test oracle) on hand-built tensors whose answer is known by inspection."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference  # noqa: E402
from reference import focus as fx  # noqa: E402
from reference.model import (  # noqa: E402
    attention,
    full_forward,
    layer_qkv,
    load_checkpoint,
    logits_of,
    rms_norm,
    rope,
    rows_forward,
)
from reference.sampling import Noise, choose, factor_prefix_len, fixed_counts, predict, stable_topk  # noqa: E402
from reference.tiny import tiny_checkpoint  # noqa: E402

FAST = settings(deadline=None, max_examples=15, derandomize=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="module", params=["llada", "dream"])
def ckpt(request):
    return tiny_checkpoint(request.param, seed=3)


def _prompt(n, seed=1):
    return torch.randint(0, 120, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ------------------------------------------------------------------ transfer rules

def test_fixed_count_schedule_hand_worked():
    assert fixed_counts(10, 4) == [3, 3, 2, 2]
    assert fixed_counts(8, 8) == [1] * 8
    assert fixed_counts(2, 4) == [1, 1, 0, 0]


@FAST
@given(n=st.integers(0, 64), spb=st.integers(1, 16))
def test_fixed_count_schedule_properties(n, spb):
    c = fixed_counts(n, spb)
    assert len(c) == spb and sum(c) == n
    assert all(a >= b for a, b in zip(c, c[1:])) and max(c) - min(c) <= 1


def test_stable_topk_ties_go_to_lower_index():
    assert stable_topk([0.5, 0.9, 0.9, 0.1, 0.9], 2) == [1, 2]
    assert stable_topk([0.3, 0.3, 0.3], 3) == [0, 1, 2]
    assert stable_topk([0.1, 0.2], 5) == [1, 0]


def test_threshold_rule_hand_worked():
    conf = [0.5, 0.95, 0.91, 0.2, 0.9]
    assert sorted(choose(conf, threshold=0.9)) == [1, 2, 4]  # >= tau counts
    assert choose([0.3, 0.6, 0.6], threshold=0.9) == [1]  # only the best, ties -> lower index
    assert choose([], threshold=0.9) == []


def test_factor_rule_hand_worked():
    # n=1 forced; n=2 needs >= 1 - 1/3 = 0.667 (0.8 ok); n=3 needs >= 0.75 (0.5 fails)
    assert factor_prefix_len([0.9, 0.8, 0.5], 1.0) == 2
    assert factor_prefix_len([0.1, 0.1], 1.0) == 1
    assert factor_prefix_len([0.99, 0.99, 0.99, 0.99], 0.1) == 4
    assert sorted(choose([0.5, 0.9, 0.8], factor=1.0)) == [1, 2]
    assert choose([0.2, 0.4, 0.4, 0.1], k=2) == [1, 2]


def test_predict_never_emits_mask_and_reports_softmax_confidence():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    x0, conf = predict(logits, mask_id=2, temperature=0.0, u=None)
    assert x0 == [3, 0]
    e = math.exp
    assert conf[0] == pytest.approx(e(2) / (e(0) + e(1) + e(2)), rel=1e-12)
    assert conf[1] == pytest.approx(e(3) / (e(3) + 2), rel=1e-12)


def test_gumbel_max_follows_the_uniforms():
    logits = torch.zeros(1, 4, dtype=torch.float64)
    u = torch.full((1, 4), 0.5, dtype=torch.float64)
    u[0, 1] = 1 - 1e-9  # -log(u) ~ 1e-9 -> exp(l) / (-log u)**T is huge for token 1
    x0, conf = predict(logits, mask_id=3, temperature=1.0, u=u)
    assert x0 == [1] and conf[0] == pytest.approx(1 / 3)


def test_noise_stream_is_seed_plus_row():
    n = Noise(seed=7, row=2)
    u, r = n.draw(4, 5, 1.0, "random")
    g = torch.Generator().manual_seed(9)
    assert torch.equal(u, torch.rand((4, 5), generator=g, dtype=torch.float64))
    assert torch.equal(r, torch.rand((4,), generator=g, dtype=torch.float64))
    assert Noise(0).draw(4, 5, 0.0, "low_confidence") == (None, None)


# ------------------------------------------------------------------ focus pieces

def test_windows_clip_at_block_and_canvas_edges():
    assert fx.active_rows([10], 3, 10, 18) == [10, 11]  # block start: no prompt row
    assert fx.active_rows([17], 3, 10, 18) == [16, 17]  # block end: no next-block row
    assert fx.active_rows([10, 17], 3, 0, 26) == [9, 10, 11, 16, 17, 18]  # window_past_block
    assert fx.active_rows([25], 5, 0, 26) == [23, 24, 25]  # canvas end
    assert fx.active_rows([12], 99, 10, 18) == list(range(10, 18))  # wider than the block
    assert fx.active_rows([12, 13], 1, 10, 18) == [12, 13]


def test_focus_size_and_set_hand_worked():
    masked, c = [10, 11, 12, 13], [0.2, 0.9, 0.2, 0.95]
    assert fx.focus_size(c, count=2) == 2
    assert fx.focus_size(c, count=2, extra_focus=5) == 4  # capped at #masks
    assert fx.focus_size(c, threshold=0.9) == 2 and fx.focus_size(c, threshold=0.99) == 1
    assert fx.focus_size(c, factor=1.0) == 2  # sorted .95, .9 (>= .667), .2 (< .75)
    assert fx.focus_set(masked, c, 2) == [11, 13]
    assert fx.focus_set(masked, c, 3) == [10, 11, 13]  # tie .2/.2 -> lower position


@FAST
@given(p=st.integers(4, 80), sink=st.data(), hq=st.sampled_from([2, 4]), hkv=st.sampled_from([1, 2]),
       seed=st.integers(0, 10**6))
def test_planted_sink_is_found(p, sink, hq, hkv, seed):
    j = sink.draw(st.integers(0, p - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(hq, 5, 8, generator=g, dtype=torch.float64) * 0.1
    q[..., 0] = 1.0 + torch.rand(hq, 5, generator=g, dtype=torch.float64)
    k = torch.randn(hkv, p, 8, generator=g, dtype=torch.float64) * 0.1
    k[:, j, 0] = 20.0  # huge dot product with every query
    s = fx.sink_scores(q, k)
    assert s.shape == (p,) and float(s.sum()) == pytest.approx(1.0)
    assert fx.find_sinks(s, 1) == [j]
    assert len(fx.find_sinks(s, p + 3)) == p  # fewer sinks than asked when the prompt is short


@FAST
@given(p=st.integers(17, 100), data=st.data(), seed=st.integers(0, 10**6))
def test_block_holding_the_only_relevant_key_is_selected(p, data, seed):
    bs = 16
    pos = data.draw(st.integers(0, p - 1))
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, p, 8, generator=g, dtype=torch.float64) * 0.01
    k[1, pos] = 0.0
    k[1, pos, 3] = 50.0  # only in KV head 1
    q = torch.randn(4, 3, 8, generator=g, dtype=torch.float64) * 0.01
    q[2:, 1, 3] = 1.0  # query heads 2, 3 (group of KV head 1), one focus row
    reps = fx.block_reps(k, bs)
    assert reps.shape == (2, math.ceil(p / bs), 8)
    nb = pos // bs
    assert torch.allclose(reps[1, nb], k[1, nb * bs:min(p, (nb + 1) * bs)].mean(0))
    per_head = fx.block_scores(q, reps, per_head=True)
    shared = fx.block_scores(q, reps, per_head=False)
    assert per_head.shape == (2, reps.shape[1]) and shared.shape == (1, reps.shape[1])
    assert stable_topk(per_head[1].tolist(), 1) == [nb]
    assert stable_topk(shared[0].tolist(), 1) == [nb]
    keep = fx.kept_keys(per_head, p, p + 8, bs, 1, sinks=[0])
    assert keep[1, nb * bs:min(p, (nb + 1) * bs)].all() and keep[:, p:].all() and keep[:, 0].all()
    assert int(keep[1, :p].sum()) == min(p, (nb + 1) * bs) - nb * bs + (0 if nb == 0 else 1)


def test_n_keep_blocks():
    assert fx.n_keep_blocks(30, 0.1, 1) == 3  # not ceil(3.0000000000000004)
    assert fx.n_keep_blocks(10, 0.1, 4) == 4
    assert fx.n_keep_blocks(3, 0.5, 4) == 3
    assert fx.n_keep_blocks(9, 0.25, 1) == 3


# ------------------------------------------------------------------ model pieces

def test_attention_restricted_equals_attention_over_the_subset():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 10, 8, generator=g, dtype=torch.float64) for _ in range(2))
    idx = [0, 3, 4, 9]
    keep = torch.zeros(10, dtype=torch.bool)
    keep[idx] = True
    assert torch.allclose(attention(q, k, v, keep), attention(q, k[:, idx], v[:, idx]), atol=1e-14)
    per = torch.zeros(2, 10, dtype=torch.bool)
    per[0, 2], per[1, 7] = True, True  # one key per KV head -> output = that value
    out = attention(q, k, v, per)
    assert torch.allclose(out[:2], v[0, 2].expand(2, 3, 8)) and torch.allclose(out[2:], v[1, 7].expand(2, 3, 8))
    assert torch.allclose(attention(q, k, v, torch.ones(2, 10, dtype=torch.bool)), attention(q, k, v))


@FAST
@given(m=st.integers(0, 300), n=st.integers(0, 300), s=st.integers(0, 300), arch=st.sampled_from(["llada", "dream"]))
def test_rope_depends_on_relative_position_only(m, n, s, arch):
    g = torch.Generator().manual_seed(m * 7 + n)
    q, k = (torch.randn(1, 1, 16, generator=g, dtype=torch.float64) for _ in range(2))
    a = (rope(q, [m], 1e4, arch) * rope(k, [n], 1e4, arch)).sum()
    b = (rope(q, [m + s], 1e4, arch) * rope(k, [n + s], 1e4, arch)).sum()
    assert float(a) == pytest.approx(float(b), abs=1e-10)
    assert torch.allclose(rope(q, [0], 1e4, arch), q)


def test_rms_norm_hand_worked():
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    out = rms_norm(x, torch.tensor([1.0, 2.0], dtype=torch.float64), 0.0)
    r = math.sqrt(12.5)
    assert torch.allclose(out, torch.tensor([[3 / r, 8 / r]], dtype=torch.float64))


def test_forward_finite_and_cached_step_with_fresh_cache_equals_full_rows(ckpt):
    x = _prompt(40) + [ckpt.mask_id] * 16
    hidden, ks, vs = full_forward(ckpt, x)
    assert hidden.shape == (56, 64) and torch.isfinite(logits_of(ckpt, hidden)).all()
    assert ks[0].shape == (ckpt.n_kv_heads, 56, ckpt.head_dim)
    ck, cv = [k.clone() for k in ks], [v.clone() for v in vs]
    rows = list(range(40, 48)) + [39]  # dual block rows + a Dream-style query-only row
    h = rows_forward(ckpt, x, rows, ck, cv, [True] * 8 + [False])
    assert torch.allclose(h, hidden[rows], atol=1e-12, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(ck, ks))


def test_rows_forward_writes_only_written_rows(ckpt):
    x = _prompt(20) + [ckpt.mask_id] * 8
    _, ks, vs = full_forward(ckpt, x)
    ck, cv = [k.clone() for k in ks], [v.clone() for v in vs]
    x2 = list(x)
    x2[19], x2[20], x2[21] = 5, 6, 7  # changed tokens: rows 20, 21 written, row 19 query-only
    rows_forward(ckpt, x2, [20, 21, 19], ck, cv, [True, True, False])
    for i in range(ckpt.n_layers):
        diff = (ck[i] - ks[i]).abs().amax(dim=(0, 2)) > 1e-9  # (L,)
        assert diff.nonzero().flatten().tolist() == [20, 21]
    _, _, v = layer_qkv(ckpt, 0, ckpt.w("embed")[torch.tensor([7])], [21])
    assert torch.allclose(cv[0][:, 21], v[:, 0])


def test_load_checkpoint_single_and_sharded(tmp_path):
    from safetensors.torch import save_file

    ck = tiny_checkpoint("dream", seed=5, n_layers=2)
    raw = {"model_type": "Dream", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 128, "rms_norm_eps": 1e-6,
           "rope_theta": 5000.0, "rope_scaling": {"type": "ntk", "factor": 2.0}, "mask_token_id": 127}
    for folder, shards in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(raw))
        keys = sorted(ck.weights)
        if shards == 1:
            save_file(ck.weights, str(folder / "model.safetensors"))
        else:
            parts = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
            for name, ks in parts.items():
                save_file({k: ck.weights[k] for k in ks}, str(folder / name))
            wm = {k: name for name, ks in parts.items() for k in ks}
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        got = load_checkpoint(folder)
        assert got.rope_theta == 10000.0 and got.n_kv_heads == 2 and got.mask_id == 127
        assert set(got.weights) == set(ck.weights)
        assert all(torch.equal(got.weights[k], ck.weights[k]) for k in keys)


# ------------------------------------------------------------------ decode loop

def test_first_commit_reads_the_right_logit_row(ckpt):
    """LLaDA reads row p, Dream row p-1: the first vanilla commit is recomputed by hand."""
    prompt = _prompt(12, seed=4)
    x = prompt + [ckpt.mask_id] * 4
    hidden, _, _ = full_forward(ckpt, x)
    src = [p - 1 if ckpt.arch == "dream" else p for p in range(12, 16)]
    x0, conf = predict(logits_of(ckpt, hidden[src]), ckpt.mask_id, 0.0, None)
    j = stable_topk(conf, 1)[0]
    out, nfe = reference.generate(ckpt, prompt, gen_length=4, block_length=4, steps=4)
    assert nfe == 4 and out[:12] == prompt and out[12 + j] == x0[j]
    assert ckpt.mask_id not in out


@pytest.mark.parametrize("mode,cache", [("vanilla", "dual"), ("fastdllm", "dual"), ("fastdllm", "prefix"),
                                        ("focus", "dual")])
def test_nfe_counts(ckpt, mode, cache):
    kw = dict(gen_length=8, block_length=4, mode=mode, cache=cache, focus=dict(block_size=16))
    p = _prompt(20)
    assert reference.generate(ckpt, p, steps=8, **kw)[1] == 8
    assert reference.generate(ckpt, p, steps=16, **kw)[1] == 8  # 4 masks, 8 steps: counts 1,1,1,1,0,..
    assert reference.generate(ckpt, p, steps=2, threshold=0.0, **kw)[1] == 2  # all commit at the refresh
    assert reference.generate(ckpt, p, steps=2, threshold=1.1, **kw)[1] == 8  # one per step


def test_sparse_step_with_full_budget_equals_dense_step(ckpt):
    """keep_ratio = 1 and a window covering the block: focus == dual cache, whatever num_sinks."""
    p = _prompt(45, seed=2)
    kw = dict(gen_length=16, block_length=8, steps=8)
    dual = reference.generate(ckpt, p, mode="fastdllm", **kw)
    for sinks in (0, 3, 60):
        fc = dict(window=15, block_size=16, keep_ratio=1.0, num_sinks=sinks, sink_layer=1)
        assert reference.generate(ckpt, p, mode="focus", focus=fc, **kw) == dual
    thr = reference.generate(ckpt, p, mode="fastdllm", threshold=0.02, temperature=0.7, seed=3, **kw)
    fc = dict(window=15, block_size=16, keep_ratio=1.0, num_sinks=2)
    assert reference.generate(ckpt, p, mode="focus", focus=fc, threshold=0.02, temperature=0.7, seed=3,
                              **kw) == thr
    # a window that does not cover the block computes fewer rows: expected to differ here
    narrow = dict(window=1, block_size=16, keep_ratio=1.0)
    assert reference.generate(ckpt, p, mode="focus", focus=narrow, **kw)[0] != dual[0]


def test_focus_pruning_changes_attention_only_past_the_sink_layer(ckpt):
    """sink_layer = L-1 means no sparse layer: any budget equals the dual cache."""
    p = _prompt(64, seed=6)
    kw = dict(gen_length=8, block_length=8, steps=8)
    dual = reference.generate(ckpt, p, mode="fastdllm", **kw)
    fc = dict(window=15, block_size=16, keep_ratio=0.25, min_blocks=1, num_sinks=0)
    assert reference.generate(ckpt, p, mode="focus", focus={**fc, "sink_layer": ckpt.n_layers - 1},
                              **kw) == dual
    # the same budget with sparse layers does prune (this test could fail)
    assert reference.generate(ckpt, p, mode="focus", focus={**fc, "sink_layer": 1}, **kw) != dual
