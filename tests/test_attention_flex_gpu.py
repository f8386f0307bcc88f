"""The compiled flex properties on CUDA (Triton kernel): split-KV and plain, fp32 tight, bf16 by the flash rule.

Skipped without a GPU (marker `gpu`); run on the H100 with the rest of the suite (bench/results/gpu_tests_*.log).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_flex import SHAPES, make_case, ref64

from focusdllm.attention import masked_attention
from focusdllm.attention.flex import flex_sparse_attention

pytestmark = pytest.mark.gpu

CUDA_SHAPES = SHAPES[:4] + [(1, 28, 4, 4, 32)]  # + Dream's 7:1 heads, unpacked


def _cuda(q, k, v, sel):
    for name in ("block_keep", "token_keep", "valid"):
        setattr(sel, name, getattr(sel, name).cuda())
    return q.cuda(), k.cuda(), v.cuda(), sel


@pytest.fixture(autouse=True)
def _inference():
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        yield


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from(CUDA_SHAPES),
    p_block=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    splits=st.sampled_from([None, 1, 2, 4]),
)
def test_flex_cuda_fp32_equals_dense(seed, shape, p_block, splits):
    q, k, v, sel = _cuda(*make_case(seed, *shape, p_block=p_block))
    out = flex_sparse_attention(q, k, v, sel, splits=splits)
    torch.testing.assert_close(out.double(), ref64(q, k, v, sel), atol=2e-3, rtol=0)  # TF32 dots


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(CUDA_SHAPES), splits=st.sampled_from([1, 4]))
def test_flex_cuda_bf16_flash_rule(seed, shape, splits):
    q, k, v, sel = _cuda(*make_case(seed, *shape, dtype=torch.bfloat16))
    ref = ref64(q, k, v, sel)
    base = (masked_attention(q, k, v, sel.dense_mask()).double() - ref).abs().max()
    err = (flex_sparse_attention(q, k, v, sel, splits=splits).double() - ref).abs().max()
    assert err <= 2 * base + 1e-3, (err, base)
