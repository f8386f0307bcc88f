"""The one decode loop: equivalences between modes, batch invariance, planted bugs, bad configs."""

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import focusdllm
from focusdllm import FocusConfig, generate
from focusdllm.config import ConfigError

BLOCK_WIDE = 63  # a window wider than any test block covers the whole block


def _prompt(seed, n, vocab=120):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _gen(model, ids, **kw):
    base = dict(gen_length=16, block_length=8, steps=8)
    base.update(kw)
    return generate(model, ids, **base)


def _assert_rows_equal_alone(model, prompts, kw):
    """Left-pad `prompts` into one batch; every row must equal its prompt decoded alone (row i alone
    uses seed i, which is what row i's generator gets in the batch)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), model.config.pad_id)
    am = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        am[i, width - len(p):] = 1
    batch = _gen(model, ids, attention_mask=am, **kw)
    for i, p in enumerate(prompts):
        alone = _gen(model, p[None], **{**kw, "seed": i})
        assert torch.equal(batch.sequences[i, width:], alone.sequences[0, len(p):]), f"row {i}"
        assert torch.equal(batch.sequences[i, :width], ids[i])


@given(
    arch=st.sampled_from(["llada", "dream"]), seed=st.integers(0, 10**6), plen=st.integers(3, 90),
    block=st.sampled_from([4, 8]), rule=st.sampled_from(["fixed", "threshold", "factor"]),
    sinks=st.integers(0, 5), temperature=st.sampled_from([0.0, 0.7]),
)
def test_focus_full_budget_equals_dual_cache(llada64, dream64, arch, seed, plen, block, rule, sinks, temperature):
    """keep_ratio=1 and a window covering the block: focus == fastdllm dual, whatever num_sinks."""
    model = llada64 if arch == "llada" else dream64
    ids = _prompt(seed, plen)
    kw = dict(gen_length=16, block_length=block, steps=16 // block * 2, temperature=temperature, seed=seed)
    kw.update({"fixed": {}, "threshold": {"threshold": 0.5}, "factor": {"factor": 1.0}}[rule])
    dual = generate(model, ids, mode="fastdllm", cache="dual", **kw)
    cfg = FocusConfig(window=BLOCK_WIDE, keep_ratio=1.0, num_sinks=sinks, block_size=16, backend="torch")
    foc = generate(model, ids, mode="focus", focus=cfg, **kw)
    assert torch.equal(dual.sequences, foc.sequences)
    assert dual.nfe == foc.nfe


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_no_pruning_when_sink_layer_is_last(llada64, dream64, arch):
    model = llada64 if arch == "llada" else dream64
    ids = _prompt(3, 80)
    dual = _gen(model, ids, mode="fastdllm")
    cfg = FocusConfig(window=BLOCK_WIDE, keep_ratio=0.1, min_blocks=1, block_size=16, sink_layer=3, backend="torch")
    assert torch.equal(dual.sequences, _gen(model, ids, mode="focus", focus=cfg).sequences)


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_one_layer_model_cache_is_exact(arch, cache):
    """With one layer, cached K/V never go stale, so Fast-dLLM == vanilla for any schedule."""
    model = focusdllm.load_model(f"{arch}-tiny", dtype=torch.float64, n_layers=1, seed=5)
    for seed in range(3):
        ids = _prompt(seed, 30)
        van = _gen(model, ids, steps=16)
        fast = _gen(model, ids, steps=16, mode="fastdllm", cache=cache)
        assert torch.equal(van.sequences, fast.sequences)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_one_step_per_block_cache_equals_vanilla(llada64, dream64, arch):
    """Each block's only step is the refresh, i.e. the vanilla full forward."""
    model = llada64 if arch == "llada" else dream64
    ids = _prompt(11, 40)
    van = _gen(model, ids, steps=2)
    for mode in ("fastdllm", "focus"):
        assert torch.equal(van.sequences, _gen(model, ids, steps=2, mode=mode).sequences)


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("mode", ["vanilla", "fastdllm", "focus"])
def test_batch_invariance_left_padding(llada64, dream64, arch, mode):
    model = llada64 if arch == "llada" else dream64
    kw = dict(mode=mode, temperature=0.5, seed=0)
    if mode == "focus":
        kw["focus"] = FocusConfig(block_size=16, keep_ratio=0.3, min_blocks=1, num_sinks=2, backend="torch")
    _assert_rows_equal_alone(model, [_prompt(100 + i, n)[0] for i, n in enumerate([37, 20, 70])], kw)


def test_planted_bug_dropping_response_keys_is_caught(llada64, monkeypatch):
    """The focus == dual equivalence must fail when the sparse layers lose the response keys."""
    from focusdllm.decode import forward as F

    ids = _prompt(1, 60)
    cfg = FocusConfig(window=BLOCK_WIDE, keep_ratio=1.0, num_sinks=0, block_size=16, backend="torch")
    dual = _gen(llada64, ids, mode="fastdllm")
    assert torch.equal(dual.sequences, _gen(llada64, ids, mode="focus", focus=cfg).sequences)
    real = F.KeySelection

    def broken(block_keep, token_keep, valid, block_size, counts=None):
        return real(block_keep, torch.zeros_like(token_keep), valid, block_size)

    monkeypatch.setattr(F, "KeySelection", broken)
    diffs = sum(
        not torch.equal(_gen(llada64, _prompt(s, 60), mode="fastdllm").sequences,
                        _gen(llada64, _prompt(s, 60), mode="focus", focus=cfg).sequences)
        for s in range(4)
    )
    assert diffs >= 1


def test_sparse_focus_runs_and_reports_stats(llada64):
    ids = _prompt(4, 200)
    seen = []
    cfg = FocusConfig(block_size=16, keep_ratio=0.1, min_blocks=2, num_sinks=3, backend="torch")
    out = _gen(llada64, ids, mode="focus", focus=cfg, callback=lambda s, x, info: seen.append((s, info)))
    st_ = out.stats
    assert out.nfe == 8 and st_["refreshes"] == 2 and len(seen) == 8
    assert st_["backend"] == "torch" and st_["mean_active_rows"] < 8
    dens = [d for d in st_["density_per_layer"] if d is not None]
    assert len(dens) == 4 - 1 - 1 and all(0 < d < 1 for d in dens)  # sink_layer = 4 // 4 = 1
    focused = [info for s, info in seen if info["kind"] == "step"]
    assert focused and focused[0]["sinks"].sum() == 3 and set(focused[0]["kept_blocks"]) == {2, 3}
    mask_id = llada64.config.mask_id
    assert (out.sequences[0, 200:] != mask_id).all()


def test_bad_generate_arguments(llada64):
    ids = _prompt(0, 10)
    cases = [
        (dict(gen_length=20, block_length=8), "not a multiple of block_length"),
        (dict(gen_length=16, block_length=8, steps=3), "multiple of the number of blocks"),
        (dict(mode="focus", cache="prefix"), "dual KV cache"),
        (dict(mode="focus", cache=None), "dual KV cache"),
        (dict(mode="fastdllm", cache="nope"), "cache='dual' or 'prefix'"),
        (dict(mode="turbo"), "mode='turbo'"),
        (dict(pad_id=llada64.config.mask_id), "mask_id and pad_id"),
        (dict(mode="focus", focus=FocusConfig(sink_layer=4)), "sink_layer=4"),
        (dict(capacity=20), "exceeds capacity"),
        (dict(threshold=0.9, factor=1.0), "not both"),
        (dict(focus=FocusConfig()), "only used with mode='focus'"),
    ]
    for kw, msg in cases:
        with pytest.raises((ValueError, ConfigError), match=msg):
            _gen(llada64, ids, **kw)
    with pytest.raises(ValueError, match="left padding"):
        _gen(llada64, torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0, 0]]))


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(window=2), "positive odd"),
        (dict(keep_ratio=0.0), r"keep_ratio=0.0 must be in \(0, 1\]"),
        (dict(keep_ratio=1.5), "keep_ratio"),
        (dict(block_size=48), "power of two"),
        (dict(backend="cuda"), "backend"),
        (dict(min_blocks=0), "min_blocks"),
    ],
)
def test_bad_focus_configs(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        FocusConfig(**kw)


def test_focus_presets():
    assert FocusConfig.paper() == FocusConfig()
    assert FocusConfig.lossless().keep_ratio == 1.0
    assert FocusConfig().n_keep_blocks(512) == 52 and FocusConfig().n_keep_blocks(10) == 4
    assert FocusConfig().n_keep_blocks(2) == 2
    assert FocusConfig().resolve_sink_layer(32) == 8
    paper, fast, fs = FocusConfig.paper(), FocusConfig.fast(), FocusConfig.fast_sparse()
    assert not paper.reuse_prompt_kv and paper.prefill_keep == 1.0 and paper.prefill_sparse == 1.0  # all off
    assert fast.reuse_prompt_kv and fast.block_score == "bound" and fast.prefill_sparse == 1.0
    assert fs == fast.with_(prefill_sparse=0.1) and fs.prefill_keep == 1.0  # pruning (lossy here) stays off


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_prompt_kv_reuse_exact_on_one_layer_model(arch):
    """Prompt K/V of a one-layer model never depend on the response, so reuse must be exact there."""
    model = focusdllm.load_model(f"{arch}-tiny", dtype=torch.float64, n_layers=1, seed=7)
    cfg = FocusConfig.fast(window=BLOCK_WIDE, keep_ratio=1.0, block_size=16, sink_layer=0, backend="torch")
    for seed in range(3):
        ids = _prompt(seed, 33)
        van = _gen(model, ids, gen_length=24, steps=12)
        foc = _gen(model, ids, gen_length=24, steps=12, mode="focus", focus=cfg)
        assert torch.equal(van.sequences, foc.sequences)
        assert foc.stats["refreshes"] == 3


def test_prompt_kv_reuse_changes_deep_models_and_refresh_every(llada64):
    ids = _prompt(9, 64)
    base = FocusConfig(block_size=16, backend="torch")
    kw = dict(gen_length=32, block_length=8, steps=16, mode="focus")
    plain = generate(llada64, ids, focus=base, **kw)
    every1 = generate(llada64, ids, focus=base.with_(reuse_prompt_kv=True, prompt_refresh_every=1), **kw)
    assert torch.equal(plain.sequences, every1.sequences)  # re-prefill at every block == no reuse
    reuse = generate(llada64, ids, focus=base.with_(reuse_prompt_kv=True), **kw)
    assert reuse.nfe == plain.nfe and (reuse.sequences[0, 64:] != llada64.config.mask_id).all()


def test_bound_block_score_full_budget_equals_dual(llada64):
    ids = _prompt(21, 90)
    cfg = FocusConfig(window=BLOCK_WIDE, keep_ratio=1.0, block_size=16, block_score="bound", backend="torch")
    assert torch.equal(_gen(llada64, ids, mode="fastdllm").sequences,
                       _gen(llada64, ids, mode="focus", focus=cfg).sequences)
    sparse = FocusConfig(block_size=16, keep_ratio=0.2, min_blocks=1, block_score="bound", backend="torch")
    out = _gen(llada64, ids, mode="focus", focus=sparse)
    assert 0 < out.stats["density_per_layer"][-1] < 1


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_prefill_pruning_keeping_every_row_is_exact_and_pruning_runs(llada64, dream64, arch):
    """SlimInfer-style pruning with a ratio that keeps every row takes the pruned code path and must
    reproduce the plain refresh; a real ratio still decodes every position."""
    model = llada64 if arch == "llada" else dream64
    ids = _prompt(5, 70)
    base = FocusConfig(block_size=16, keep_ratio=0.3, min_blocks=1, num_sinks=2, backend="torch")
    plain = _gen(model, ids, mode="focus", focus=base)
    same = _gen(model, ids, mode="focus", focus=base.with_(prefill_keep=0.999, prefill_layer=1))
    assert torch.equal(plain.sequences, same.sequences)
    pruned = _gen(model, ids, mode="focus", focus=base.with_(prefill_keep=0.3, prefill_layer=1))
    assert (pruned.sequences[0, 70:] != model.config.mask_id).all()
    with pytest.raises(ConfigError, match="prefill_layer=3"):
        _gen(model, ids, mode="focus", focus=base.with_(prefill_keep=0.5, prefill_layer=3))
    with pytest.raises(ConfigError, match="prefill_keep"):
        FocusConfig(prefill_keep=0.0)


def test_prefill_depth_is_prefill_layer_as_a_fraction_of_depth(llada64, monkeypatch):
    """prefill_depth=0.5 on a 4-layer model is prefill_layer=2: the plan says layer 2 and the tokens equal an
    explicit prefill_layer=2 run; on 32 layers it is 16; bad values name the fix."""
    gen_mod = importlib.import_module("focusdllm.decode.generate")

    plans, orig = [], gen_mod._sparse_plan
    monkeypatch.setattr(gen_mod, "_sparse_plan", lambda *a, **k: plans.append(orig(*a, **k)) or plans[-1])
    ids = _prompt(5, 70)
    base = FocusConfig(block_size=16, keep_ratio=0.3, min_blocks=1, num_sinks=2, prefill_keep=0.25,
                       prefill_sparse=0.3, prefill_band=0, backend="torch")
    by_depth = _gen(llada64, ids, mode="focus", focus=base.with_(prefill_depth=0.5)).sequences
    assert torch.equal(by_depth, _gen(llada64, ids, mode="focus", focus=base.with_(prefill_layer=2)).sequences)
    _gen(llada64, ids, mode="focus", focus=base)
    assert [p.prefill_layer for p in plans] == [2, 2, 1]  # default: the sink layer, 4 // 4
    assert base.with_(prefill_depth=0.5).resolve_prefill_layer(32) == 16
    with pytest.raises(ConfigError, match="prefill_depth=0.8 .layer 3. leaves no later layer"):
        base.with_(prefill_depth=0.8).resolve_prefill_layer(4)
    with pytest.raises(ConfigError, match="pass one of them"):
        FocusConfig(prefill_layer=2, prefill_depth=0.5)
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\)"):
        FocusConfig(prefill_depth=1.0)


@pytest.mark.parametrize("mode", ["fastdllm", "focus"])
def test_batch_invariance_threshold_rows_finish_at_different_steps(llada64, mode):
    """Threshold decoding: rows commit different numbers of tokens per step and finish blocks at
    different steps; each must still equal its prompt run alone (temperature > 0 included)."""
    kw = dict(mode=mode, temperature=0.8, seed=0, threshold=0.02)  # rows need 8 vs 11 steps here
    if mode == "focus":
        kw["focus"] = FocusConfig(block_size=16, keep_ratio=0.5, min_blocks=1, num_sinks=2, backend="torch")
    _assert_rows_equal_alone(llada64, [_prompt(200 + i, n)[0] for i, n in enumerate([30, 55])], kw)


def test_decode_state_is_updated_in_place_and_graph_keys_cover_host_values(monkeypatch):
    """What whole-step CUDA graphs rely on (decode/graphs.py): the block state keeps its tensors across blocks,
    and a step's graph key holds every host value the step depends on (schedule, prefix-cache suffix)."""
    from focusdllm.decode import step as step_mod

    model = focusdllm.load_model("llada-tiny", dtype=torch.float32, seed=0)
    seen, keys = [], []
    orig = step_mod.StepRunner.__call__

    def spy(self, st, t):
        seen.append(tuple(id(x) for x in (st.block_start, st.slots, st.masked, st.conf_buf)))
        keys.append((st.block, t, self.graph_key(st, t)))
        return orig(self, st, t)

    monkeypatch.setattr(step_mod.StepRunner, "__call__", spy)
    _gen(model, _prompt(0, 40), mode="fastdllm", cache="prefix", gen_length=24, block_length=8, steps=12)
    assert len(set(seen)) == 1  # the same four tensors in every block
    by_t = {(b, t): k for b, t, k in keys}
    assert all(k is None for (b, t), k in by_t.items() if t == 0)  # refreshes are never captured
    assert len({by_t[(b, 1)] for b in range(3)}) == 3  # prefix suffix differs per block -> its own graph
    keys.clear()
    _gen(model, _prompt(0, 40), mode="focus", focus=FocusConfig(block_size=16), steps=16)
    assert {k for _, t, k in keys if t > 0} == {(1, 0)}  # 1 token per step (dual: no suffix): one graph
    keys.clear()
    _gen(model, _prompt(0, 40), mode="focus", focus=FocusConfig(block_size=16), threshold=0.9)
    assert all(k is None for _, _, k in keys)  # threshold rule: host-dependent, not captured whole


@pytest.mark.parametrize("name", ["llada64", "dream64"])
def test_refresh_prompt_tail_covering_the_prompt_equals_no_reuse(name, request):
    """A response refresh that also recomputes the whole prompt (tail >= prompt) is a full refresh: the same
    tokens as no reuse, block summaries included (13 prompt blocks, 4 kept, so stale ones would change the
    choice); a short tail runs and decodes every slot. Dream's shifted logits move the strip by one."""
    model = request.getfixturevalue(name)
    ids = _prompt(5, 200)
    base = FocusConfig(block_size=16, block_score="bound", backend="torch")
    kw = dict(gen_length=32, block_length=8, steps=16, mode="focus")
    plain = generate(model, ids, focus=base, **kw)
    whole = generate(model, ids, focus=base.with_(reuse_prompt_kv=True, refresh_prompt_tail=200), **kw)
    assert torch.equal(plain.sequences, whole.sequences)
    reuse = generate(model, ids, focus=base.with_(reuse_prompt_kv=True), **kw)
    assert not torch.equal(plain.sequences, reuse.sequences)  # the test can tell reuse from a full refresh
    tail = generate(model, ids, focus=base.with_(reuse_prompt_kv=True, refresh_prompt_tail=48), **kw)
    assert tail.nfe == plain.nfe and (tail.sequences[0, 200:] != model.config.mask_id).all()
    with pytest.raises(ConfigError, match="refresh_prompt_tail"):
        FocusConfig(refresh_prompt_tail=-1)


def test_refresh_prompt_tail_moves_reuse_toward_a_full_refresh(llada64):
    """Why the presets refresh a prompt tail: with prompt-KV reuse the prompt K/V stay as the prefill left them
    (response all masks); recomputing the last 48 prompt tokens at each response refresh lets them see the
    response, and the decode agrees more with the full-refresh decode (6 prompts x 32 tokens, fp64: 119 against
    108 tokens). On focus-tiny run 8 this was one whole 8K span-copy case (bench/results/fidelity_h100_tail.json);
    run 13 decodes the suite the same with and without the tail (fidelity_h100_run13_tail.json)."""
    base = FocusConfig(block_size=16, block_score="bound", backend="torch")
    kw = dict(gen_length=32, block_length=8, steps=16, mode="focus")
    agree = {0: 0, 48: 0}
    for s in range(6):
        ids = _prompt(s, 200)
        plain = generate(llada64, ids, focus=base, **kw).sequences[0, 200:]
        for tail in agree:
            seq = generate(llada64, ids, focus=base.with_(reuse_prompt_kv=True, refresh_prompt_tail=tail), **kw)
            agree[tail] += int((seq.sequences[0, 200:] == plain).sum())
    assert agree[48] > agree[0], agree
