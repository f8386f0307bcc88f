"""Seeded long-context task generators (RULER-style JSONL cases) over the integer `Vocab`.

Every prompt is `<bos> haystack ... <query> ...` with the query at the end; the prompt's last
tokens repeat the needle's marker so the answer is "what followed this marker earlier":

- passkey:  needle `<pass> d1..dk`,              query `<query> <pass>`       -> d1..dk
- multikey: needles `<key> kX v1..vm` (several), query `<query> <key> kX`     -> v1..vm of kX
- spancopy: needles `<copy> kX x..x` (several),  query `<query> <copy> kX`    -> the 32-96 symbols after kX

Digits inside needles never repeat a bigram within a case (so a 2-token context is unique) and span
symbols are unique within a case. Span copy's target span (32-96 symbols) is always longer than its distractors
(8-16), so a model can solve it without reading the key: `ask_other_key` (`focusdllm eval --ask-other`) tells.
Filler is uniform random words. A case's `input` has exactly `length` tokens; the model generates `gen_length`
tokens (a multiple of 32): the answer, then EOS.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .vocab import VOCAB, Vocab

TASKS = ("passkey", "multikey", "spancopy")
_TASK_ID = {t: i for i, t in enumerate(TASKS)}
GEN_LENGTH = {"passkey": 32, "multikey": 32, "spancopy": 128}


def _digits(rng: random.Random, n: int, used: set, prev: int, v: Vocab, tries: int = 100) -> list[int]:
    """n digit tokens such that no (prev, next) bigram repeats one already in `used` (added to it).

    A draw can reach a digit whose every successor is used; it is then drawn again from the start (the first
    draw, the usual case, consumes `rng` exactly as a single pass does).
    """
    for _ in range(tries):
        out, new, p = [], set(), prev
        for _ in range(n):
            choices = [t for t in range(v.digit0, v.digit0 + 10) if (p, t) not in used and (p, t) not in new]
            if not choices:
                break
            tok = rng.choice(choices)
            new.add((p, tok))
            out.append(tok)
            p = tok
        else:
            used |= new
            return out
    raise ValueError("ran out of unique digit bigrams; use fewer or shorter needles")


def _assemble(filler: list[int], needles: list[tuple[int, list[int]]], target: int) -> tuple[list[int], int]:
    """Insert needles (filler offset, tokens) into filler; returns tokens and the target needle's start."""
    order = sorted(range(len(needles)), key=lambda i: (needles[i][0], i != target, i))
    out, last, start = [], 0, -1
    for i in order:
        at, toks = needles[i]
        out.extend(filler[last:at])
        last = at
        if i == target:
            start = len(out)
        out.extend(toks)
    out.extend(filler[last:])
    return out, start


def generate_case(
    task: str,
    rng: random.Random,
    length: int,
    depth: float | None = None,
    gen_length: int | None = None,
    answer_len: int | None = None,
    n_needles: int | None = None,
    vocab: Vocab = VOCAB,
) -> dict:
    """One case of `task` whose prompt has exactly `length` tokens; the target needle sits at `depth`.

    Args:
        task: "passkey", "multikey" or "spancopy".
        rng: the case's random source.
        length: prompt tokens (bos + haystack + needles + query).
        depth: fraction of the filler before the target needle, in [0, 1]; None draws it uniformly.
        gen_length: generated tokens (answer + EOS padding); default 32 (128 for spancopy).
        answer_len: answer tokens; default drawn from 5-10 (passkey), 4-8 (multikey), 32-96 (spancopy).
        n_needles: needles in the haystack including the target (passkey: always 1).
    """
    if task not in _TASK_ID:
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
    v = vocab
    gen_length = GEN_LENGTH[task] if gen_length is None else gen_length
    if depth is None:
        depth = rng.random()
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    used: set = set()
    if task == "passkey":
        k = rng.randint(5, 10) if answer_len is None else answer_len
        answer = _digits(rng, k, used, v.PASS, v)
        needles, target = [[v.PASS, *answer]], 0
        query = [v.QUERY, v.PASS]
    elif task == "multikey":
        m = rng.randint(4, 8) if answer_len is None else answer_len
        n = 4 if n_needles is None else n_needles
        keys = [v.key0 + k for k in rng.sample(range(v.n_keys), n)]
        needles = [[v.KEY, kk, *_digits(rng, m, used, kk, v)] for kk in keys]
        target, answer = 0, needles[0][2:]
        query = [v.QUERY, v.KEY, keys[0]]
    else:
        s = rng.randint(32, 96) if answer_len is None else answer_len
        n = 3 if n_needles is None else n_needles
        lens = [s] + [rng.randint(8, 16) for _ in range(n - 1)]
        if sum(lens) > v.n_span:
            raise ValueError(f"spans need {sum(lens)} unique symbols but the vocab has {v.n_span}")
        syms = [v.span0 + x for x in rng.sample(range(v.n_span), sum(lens))]
        keys = [v.key0 + k for k in rng.sample(range(v.n_keys), n)]
        needles, o = [], 0
        for kk, ln in zip(keys, lens):
            needles.append([v.COPY, kk, *syms[o:o + ln]])
            o += ln
        target, answer = 0, needles[0][2:]
        query = [v.QUERY, v.COPY, keys[0]]
    if gen_length < len(answer) + 1:
        raise ValueError(f"gen_length={gen_length} leaves no EOS after a {len(answer)}-token answer")
    n_fill = length - 1 - len(query) - sum(len(nd) for nd in needles)
    if n_fill < 0:
        raise ValueError(f"length={length} is too short for {task}; need at least {length - n_fill}")
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    filler = (torch.randint(0, v.n_filler, (n_fill,), generator=g) + v.filler0).tolist()
    offsets = [round(depth * n_fill)] + [rng.randint(0, n_fill) for _ in needles[1:]]
    hay, start = _assemble(filler, list(zip(offsets, needles)), target)
    prompt = [v.bos_id, *hay, *query]
    assert len(prompt) == length
    return {
        "task": task, "input": prompt, "outputs": answer, "length": length, "gen_length": gen_length,
        "depth": depth, "needle_pos": 1 + start, "answer_pos": 1 + start + len(needles[target]) - len(answer),
    }


def make_cases(
    task: str, n: int, length: int, seed: int = 0, depth: float | None = None, **kw
) -> list[dict]:
    """n cases of `task` with `length`-token prompts; case i depends only on (task, length, seed, i).

    Fields: index, input (token ids), outputs (answer ids), length, gen_length, depth, needle_pos,
    answer_pos (where the answer's first token sits in `input`), task, seed. See `generate_case`.
    """
    cases = []
    for i in range(n):
        rng = random.Random(((seed * 1_000_003 + _TASK_ID[task]) * 1_000_033 + length) * 1_000_037 + i)
        c = generate_case(task, rng, length, depth=depth, **kw)
        cases.append({"index": i, **c, "seed": seed})
    return cases


def ask_other_key(case: dict, vocab: Vocab = VOCAB) -> dict:
    """The same haystack with the query naming another needle's key (the first other one in the prompt).

    Its answer is that needle's tokens: a model that answers the original target instead reads something other
    than the key (span copy's target is always its longest span). `depth` becomes the asked needle's place in
    the prompt. Multikey and span copy only: a passkey case has one needle.
    """
    if case["task"] not in ("multikey", "spancopy"):
        raise ValueError(f"{case['task']} has one needle: ask_other_key needs multikey or spancopy cases")
    inp = list(case["input"])
    other = next((nd for nd in needles(case, vocab) if nd[1] != inp[-1]), None)
    if other is None:
        raise ValueError("the case has one needle: make it with n_needles >= 2 to ask for another key")
    at, key, value = other
    inp[-1] = key
    return {**case, "input": inp, "outputs": value, "depth": at / len(inp), "needle_pos": at,
            "answer_pos": at + 2, "asked": "other"}


def needles(case: dict, vocab: Vocab = VOCAB) -> list[tuple[int, int, list[int]]]:
    """The needles of a multikey or span-copy case in prompt order: (position of the marker, key, value tokens)."""
    v, inp = vocab, case["input"]
    marker, lo, hi = (v.KEY, v.digit0, v.digit0 + 10) if case["task"] == "multikey" else \
        (v.COPY, v.span0, v.span0 + v.n_span)
    body, out = len(inp) - 3, []  # the query's 3 tokens are not needles
    for at in range(1, body):
        if inp[at] == marker:
            end = at + 2
            while end < body and lo <= inp[end] < hi:
                end += 1
            out.append((at, inp[at + 1], inp[at + 2:end]))
    return out


def target_ids(case: dict, eos_id: int = VOCAB.eos_id) -> list[int]:
    """The full generation region a perfect model writes: answer then EOS up to gen_length."""
    return case["outputs"] + [eos_id] * (case["gen_length"] - len(case["outputs"]))


def render(case: dict, vocab: Vocab = VOCAB, max_tokens: int | None = 200) -> str:
    """A readable rendering of a case (the haystack elided beyond `max_tokens`)."""
    ids = case["input"]
    if max_tokens is not None and len(ids) > max_tokens:
        a, p = max_tokens // 2, case["needle_pos"]
        head, needle = vocab.decode(ids[:a // 2]), vocab.decode(ids[p:p + len(case["outputs"]) + 3])
        tail = vocab.decode(ids[-a // 2:])
        text = f"{head} ... [{p}] {needle} ... {tail}"
    else:
        text = vocab.decode(ids)
    return f"{text}  =>  {vocab.decode(case['outputs'])}"


def write_jsonl(cases: list[dict], path: str | Path) -> Path:
    """Write cases one JSON object per line (RULER's validation.jsonl shape plus our fields)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for c in cases:
            f.write(json.dumps(c) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
