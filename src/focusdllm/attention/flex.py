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
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, FlexKernelOptions, flex_attention

from ..compiled import CompileFallbackError, compiled_on_cuda, run_checked
from .selection import KeySelection, block_counts

Q_BLOCK = 128  # one Q tile covers up to 128 (packed) query rows (split-KV pads Q to a multiple of 16)
CPU_KV_BLOCK = 16  # CPU mask tile: a lone sink costs a 16-key partial tile, not a whole 64-key block


FlexFallbackError = CompileFallbackError  # the compiled flex call would have run eagerly


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


def kv_block_lists(blocks: torch.Tensor, splits: int, repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept block ids, ascending, dealt round-robin to `splits` Q-tile rows (the split-KV schedule).

    Args:
        blocks: (B, Hs, NB) bool; splits: S; repeat: mask heads per selection head (unpacked GQA).
    Returns:
        counts (B, H, S) int32 and ids (B, H, S, ceil(NB / S)) int32; split s holds the kept blocks of
        rank s, s + S, s + 2S, ... (a cumsum and a scatter, no sort).
    """
    b, hs, nb = blocks.shape
    width = -(-nb // splits)
    counts = blocks.sum(-1, dtype=torch.int32)  # (B, Hs)
    slot = blocks.cumsum(-1) - 1  # (B, Hs, NB): rank of each kept block
    dst = torch.where(blocks, slot, width * splits)  # dropped blocks land in the spare slot
    src = torch.arange(nb, device=blocks.device, dtype=torch.int32).expand(b, hs, nb)
    ids = torch.zeros(b, hs, width * splits + 1, dtype=torch.int32, device=blocks.device)
    ids = ids.scatter_(-1, dst, src)[..., : width * splits]
    ids = rearrange(ids, "b h (w s) -> b h s w", s=splits)  # rank r -> split r % S, column r // S
    split = torch.arange(splits, device=blocks.device, dtype=torch.int32)
    counts = ((counts[..., None] - split + splits - 1) // splits).clamp(min=0)  # (B, Hs, S)
    if repeat > 1:  # per-KV-head selection, unpacked GQA: mask heads are query heads
        counts, ids = counts.repeat_interleave(repeat, 1), ids.repeat_interleave(repeat, 1)
    return counts.contiguous(), ids.contiguous()


def block_lists(
    block_keep: torch.Tensor, vc: torch.Tensor, tc: torch.Tensor, bs: int, splits: int, repeat: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(partial counts, partial ids, full counts, full ids) of a selection, see `kv_block_lists`.

    A kept block whose every slot is valid, or a block whose every slot is token-kept, is FULL (no
    mask_mod); any other block with some kept key is PARTIAL (mask_mod decides per token).
    """
    full = (block_keep & (vc == bs)) | (tc == bs)
    partial = ((block_keep & (vc > 0)) | (tc > 0)) & ~full
    shape = block_keep.shape
    part = kv_block_lists(partial.expand(shape), splits, repeat)
    full = kv_block_lists(full.expand(shape), splits, repeat)  # distinct tensors (CPU codegen bug)
    return (*part, *full)


def build_block_mask(
    sel: KeySelection,
    q_len: int,
    heads: int,
    q_block: int = Q_BLOCK,
    mask_mod: Callable | None = None,
    splits: int = 1,
    kv_block: int | None = None,
) -> BlockMask:
    """BlockMask for `sel` over the full KV capacity, built from indices (no dense mask).

    Args:
        sel: selection with Hs in {1, Hkv}; Cap = sel.valid.shape[-1].
        q_len: query rows of the flex call (T, or G*T when GQA is packed); with splits > 1, the rows of
            ONE split, a multiple of q_block (the call's query is the S splits stacked).
        heads: query heads of the flex call; the mask has H = 1 (shared set), Hs, or `heads`.
        q_block: Q tile of the mask.
        mask_mod: override of the token-level mask (tests only); default `selection_mask_mod`.
        splits: S > 1 deals the kept blocks round-robin to S stacked copies of the queries (split-KV).
        kv_block: KV tile of the mask, a divisor of sel.block_size (default: block_size). A smaller tile
            wastes less on partial tiles (a lone sink) but costs one pass over token_keep for its counts.
    """
    b, hs, nb = sel.block_keep.shape
    bs = sel.block_size
    kv = bs if kv_block is None else kv_block
    if bs % kv:
        raise ValueError(f"kv_block ({kv}) must divide the selection block size ({bs})")
    rows = -(-q_len // q_block)
    if splits > 1 and q_len % q_block:
        raise ValueError(f"split-KV needs q_len ({q_len}) to be a multiple of q_block ({q_block})")
    repeat = heads // hs if hs > 1 else 1
    keep = sel.block_keep  # (B, Hs, NB)
    if kv == bs:
        vc, tc = sel.block_counts()  # (B, 1, NB), (B, 1|Hs, NB): block-level, no (B, Hs, Cap) pass
    else:
        keep = keep.repeat_interleave(bs // kv, -1)  # (B, Hs, Cap // kv): a kept block keeps its tiles
        vc, tc = block_counts(sel.token_keep, sel.valid, kv)  # (B, 1, Cap // kv), (B, 1|Hs, Cap // kv)
    lists = compiled_on_cuda(block_lists)(keep, vc, tc, kv, splits, repeat)  # few kernels on CUDA
    # (B, H, S[, W]) -> (B, H, S * rows[, W]): the Q tiles of split s all read split s's blocks
    lists = [x.repeat_interleave(rows, 2) if rows > 1 else x for x in lists]
    return BlockMask.from_kv_blocks(
        *lists,
        BLOCK_SIZE=(q_block, kv),
        mask_mod=mask_mod if mask_mod is not None else selection_mask_mod(sel, heads),
        seq_lengths=(q_len * splits, nb * bs),
        compute_q_blocks=False,
    )


def mask_kv_block(device: torch.device, block_size: int) -> int:
    """KV tile of the flex mask: `CPU_KV_BLOCK` on CPU when it divides block_size, else block_size.

    The CPU kernel is compute bound and runs every partial tile in full: with 64-key tiles each lone sink
    cost 64 keys (16K keys, 10% kept, 16 sinks: ~2.9K keys run for ~1.9K kept). 16-key tiles cut that to
    ~2.2K with no measurable per-tile cost; 8-key tiles ran 2x slower (1 thread, LLaDA heads: 64 / 32 / 16 /
    8 -> 38 / 31 / 28 / 64 ms). CUDA keeps the selection block (its Triton tiles need it).
    """
    if device.type == "cpu" and block_size > CPU_KV_BLOCK and block_size % CPU_KV_BLOCK == 0:
        return CPU_KV_BLOCK
    return block_size


def kernel_options(device: torch.device, block_size: int, q_len: int) -> FlexKernelOptions | None:
    """GPU kernel options for one flex call (None on CPU).

    Short queries (<= 128 rows) use the main Triton kernel with 16-row Q tiles: on an H100 at 32K keys,
    10% kept, 32 queries (bench/results/probe_flex_h100.json) it took 82 us against 109 us with its default
    tile and 157 us for the flex-decoding kernel. Split-KV parallelism comes from `splits` instead.
    """
    if device.type != "cuda":
        return None
    opts: dict = {"BACKEND": "TRITON"} if "BACKEND" in FlexKernelOptions.__annotations__ else {}
    if block_size < 128:  # the kernel needs KV_BLOCK % BLOCK_N == 0
        opts["BLOCK_N"] = block_size
    if q_len <= Q_BLOCK:
        opts["BLOCK_M"] = 16
    return opts or None


def _flex_call(q, k, v, block_mask, scale, enable_gqa, kernel_options, splits: int):
    """flex_attention; with splits > 1, q (B, H, L, D) is padded to a 16-row tile, stacked `splits` times, and
    the partial results merged by log-sum-exp, all inside one compiled graph (pad, kernel, merge fuse).

    Returns (out, ran_compiled) itself rather than through `compiled.flagged`, so the Dynamo cache entries
    live on this function's own code object (`compiled_variants`)."""
    if splits == 1:
        out = flex_attention(
            q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, kernel_options=kernel_options
        )
        return out, torch.compiler.is_compiling()  # True only when compiled
    rows = q.shape[2]
    qs = F.pad(q, (0, 0, 0, -rows % 16)).repeat(1, 1, splits, 1)  # (B, H, S * tile, D)
    out, aux = flex_attention(
        qs, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, kernel_options=kernel_options,
        return_aux=AuxRequest(lse=True),
    )
    return merge_splits(out, aux.lse, splits, rows), torch.compiler.is_compiling()


@functools.cache
def _compiled_flex() -> Callable:
    return torch.compile(_flex_call, fullgraph=True, dynamic=False)


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
    splits: int = 1,
) -> torch.Tensor:
    """One flex_attention call; compiled by default, refusing any silent eager fallback.

    Args:
        q: (B, Hq, L, D); k, v: (B, Hkv, S, D); block_mask over (L, S), or with splits > 1 over
            (splits * ceil16(L), S) (see `build_block_mask`).
        compiled: False runs the eager (unfused, O(L * S) memory) path on purpose.
        splits: split-KV factor (CUDA only when compiled: CPU flex does not return the log-sum-exp).
    """
    gqa = q.shape[1] != k.shape[1]
    if not compiled:
        return _flex_call(q, k, v, block_mask, scale, gqa, None, splits)[0]
    return run_checked(_compiled_flex(), q, k, v, block_mask, scale, gqa, kernel_options, splits)


def default_splits(device: torch.device, batch: int, heads: int, q_len: int) -> int:
    """Split-KV factor: enough 16-row Q tiles to fill the GPU twice over (1 on CPU and for long queries)."""
    if device.type != "cuda" or q_len > Q_BLOCK:
        return 1
    tiles = batch * heads * -(-q_len // 16)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(8, round(2 * sms / tiles)))


def merge_splits(out: torch.Tensor, lse: torch.Tensor, splits: int, q_len: int) -> torch.Tensor:
    """Combine per-split partial attention by their log-sum-exp (split-KV reduction).

    Args:
        out: (B, H, S * Lp, D) partial outputs; lse: (B, H, S * Lp); q_len: real rows L <= Lp.
    Returns:
        (B, H, L, D) in out's dtype; a split that kept no key has lse = -inf and weight 0.
    """
    o = rearrange(out, "b h (s t) d -> b h s t d", s=splits)[..., :q_len, :]  # (B, H, S, L, D)
    w = torch.softmax(rearrange(lse, "b h (s t) -> b h s t", s=splits)[..., :q_len].float(), dim=2)
    return torch.einsum("bhstd,bhst->bhtd", o.float(), w).to(out.dtype)


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: KeySelection,
    *,
    scale: float | None = None,
    pack_gqa: bool | None = None,
    compiled: bool = True,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention over the selected keys with compiled FlexAttention.

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, Cap, D) with Cap = sel.valid.shape[-1] a multiple of block_size.
        sel: selection with Hs in {1, Hkv}.
        pack_gqa: view q as (B, Hkv, G*T, D) so K/V are read once per KV head; default on CPU when
            G*T <= 128, off on CUDA (measured slower on H100).
        compiled: False runs eager flex (tests; correct because mask_mod carries the full semantics).
        splits: split-KV factor S (default `default_splits`: 1 on CPU). With S > 1 the queries are
            stacked S times, Q tile s attends to every S-th kept block, and the partial results are merged
            by log-sum-exp: S times more thread blocks for a few queries over a long, sparse cache.
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
    packed = g > 1 and pack_gqa
    qx = rearrange(q, "b (h g) t d -> b h (g t) d", h=hkv) if packed else q  # (B, Hc, L, D)
    heads, rows = qx.shape[1], qx.shape[2]
    s = default_splits(q.device, b, heads, rows) if splits is None else splits
    if s > 1 and rows > Q_BLOCK:
        raise ValueError(f"split-KV is for short queries: {rows} rows > {Q_BLOCK}; pass splits=1")
    if s > 1 and compiled and q.device.type != "cuda":
        raise ValueError("split-KV needs the log-sum-exp, which compiled CPU flex does not return; pass splits=1")
    tile = rows if s == 1 else -(-rows // 16) * 16  # with split-KV, one 16-row-aligned Q tile per split
    kv = mask_kv_block(q.device, sel.block_size)
    mask = build_block_mask(sel, tile, heads, q_block=Q_BLOCK if s == 1 else tile, splits=s, kv_block=kv)
    opts = kernel_options(q.device, kv, tile)
    out = run_flex(qx, k, v, mask, scale=scale, kernel_options=opts, compiled=compiled, splits=s)
    return rearrange(out, "b h (g t) d -> b (h g) t d", t=t) if packed else out  # (B, Hq, T, D)
