"""The library's `focusdllm.generate` against the oracle `reference.generate`, token for token, on tiny
float64 checkpoints in the official layouts (written once, read by both: the library's loader is
under test too). Skips when the library has no `generate` yet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference  # noqa: E402
from reference.tiny import tiny_checkpoint, tiny_config  # noqa: E402

focusdllm = pytest.importorskip("focusdllm")
if not hasattr(focusdllm, "generate") or not hasattr(focusdllm, "FocusConfig"):
    pytest.skip("focusdllm.generate does not exist yet", allow_module_level=True)

SETTINGS = settings(deadline=None, max_examples=25, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (reference Checkpoint, library model) of the same float64 official-layout folder."""
    from safetensors.torch import save_file

    out = {}
    for arch in ("llada", "dream"):
        folder = tmp_path_factory.mktemp(arch)
        ck = tiny_checkpoint(arch, seed=11)
        (folder / "config.json").write_text(json.dumps(tiny_config(arch)))
        save_file(ck.weights, str(folder / "model.safetensors"))
        out[arch] = (reference.load_checkpoint(folder), focusdllm.load_model(folder, dtype=torch.float64))
    return out


def _prompt(n, seed):
    return torch.randint(0, 120, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def compare(models, arch, prompt, focus_kw=None, **kw):
    ck, lib = models[arch]
    ref_tokens, ref_nfe = reference.generate(ck, prompt, focus=focus_kw, **kw)
    fc = focusdllm.FocusConfig(**focus_kw) if focus_kw is not None else None
    out = focusdllm.generate(lib, torch.tensor([prompt]), focus=fc, **kw)
    got = out.sequences[0].tolist()
    diff = [i for i, (a, b) in enumerate(zip(got, ref_tokens)) if a != b]
    assert got == ref_tokens and int(out.nfe) == ref_nfe, (
        f"{arch} {kw} focus={focus_kw}: first differing positions {diff[:8]} (prompt {len(prompt)}), "
        f"nfe lib {out.nfe} ref {ref_nfe}"
    )


CASES = [
    dict(mode="vanilla"),
    dict(mode="fastdllm", cache="dual"),
    dict(mode="fastdllm", cache="prefix"),
    dict(mode="fastdllm", cache="dual", threshold=0.05),
    dict(mode="fastdllm", cache="dual", factor=1.0),
    dict(mode="vanilla", temperature=0.8, seed=5),
    dict(mode="fastdllm", cache="dual", remasking="random", seed=2),
]


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_baseline_modes_match(models, arch, case):
    compare(models, arch, _prompt(37, 1), gen_length=16, block_length=8, steps=16, **case)


FOCUS_CASES = [
    dict(keep_ratio=1.0, num_sinks=2, window=3),
    dict(keep_ratio=0.25, num_sinks=2, window=3, min_blocks=1),
    dict(keep_ratio=0.5, num_sinks=0, window=5, min_blocks=1, per_head=False),
    dict(keep_ratio=0.25, num_sinks=4, window=3, min_blocks=1, window_past_block=True),
    dict(keep_ratio=0.25, num_sinks=1, window=1, min_blocks=2, extra_focus=1, sink_layer=0),
]


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("fk", FOCUS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("rule", [{}, {"threshold": 0.05}, {"factor": 1.0}], ids=["fixed", "thr", "factor"])
def test_focus_matches(models, arch, fk, rule):
    compare(models, arch, _prompt(90, 2), focus_kw=dict(block_size=16, **fk), gen_length=16, block_length=8,
            steps=16, mode="focus", **rule)


@SETTINGS
@given(data=st.data())
def test_random_configs_match(models, data):
    arch = data.draw(st.sampled_from(["llada", "dream"]))
    p = data.draw(st.integers(20, 150))
    gen = data.draw(st.sampled_from([8, 16, 32]))
    bl = data.draw(st.sampled_from([b for b in (4, 8, 16) if gen % b == 0]))
    steps = (gen // bl) * data.draw(st.sampled_from([1, 2, bl]))
    mode = data.draw(st.sampled_from(["vanilla", "fastdllm", "focus"]))
    kw = dict(gen_length=gen, block_length=bl, steps=steps, mode=mode,
              cache=data.draw(st.sampled_from(["dual", "prefix"])) if mode == "fastdllm" else "dual",
              temperature=data.draw(st.sampled_from([0.0, 0.0, 0.7])),
              remasking=data.draw(st.sampled_from(["low_confidence", "low_confidence", "random"])),
              seed=data.draw(st.integers(0, 1000)))
    rule = data.draw(st.sampled_from(["fixed", "threshold", "factor"]))
    if rule == "threshold":
        kw["threshold"] = data.draw(st.sampled_from([0.02, 0.05, 0.9]))
    elif rule == "factor":
        kw["factor"] = data.draw(st.sampled_from([0.5, 1.0, 2.0]))
    fk = None
    if mode == "focus":
        fk = dict(block_size=16, num_sinks=data.draw(st.integers(0, 4)),
                  keep_ratio=data.draw(st.sampled_from([0.25, 0.5, 1.0])),
                  min_blocks=data.draw(st.integers(1, 4)), window=data.draw(st.sampled_from([1, 3, 5])),
                  per_head=data.draw(st.booleans()), window_past_block=data.draw(st.booleans()),
                  extra_focus=data.draw(st.integers(0, 1)), sink_layer=data.draw(st.sampled_from([None, 0, 2, 3])))
    compare(models, arch, _prompt(p, data.draw(st.integers(0, 10**6))), focus_kw=fk, **kw)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_forward_logits_close(models, arch):
    """Dense logits agree; the library's fp64 forward computes RoPE tables and RMSNorm statistics in
    fp32 (measured ~3e-6 absolute, ~1e-7 relative, from the fp64 oracle), so the tolerance is
    fp32-sized, not fp64-sized."""
    from reference.model import full_forward, logits_of

    ck, lib = models[arch]
    x = _prompt(150, 3)
    ref = logits_of(ck, full_forward(ck, x)[0])
    with torch.no_grad():
        got = lib(torch.tensor([x]))[0]
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, err
