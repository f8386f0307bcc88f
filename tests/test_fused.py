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
