"""One entry point for sparse attention over a `KeySelection`, with explicit backend choice."""

from __future__ import annotations

import torch

from .flex import flex_available, flex_sparse_attention
from .gather import gather_attention
from .selection import KeySelection

BACKENDS = ("auto", "torch", "flex")
_FLEX_DTYPES = {
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "cpu": (torch.float32, torch.bfloat16),  # the C++ template; fp16 works but is not faster
}


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype, group: int = 1) -> str:
    """Concrete backend ("torch" or "flex") for a request.

    "auto" picks compiled flex on CUDA and on AVX2+ Linux CPUs for fp32/bf16 (fp16 too on CUDA), and
    gather + SDPA ("torch") otherwise; on CPU, short-query attention with grouped KV heads (`group` =
    Hq // Hkv > 1, e.g. Dream's 7:1) also goes to gather, which measured faster there (16K keys, 10 %, 32
    queries: 10.0x vs flex's 6.5x over dense; bench/results/attention_ops_cpu.json). MHA (LLaDA) stays on
    flex: 5.3x vs gather's 4.8x at 16K (gather leads at 4K, 3.4x vs 2.9x, where both are far from 5x).
    An explicit "flex" that cannot run raises, naming the fix: there is no silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    device = torch.device(device)
    ok, why = flex_available(device)
    dtype_ok = dtype in _FLEX_DTYPES.get(device.type, ())
    if backend == "auto":
        return "flex" if ok and dtype_ok and not (device.type == "cpu" and group > 1) else "torch"
    if not ok:
        raise RuntimeError(f"attention backend 'flex' unavailable: {why}; use backend='torch' or 'auto'")
    if not dtype_ok:
        raise RuntimeError(
            f"attention backend 'flex' does not support {dtype} on {device.type} "
            f"(supported: {_FLEX_DTYPES.get(device.type, ())}); cast, or use backend='torch' or 'auto'"
        )
    return "flex"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: KeySelection,
    backend: str = "auto",
    *,
    max_keys: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax attention of q over the keys kept by `sel` (Focus-dLLM step 6).

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, Cap, D); sel: selection over Cap with Hs in {1, Hkv}.
        backend: "auto", "torch" (gather + SDPA) or "flex" (compiled FlexAttention).
        max_keys: static bound on kept keys per row for the torch backend (avoids a host sync).
    Returns:
        (B, Hq, T, D), equal to `masked_attention(q, k, v, sel.dense_mask())`.
    """
    if resolve_backend(backend, q.device, q.dtype) == "flex":
        return flex_sparse_attention(q, k, v, sel, scale=scale)
    return gather_attention(q, k, v, sel, max_keys=max_keys, scale=scale)
