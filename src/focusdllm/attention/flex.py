"""FlexAttention executor for a `KeySelection` (Focus-dLLM step 6, the fast path).

The BlockMask is built straight from the selection with `BlockMask.from_kv_blocks` (no dense
(B, H, T, Cap) mask): key blocks that are entirely kept (top-K prompt blocks, fully kept response
blocks) are FULL blocks, blocks with only some kept keys (sinks, response tails, ragged or invalid
slots) are PARTIAL blocks, where a token-level `mask_mod` decides. The `mask_mod` alone expresses the
whole selection, `(block_keep[b, h, kv // bs] | token_keep[b, h, kv]) & valid[b, kv]`, so the eager
flex path (which ignores block indices) is still correct.

Shapes are fixed by the KV capacity (index tensors have NB = Cap // block_size columns), so new
selection values or valid lengths never recompile. The compiled call is `fullgraph=True` and reports
whether the compiled graph actually ran; any eager fallback (recompile limit, a disabled Dynamo,
`force_eager` stance) raises `FlexFallbackError` instead of silently running the O(T * Cap) math path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from einops import rearrange
from torch.nn.attention.flex_attention import BlockMask, FlexKernelOptions, flex_attention

from .selection import KeySelection

Q_BLOCK = 128  # one Q tile covers up to 128 (packed) query rows; Q itself is never padded


class FlexFallbackError(RuntimeError):
    """The compiled FlexAttention call did not run compiled (it would have run eagerly, or failed)."""


def flex_available(device: torch.device | str) -> tuple[bool, str]:
    """Whether compiled flex can run on `device`; the reason (and the fix) when it cannot."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "compiled flex on CUDA needs triton (pip install triton)"
        return True, ""
    if device.type == "cpu":
        cap = torch.backends.cpu.get_cpu_capability()
        if cap in ("DEFAULT", "NO AVX", "default"):
            return False, f"compiled flex on CPU needs AVX2 or better (this CPU reports {cap})"
        import sys

        if sys.platform != "linux":
            return False, "compiled flex on CPU is only supported on Linux"
        return True, ""
    return False, f"no compiled flex backend for device type {device.type!r}"


def selection_mask_mod(sel: KeySelection, heads: int) -> Callable:
    """Token-level mask_mod with the full selection semantics.

    Args:
        sel: the selection (Hs heads).
        heads: query heads of the flex call (Hq, or Hkv when GQA is packed);
            head h reads set h // (heads // Hs).
    """
    block_keep, token_keep, valid, bs = sel.block_keep, sel.token_keep, sel.valid, sel.block_size
    div = heads // block_keep.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        hs = h // div
        return (block_keep[b, hs, kv_idx // bs] | token_keep[b, hs, kv_idx]) & valid[b, kv_idx]

    return mask_mod


def _packed_indices(blocks: torch.Tensor, n_rows: int, repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hs, NB) bool -> counts (B, H, R) int32, ascending block ids (B, H, R, NB) int32 (kept first)."""
    counts = blocks.sum(-1, dtype=torch.int32)  # (B, Hs)
    order = torch.argsort(blocks.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)
    if repeat > 1:  # per-KV-head selection, unpacked GQA: mask heads are query heads
        counts, order = counts.repeat_interleave(repeat, 1), order.repeat_interleave(repeat, 1)
    counts = counts[:, :, None].expand(-1, -1, n_rows).contiguous()  # (B, H, R)
    order = order[:, :, None, :].expand(-1, -1, n_rows, -1).contiguous()  # (B, H, R, NB)
    return counts, order


def build_block_mask(
    sel: KeySelection,
    q_len: int,
    heads: int,
    q_block: int = Q_BLOCK,
    mask_mod: Callable | None = None,
) -> BlockMask:
    """BlockMask for `sel` over the full KV capacity, built from indices (no dense mask).

    Args:
        sel: selection with Hs in {1, Hkv}; Cap = sel.valid.shape[-1].
        q_len: query rows of the flex call (T, or G*T when GQA is packed).
        heads: query heads of the flex call; the mask has H = 1 (shared set), Hs, or `heads`.
        q_block: Q tile of the mask.
        mask_mod: override of the token-level mask (tests only); default `selection_mask_mod`.
    """
    b, hs, nb = sel.block_keep.shape
    bs = sel.block_size
    cap = nb * bs
    vc, tc = sel.block_counts()  # (B, 1, NB), (B, 1|Hs, NB): block-level, no (B, Hs, Cap) pass
    full = (sel.block_keep & (vc == bs)) | (tc == bs)  # every key of the block attended -> no mask_mod
    partial = ((sel.block_keep & (vc > 0)) | (tc > 0)) & ~full  # some keys: mask_mod decides per token
    full, partial = full.expand(b, hs, nb), partial.expand(b, hs, nb)
    rows = -(-q_len // q_block)
    repeat = heads // hs if hs > 1 else 1
    part_num, part_idx = _packed_indices(partial, rows, repeat)
    full_num, full_idx = _packed_indices(full, rows, repeat)  # distinct tensors (CPU codegen bug)
    return BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(q_block, bs),
        mask_mod=mask_mod if mask_mod is not None else selection_mask_mod(sel, heads),
        seq_lengths=(q_len, cap),
        compute_q_blocks=False,
    )


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def kernel_options(
    device: torch.device, head_dim: int, block_size: int, q_len: int, group: int, mask_heads: int
) -> FlexKernelOptions | None:
    """GPU kernel options for one flex call (None on CPU).

    Args:
        head_dim: D; block_size: KV block of the mask; q_len: query rows of the call;
        group: Hq // Hkv of the call (1 when packed); mask_heads: H of the BlockMask.
    """
    if device.type != "cuda":
        return None
    opts: dict = {}
    # Main kernel needs KV_BLOCK % BLOCK_N == 0; H100 default BLOCK_N: 64 (d=128, fp32), 128 (bf16 d=64).
    if block_size < 128:
        opts["BLOCK_N"] = block_size
    # The flex-decoding kernel (Q < 128, mask H == 1 under GQA, pow2 group) picks
    # BLOCK_M = max(16, next_pow2(Q * G)), which must divide the Q block: NoValidChoicesError otherwise.
    decode = q_len < Q_BLOCK and _is_pow2(group) and (group == 1 or mask_heads == 1)
    if decode and group > 1 and max(16, 1 << (q_len * group - 1).bit_length()) > Q_BLOCK:
        if "BACKEND" in FlexKernelOptions.__annotations__:
            opts["BACKEND"] = "TRITON"  # the main kernel
        else:
            opts["FORCE_USE_FLEX_ATTENTION"] = True
    del head_dim  # defaults per head_dim are fine with a 128 Q block (BLOCK_M 128 or 32)
    return opts or None


def _flex_call(q, k, v, block_mask, scale, enable_gqa, kernel_options):
    out = flex_attention(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, kernel_options=kernel_options
    )
    return out, torch.compiler.is_compiling()  # constant True in the compiled graph, False when eager


@functools.cache
def _compiled_flex() -> Callable:
    return torch.compile(_flex_call, fullgraph=True, dynamic=False)


_FIX = (
    "Keep shapes fixed: a fixed KV capacity, the same head counts, dtype and block size per process "
    "(call torch._dynamo.reset() when they change), or raise torch._dynamo.config.recompile_limit; "
    "do not run under torch.compiler.set_stance('force_eager') or TORCHDYNAMO_DISABLE=1. "
    "Use backend='torch' (gather + SDPA) where compiled flex is not wanted."
)


def compiled_variants() -> int:
    """How many compiled variants (Dynamo cache entries) the flex call holds in this process."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(_flex_call.__code__))


def run_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    kernel_options: FlexKernelOptions | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """One flex_attention call; compiled by default, refusing any silent eager fallback.

    Args:
        q: (B, Hq, L, D); k, v: (B, Hkv, S, D); block_mask over (L, S).
        compiled: False runs the eager (unfused, O(L * S) memory) path on purpose.
    """
    gqa = q.shape[1] != k.shape[1]
    if not compiled:
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    from torch._dynamo.exc import FailOnRecompileLimitHit

    try:
        out, ran_compiled = _compiled_flex()(q, k, v, block_mask, scale, gqa, kernel_options)
    except FailOnRecompileLimitHit as e:
        raise FlexFallbackError(
            f"compiled flex_attention hit torch._dynamo recompile_limit "
            f"({torch._dynamo.config.recompile_limit}); it would fall back to eager. {_FIX}"
        ) from e
    if not ran_compiled:
        raise FlexFallbackError(f"flex_attention ran eagerly instead of compiled. {_FIX}")
    return out


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: KeySelection,
    *,
    scale: float | None = None,
    pack_gqa: bool | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """Attention over the selected keys with compiled FlexAttention.

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, Cap, D) with Cap = sel.valid.shape[-1] a multiple of block_size.
        sel: selection with Hs in {1, Hkv}.
        pack_gqa: view q as (B, Hkv, G*T, D) so K/V are read once per KV head; default on CPU when
            G*T <= 128, off on CUDA (measured slower on H100).
        compiled: False runs eager flex (tests; correct because mask_mod carries the full semantics).
    Returns:
        (B, Hq, T, D), equal to `masked_attention(q, k, v, sel.dense_mask())`.
    """
    b, hq, t, d = q.shape
    hkv, cap = k.shape[1], k.shape[2]
    hs = sel.block_keep.shape[1]
    if hs not in (1, hkv) or hq % hkv:
        raise ValueError(f"selection heads {hs} must be 1 or Hkv={hkv}; Hq={hq} a multiple of Hkv")
    if sel.valid.shape[-1] != cap or cap % sel.block_size:
        raise ValueError(f"KV capacity {cap} must equal the selection's and be a multiple of block_size")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise NotImplementedError("flex attention on CPU is inference only: run under torch.no_grad()")
    g = hq // hkv
    if pack_gqa is None:  # H100 (torch 2.11): packed Dream q16 (112 rows, decode kernel) ran 2-5x slower
        pack_gqa = q.device.type == "cpu" and g > 1 and g * t <= Q_BLOCK
    if g > 1 and pack_gqa:
        qp = rearrange(q, "b (h g) t d -> b h (g t) d", h=hkv)  # (B, Hkv, G*T, D)
        mask = build_block_mask(sel, g * t, hkv)
        opts = kernel_options(q.device, d, sel.block_size, g * t, 1, mask.kv_num_blocks.shape[1])
        out = run_flex(qp, k, v, mask, scale=scale, kernel_options=opts, compiled=compiled)
        return rearrange(out, "b h (g t) d -> b (h g) t d", t=t)  # (B, Hq, T, D)
    mask = build_block_mask(sel, t, hq)
    opts = kernel_options(q.device, d, sel.block_size, t, g, mask.kv_num_blocks.shape[1])
    return run_flex(q, k, v, mask, scale=scale, kernel_options=opts, compiled=compiled)
