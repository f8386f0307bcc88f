"""Sparse attention op speed: compiled flex vs dense SDPA vs gather + SDPA (pytest-benchmark).

GPU (bf16): keys 8K/16K/32K/64K x queries 16/32/128 x blocks kept 5/10/25% x LLaDA (32 MHA heads) and
Dream (28 q / 4 kv heads), d=128, 64-key blocks. CPU (fp32): a small subset at 4K/16K keys.
Each op includes its own index / BlockMask building (that is its per-layer cost in a decode step).
Selections: top-K random prompt blocks per selection head + 16 sinks + the last 256 (response) keys.

    pytest bench/bench_attention_ops.py --benchmark-json=bench/results/attention_ops.json
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from focusdllm.attention import KeySelection
from focusdllm.attention.flex import flex_available, flex_sparse_attention
from focusdllm.attention.gather import gather_attention

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
D, BS, N_SINKS, N_RESP = 128, 64, 16, 256
LAYOUTS = {"llada": (32, 32), "dream": (28, 4)}  # (Hq, Hkv); selection per KV head
if CUDA:
    KEYS, QUERIES, KEEPS, ROUNDS = (8192, 16384, 32768, 65536), (16, 32, 128), (0.05, 0.10, 0.25), 30
else:
    KEYS, QUERIES, KEEPS, ROUNDS = (4096, 16384), (32,), (0.10,), 5

torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # one per shape


def _cases():
    for layout in LAYOUTS:
        for keys in KEYS:
            for t in QUERIES:
                yield pytest.param(layout, keys, t, 1.0, "dense", id=f"{layout}-{keys}-q{t}-dense")
                for keep in KEEPS:
                    for backend in ("flex", "gather"):
                        yield pytest.param(layout, keys, t, keep, backend, id=f"{layout}-{keys}-q{t}-{keep}-{backend}")


@functools.lru_cache(maxsize=1)
def _qkv(layout: str, keys: int, t: int):
    hq, hkv = LAYOUTS[layout]
    g = torch.Generator(DEVICE).manual_seed(0)
    q = torch.randn(1, hq, t, D, generator=g, device=DEVICE, dtype=DTYPE)  # (B, Hq, T, D)
    k = torch.randn(1, hkv, keys, D, generator=g, device=DEVICE, dtype=DTYPE)  # (B, Hkv, Cap, D)
    v = torch.randn(1, hkv, keys, D, generator=g, device=DEVICE, dtype=DTYPE)
    return q, k, v


def _selection(hs: int, keys: int, keep: float) -> tuple[KeySelection, int]:
    """Top-K prompt blocks + sinks + response keys; also a static bound on kept keys per head."""
    g = torch.Generator(DEVICE).manual_seed(1)
    prompt = keys - N_RESP
    nb, nb_prompt = keys // BS, prompt // BS
    n_keep = max(1, math.ceil(keep * nb_prompt))
    top = torch.rand(1, hs, nb_prompt, generator=g, device=DEVICE).topk(n_keep, -1).indices
    block_keep = torch.zeros(1, hs, nb, dtype=torch.bool, device=DEVICE).scatter_(-1, top, True)
    token_keep = torch.zeros(1, hs, keys, dtype=torch.bool, device=DEVICE)
    sinks = torch.randint(0, prompt, (1, hs, N_SINKS), generator=g, device=DEVICE)
    token_keep.scatter_(-1, sinks, True)
    token_keep[..., prompt:] = True
    valid = torch.ones(1, keys, dtype=torch.bool, device=DEVICE)
    return KeySelection(block_keep, token_keep, valid, BS), n_keep * BS + N_SINKS + N_RESP


@pytest.mark.parametrize(("layout", "keys", "t", "keep", "backend"), list(_cases()))
def test_attention_op(benchmark, layout, keys, t, keep, backend):
    if backend == "flex" and not flex_available(DEVICE)[0]:
        pytest.skip(flex_available(DEVICE)[1])
    q, k, v = _qkv(layout, keys, t)
    hq, hkv = LAYOUTS[layout]
    sel, bound = _selection(hkv, keys, keep)
    if backend == "dense":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
    elif backend == "flex":
        fn = lambda: flex_sparse_attention(q, k, v, sel)
    else:
        fn = lambda: gather_attention(q, k, v, sel, max_keys=bound)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def call():
        fn()
        sync()

    with torch.no_grad():
        for _ in range(3):  # compile + warm-up outside the timed region
            call()
        benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        layout=layout, q_heads=hq, kv_heads=hkv, head_dim=D, keys=keys, queries=t, block_size=BS,
        keep_ratio=keep, density=float(sel.density().mean()) if backend != "dense" else 1.0,
        backend=backend, dtype=str(DTYPE), torch=torch.__version__,
        device=torch.cuda.get_device_name() if CUDA else f"cpu ({torch.get_num_threads()} threads)",
    )
