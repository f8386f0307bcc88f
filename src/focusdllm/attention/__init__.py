"""Sparse attention over a fixed-capacity KV cache: one selection format, several executors.

A `KeySelection` says which cached keys each query attends to. Its full semantics are
`keep[b, h, s] = (block_keep[b, h, s // block_size] | token_keep[b, h, s]) & valid[b, s]`;
every backend (dense mask, gather + SDPA, FlexAttention) computes softmax attention over exactly
those keys.
"""

from .dense import masked_attention
from .selection import KeySelection

__all__ = ["KeySelection", "masked_attention"]
