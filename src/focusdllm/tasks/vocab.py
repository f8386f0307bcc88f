"""The integer vocabulary of the synthetic tasks: no tokenizer, every token has a readable name."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass


def _words(n: int) -> list[str]:
    """n distinct pronounceable 4-letter filler words (consonant-vowel-consonant-vowel)."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    sylls = [c + v for c, v in itertools.product(cons, vows)]
    words = [a + b for a, b in itertools.product(sylls, repeat=2)]
    return random.Random(1234).sample(words, n)  # fixed shuffle: a varied, stable word list


@dataclass(frozen=True)
class Vocab:
    """512 ids: digits, key symbols, span symbols, filler words, markers, then bos/pad/eos/mask on top."""

    size: int = 512
    n_keys: int = 64
    n_span: int = 256
    n_filler: int = 160

    # layout: [0,10) digits | keys | span symbols | filler | markers ... | bos pad eos mask
    @property
    def digit0(self) -> int:
        return 0

    @property
    def key0(self) -> int:
        return 10

    @property
    def span0(self) -> int:
        return self.key0 + self.n_keys

    @property
    def filler0(self) -> int:
        return self.span0 + self.n_span

    @property
    def marker0(self) -> int:
        return self.filler0 + self.n_filler

    # markers
    @property
    def PASS(self) -> int:  # noqa: N802
        return self.marker0

    @property
    def KEY(self) -> int:  # noqa: N802
        return self.marker0 + 1

    @property
    def COPY(self) -> int:  # noqa: N802
        return self.marker0 + 2

    @property
    def QUERY(self) -> int:  # noqa: N802
        return self.marker0 + 3

    # specials at the top (LLaDA puts mask/eos/bos near the top too)
    @property
    def bos_id(self) -> int:
        return self.size - 4

    @property
    def pad_id(self) -> int:
        return self.size - 3

    @property
    def eos_id(self) -> int:
        return self.size - 2

    @property
    def mask_id(self) -> int:
        return self.size - 1

    def names(self) -> list[str]:
        """The readable name of every id (unused ids render as <uN>)."""
        out = [f"<u{i}>" for i in range(self.size)]
        for d in range(10):
            out[self.digit0 + d] = str(d)
        for k in range(self.n_keys):
            out[self.key0 + k] = f"k{k:02d}"
        for s in range(self.n_span):
            out[self.span0 + s] = f"x{s:03d}"
        for i, w in enumerate(_words(self.n_filler)):
            out[self.filler0 + i] = w
        for tok, name in ((self.PASS, "<pass>"), (self.KEY, "<key>"), (self.COPY, "<copy>"),
                          (self.QUERY, "<query>"), (self.bos_id, "<bos>"), (self.pad_id, "<pad>"),
                          (self.eos_id, "<eos>"), (self.mask_id, "<mask>")):
            out[tok] = name
        return out

    def decode(self, ids) -> str:
        """Token ids -> space-separated readable string."""
        names = _names(self)
        return " ".join(names[int(i)] for i in ids)

    def encode(self, text: str) -> list[int]:
        """Inverse of `decode` (whitespace-separated names)."""
        lookup = _lookup(self)
        try:
            return [lookup[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"unknown token {e.args[0]!r}; tokens are names from Vocab.names()") from e

    def model_ids(self) -> dict:
        """ModelConfig fields for a model over this vocabulary."""
        return dict(vocab_size=self.size, mask_id=self.mask_id, eos_id=self.eos_id, pad_id=self.pad_id,
                    bos_id=self.bos_id)


_NAME_CACHE: dict = {}


def _names(v: Vocab) -> list[str]:
    if v not in _NAME_CACHE:
        _NAME_CACHE[v] = v.names()
    return _NAME_CACHE[v]


def _lookup(v: Vocab) -> dict[str, int]:
    return {n: i for i, n in enumerate(_names(v))}


VOCAB = Vocab()
