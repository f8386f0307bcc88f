"""Training data of focus-tiny (bench/train_tiny.py): the length curriculum, task rows from
`focusdllm.tasks`, and auxiliary induction "copy rows" that give a dense copy signal."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from focusdllm.tasks import GEN_LENGTH, TASKS, VOCAB, ask_other_key, generate_case, target_ids  # noqa: E402


def log_top_length(p: float, a, start: float | None = None) -> float:
    """log of the curriculum's longest length at progress p: --min-len until --hold of the run (or until the
    gate opens at `start`), then growing log-linearly to --max-len at --ramp."""
    lo, hi = math.log(a.min_len), math.log(a.max_len)
    return lo + (hi - lo) * length_ramp(p, a, start)


def to_length(x: float, a) -> int:
    """A log length -> tokens: a multiple of 64, at least --min-len."""
    return max(a.min_len, int(math.exp(x)) // 64 * 64)


def sample_length(rng: random.Random, p: float, a, start: float | None = None) -> int:
    """A batch's length: half the batches from the top octave reached so far, half from all of it."""
    lo, cur = math.log(a.min_len), log_top_length(p, a, start)
    if rng.random() < 0.5:
        x = rng.uniform(max(lo, cur - math.log(2)), cur)
    else:
        x = rng.uniform(lo, cur)
    return to_length(x, a)


def length_ramp(p: float, a, start: float | None = None) -> float:
    """Length progress in [0, 1]: 0 before `start` (default --hold), 1 from --ramp (or later if the gate
    opened late: the ramp then takes (--ramp - --hold) of the run)."""
    start = a.hold if start is None else start
    if start is None or p < start:
        return 0.0
    end = max(a.ramp, start + (a.ramp - a.hold))
    return min(1.0, (p - start) / max(1e-9, end - start))


def aux_fraction(p: float, a) -> float:
    """Share of copy rows: --aux-start, decaying linearly to --aux-end at --aux-decay of the run."""
    return a.aux_start + (a.aux_end - a.aux_start) * min(1.0, p / max(1e-9, a.aux_decay))


def copy_rows(rng: random.Random, length: int, rows: int, alphabet: int = VOCAB.marker0, mmin: int = 8,
              mmax: int = 64, src_frac=(0.3, 0.7)) -> tuple[torch.Tensor, torch.Tensor]:
    """Auxiliary induction rows: random content tokens, then chunks copied from them (the loss region).

    The first n_src = 30-70% of the row is uniform over the content ids (digits, keys, span symbols,
    filler); the rest is a run of m-token chunks (m in 8-64 per row) copied from random offsets of the
    first part. Every masked copied token is predictable from an unmasked neighbour by induction (find
    the neighbour earlier, read the token beside it), so a row carries hundreds of copy targets where a
    task row carries one 5-10-token answer. -> ids (rows, length), region (rows, length) bool.
    """
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    if mmin <= 0:  # "exact" rows (mmin <= 0): src of n_r = 8..length/3 tokens, its exact copy, then random tokens
        n = torch.randint(8, max(9, length // 3), (rows, 1), generator=g)
        i = torch.arange(length)[None]
        base = torch.randint(0, alphabet, (rows, length), generator=g)
        idx = torch.where((i >= n) & (i < 2 * n), i - n, i)
        return base.gather(1, idx), (i >= n) & (i < 2 * n)
    n_src = max(16, int(length * rng.uniform(*src_frac)))
    n_dst = length - n_src
    src = torch.randint(0, alphabet, (rows, n_src), generator=g)
    m = torch.randint(mmin, mmax + 1, (rows, 1), generator=g).clamp(max=n_src)
    i = torch.arange(n_dst)[None]
    chunk, within = i // m, i % m
    off = (torch.rand(rows, n_dst // 8 + 1, generator=g) * (n_src - m + 1)).long()
    idx = off.gather(1, chunk) + within
    ids = torch.cat([src, src.gather(1, idx)], 1)
    region = torch.zeros(rows, length, dtype=torch.bool)
    region[:, n_src:] = True
    return ids, region


def keyed_rows(rng: random.Random, length: int, rows: int, vmin: int = 2, vmax: int = 8, share: float = 0.6,
               v=VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Auxiliary key-matching rows: multikey's retrieval step with dozens of targets per row.

    A row is `<bos>`, n needles `<key> kX d..d` (distinct keys, values of vmin-vmax digits), then the same needles
    asked again in another order as multikey asks, `<query> <key> kX d..d`, their values the loss region, all among
    filler; needles fill about `share` of the row. Every needle starts with the same markers and the two copies of a
    needle sit at unrelated offsets, so a value's first digit is found only by matching its key token (a model that
    matches the marker, or copies at a fixed offset as the exact copy rows allow, is right for one needle in n). The
    `<bos>` and the `<query>` form are the task rows' own (bench/probe_keyed.py: the shipped model, trained without
    keyed rows, finds the first digit of a row's last query set alone at the row's end in 9 of 16 rows at 1K, 0 of 16
    without `<bos>`, and almost none mid-row). -> ids (rows, length), region (rows, length).
    """
    ids = torch.empty(rows, length, dtype=torch.long)
    region = torch.zeros(rows, length, dtype=torch.bool)
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    filler = (torch.randint(0, v.n_filler, (rows, length), generator=g) + v.filler0).tolist()
    for r in range(rows):
        m = rng.randint(vmin, vmax)
        n = max(2, min(v.n_keys, int(length * share) // (2 * m + 5)))
        n_fill = length - 1 - n * (2 * m + 5)  # <bos>; a needle: 2 + m tokens; its query: 3 + m
        if n_fill < 0:
            raise ValueError(f"length={length} is too short for two keyed needles of {m} digits and their queries: "
                             f"raise --min-len to {1 + 2 * (2 * vmax + 5)} or pass --aux-keyed 0")
        keys = rng.sample(range(v.key0, v.key0 + v.n_keys), n)
        vals = {k: [rng.randrange(v.digit0, v.digit0 + 10) for _ in range(m)] for k in keys}
        order = keys + rng.sample(keys, n)  # first copies, then the masked copies in another order
        cuts = sorted(rng.randint(0, n_fill) for _ in range(2 * n))  # filler before each needle
        fill, row, mask, last = filler[r], [v.bos_id], [False], 0
        for i, (k, cut) in enumerate(zip(order, cuts)):
            head = [v.QUERY, v.KEY, k] if i >= n else [v.KEY, k]
            row += fill[last:cut] + head + vals[k]
            mask += [False] * (cut - last + len(head)) + [i >= n] * m
            last = cut
        row += fill[last:n_fill]
        mask += [False] * (n_fill - last)
        ids[r], region[r] = torch.tensor(row), torch.tensor(mask)
    return ids, region


def make_batch(rng: random.Random, length: int, rows: int, aux_frac: float = 0.0, tasks=TASKS, aux_kw=None,
               task_weights=None, edge_depth: float = 0.0, span_other: float = 0.0):
    """rows rows of `length` tokens: about aux_frac * rows copy rows, the rest random task cases
    (drawn with `task_weights`, default uniform; prompt + answer region; a share `edge_depth` of them with
    the target needle at depth exactly 0 or 1, the rest at uniform depth) -> ids (B, L), region (B, L) bool
    (the positions that get masked). span_other: the share of span-copy rows that ask another needle's (shorter)
    span (`ask_other_key`), which the longest-span shortcut does not answer; 0 draws nothing extra. aux_kw: the
    `copy_rows` arguments, plus `exact` and `keyed`, the shares of the copy rows that are exact copies and keyed rows
    (`keyed_rows`; 0 draws nothing extra, so the batches of earlier runs stay as they were)."""
    n_aux = min(rows, int(aux_frac * rows + rng.random()))
    ids, region = [], []
    for _ in range(rows - n_aux):
        if task_weights:
            task = rng.choices(tasks, weights=task_weights)[0]
        else:
            task = tasks[rng.randrange(len(tasks))]
        gl = GEN_LENGTH[task]
        depth = float(rng.random() < 0.5) if edge_depth and rng.random() < edge_depth else None
        c = generate_case(task, rng, length - gl, depth=depth)
        if span_other and task == "spancopy" and rng.random() < span_other:
            c = ask_other_key(c)
        ids.append(c["input"] + target_ids(c))
        region.append([False] * (length - gl) + [True] * gl)
    ids = torch.tensor(ids, dtype=torch.long).view(-1, length)
    region = torch.tensor(region, dtype=torch.bool).view(-1, length)
    kw = dict(aux_kw or {})
    n_exact = int(kw.pop("exact", 0.0) * n_aux + rng.random()) if n_aux else 0
    keyed = kw.pop("keyed", 0.0)
    n_keyed = min(n_aux - n_exact, int(keyed * n_aux + rng.random())) if n_aux and keyed else 0
    for n, extra in ((n_aux - n_exact - n_keyed, {}), (n_exact, {"mmin": 0})):
        if n:
            ai, ar = copy_rows(rng, length, n, **{**kw, **extra})
            ids, region = torch.cat([ai, ids]), torch.cat([ar, region])
    if n_keyed:
        ai, ar = keyed_rows(rng, length, n_keyed)
        ids, region = torch.cat([ai, ids]), torch.cat([ar, region])
    return ids, region


def step_batch(a, step: int, p: float, gate_p: float | None = None):
    """Batch `step` of a run (progress p in [0, 1]) as a pure function of the args and the step: its length
    from the curriculum, about --batch-tokens tokens of task and copy rows -> (L, ids (B, L), region (B, L))."""
    rng = random.Random(a.seed * 1_000_003 + step)
    length = sample_length(rng, p, a, gate_p)  # gate_p stays None unless --gate-acc is on
    rows = max(1, a.batch_tokens // length)
    aux_kw = dict(alphabet=a.aux_alphabet, mmin=a.aux_chunk[0], mmax=a.aux_chunk[1],
                  src_frac=(a.aux_src[0], a.aux_src[1]), exact=a.aux_exact, keyed=a.aux_keyed)
    ids, region = make_batch(rng, length, rows, aux_fraction(p, a), a.tasks, aux_kw, a.task_weights, a.edge_depth,
                             a.span_other)
    return length, ids, region


TAIL = max(GEN_LENGTH.values())  # every task row's answer region lies in its last TAIL positions


def loss_rows(region: torch.Tensor) -> torch.Tensor | None:
    """The positions the loss reads when every row's region lies in its last TAIL positions (task rows): those
    positions (B, TAIL) int64, one fixed size (a size that changed every step made H100 steps 10-100x slower in
    this loop's first tries, bench/README.md). None when a copy row's region reaches further: the full
    forward then."""
    b, n = region.shape
    if n <= TAIL or region[:, : n - TAIL].any():
        return None
    return torch.arange(n - TAIL, n).repeat(b, 1)  # a real (B, TAIL) tensor: workers pin it for the copy


class StepBatches(torch.utils.data.Dataset):
    """The batches of a fixed-step run (--steps N), indexed by step, so DataLoader workers build them ahead
    of the GPU (the CPU cost of a batch is ~10-20 ms, a step's GPU time about as much)."""

    def __init__(self, a):
        self.a = a

    def __len__(self) -> int:
        return self.a.steps

    def __getitem__(self, step: int):
        """(L, ids, region, rows): the step's batch and, with --loss-rows 1, its loss rows (`loss_rows`; else None)."""
        L, ids, region = step_batch(self.a, step, step / self.a.steps)
        return L, ids, region, loss_rows(region) if self.a.loss_rows else None
