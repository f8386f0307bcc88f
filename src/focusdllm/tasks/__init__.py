"""Synthetic long-context tasks (passkey, multi-key needle, span copy) over a small integer vocabulary."""

from .generators import (
    GEN_LENGTH,
    TASKS,
    ask_other_key,
    generate_case,
    make_cases,
    needles,
    read_jsonl,
    render,
    target_ids,
    write_jsonl,
)
from .scoring import dense_decode, evaluate, exact_match
from .vocab import VOCAB, Vocab

__all__ = [
    "GEN_LENGTH", "TASKS", "VOCAB", "Vocab", "ask_other_key", "dense_decode", "evaluate", "exact_match",
    "generate_case", "make_cases", "needles", "read_jsonl", "render", "target_ids", "write_jsonl",
]
