"""torch.compile without silent eager fallback: a compiled call that would run eagerly raises instead."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

FIX = (
    "Keep shapes fixed: a fixed KV capacity, the same head counts, dtype and block size per process "
    "(call torch._dynamo.reset() when they change), or raise torch._dynamo.config.recompile_limit; "
    "do not run under torch.compiler.set_stance('force_eager') or TORCHDYNAMO_DISABLE=1. "
    "Where compiled kernels are not wanted: backend='torch' (gather + SDPA) for attention, model.fuse(False) "
    "for the fused blocks."
)


class CompileFallbackError(RuntimeError):
    """A compiled call did not run compiled (it would have run eagerly, or failed)."""


def flagged(fn: Callable) -> Callable:
    """fn -> fn returning (*outputs, ran_compiled); `is_compiling()` is the constant True in a compiled graph."""

    @functools.wraps(fn)
    def call(*args):
        out = fn(*args)
        return (*(out if isinstance(out, tuple) else (out,)), torch.compiler.is_compiling())

    return call


def run_checked(compiled: Callable, *args):
    """Run a `torch.compile(flagged(fn))`; raise `CompileFallbackError` on an eager fallback."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    try:
        *out, ran_compiled = compiled(*args)
    except FailOnRecompileLimitHit as e:
        raise CompileFallbackError(
            f"a compiled call hit torch._dynamo recompile_limit ({torch._dynamo.config.recompile_limit}); "
            f"it would fall back to eager. {FIX}"
        ) from e
    if not ran_compiled:
        raise CompileFallbackError(f"a compiled call ran eagerly. {FIX}")
    return out[0] if len(out) == 1 else tuple(out)


@functools.cache
def compiled_on_cuda(fn: Callable) -> Callable:
    """`fn` on CPU tensors, compiled (fullgraph, fallback-checked) when the first arg is CUDA.

    Shapes are automatically dynamic (`dynamic=None`): a second prompt length or batch size recompiles once
    with symbolic sizes instead of once per shape, so an eval over many lengths stays under the recompile limit.
    """
    compiled = torch.compile(flagged(fn), fullgraph=True, dynamic=None)

    @functools.wraps(fn)
    def call(*args):
        return run_checked(compiled, *args) if args[0].is_cuda else fn(*args)

    return call
