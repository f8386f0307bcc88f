"""What a model makes of keyed copy rows (bench/train_data.py `keyed_rows`, --aux-keyed): one forward, argmax.

`mid_row`: every query's value masked where it stands (the training form): accuracy over the masked digits and over
each value's first digit (the one only the key finds). `last_query`: the row cut after its last query's key, 32 masks
after it (a task row's answer region), first digit right or not; `alone` blanks the other queries with filler first,
`no_bos` replaces the row's `<bos>` with filler. `copy_rows_exact` / `_chunks`: the plain copy rows' token accuracy,
every copied token masked. A model never trained on keyed rows (the shipped focus-tiny) shows how
far they are from the tasks' form; one trained with them should find the first digits.

    python bench/probe_keyed.py --model focus-tiny --out bench/results/probe_keyed_focus_tiny.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_data import copy_rows, keyed_rows  # noqa: E402

from focusdllm import load_model  # noqa: E402
from focusdllm.tasks import VOCAB  # noqa: E402


@torch.no_grad()
def masked_argmax(model, ids: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """One forward with every region position masked -> the argmax token per position (B, L)."""
    return model(torch.where(region, VOCAB.mask_id, ids)).argmax(-1)


def mid_row(model, length: int, rows: int, seed: int) -> dict:
    """Every query's value masked in place -> digit and first-digit accuracy of the argmax."""
    ids, region = keyed_rows(random.Random(seed), length, rows)
    pred = masked_argmax(model, ids, region)
    first = region & ~torch.roll(region, 1, 1)  # each value's first digit
    return {"digits": (pred[region] == ids[region]).float().mean().item(),
            "first_digits": (pred[first] == ids[first]).float().mean().item(), "values": int(first.sum())}


def copy_row_tokens(model, length: int, rows: int, seed: int, exact: bool) -> float:
    """The plain copy rows beside them (exact copies or 8-64-token chunks), every copied token masked -> accuracy."""
    ids, region = copy_rows(random.Random(seed), length, rows, **({"mmin": 0} if exact else {}))
    pred = masked_argmax(model, ids, region)
    return (pred[region] == ids[region]).float().mean().item()


@torch.no_grad()
def last_query(model, length: int, rows: int, seed: int, alone: bool, no_bos: bool) -> dict:
    """Each row cut after its last query's key, then 32 masks -> how many first digits the argmax finds."""
    ids, region = keyed_rows(random.Random(seed), length, rows)
    hits = 0
    for row, reg in zip(ids.tolist(), region.tolist()):
        start = max(i for i, r in enumerate(reg) if r and not reg[i - 1])  # the last value's first digit
        pre = row[:start]
        if alone:  # the other queries and their values become filler
            for q in [i for i, t in enumerate(pre) if t == VOCAB.QUERY][:-1]:
                j = q
                while j < len(pre) and (j < q + 3 or VOCAB.digit0 <= pre[j] < VOCAB.digit0 + 10):
                    pre[j] = VOCAB.filler0
                    j += 1
        if no_bos:
            pre[0] = VOCAB.filler0
        pred = model(torch.tensor([pre + [VOCAB.mask_id] * 32])).argmax(-1)[0]
        hits += int(pred[start] == row[start])
    return {"first_digit_right": hits, "rows": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="focus-tiny")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = load_model(a.model).eval()
    res = {"model": a.model, "rows": a.rows, "seed": a.seed, "torch": torch.__version__, "device": "cpu", "lengths": {}}
    for L in a.lengths:
        res["lengths"][L] = {"mid_row": mid_row(model, L, a.rows, a.seed),
                             "copy_rows_exact": copy_row_tokens(model, L, a.rows, a.seed, True),
                             "copy_rows_chunks": copy_row_tokens(model, L, a.rows, a.seed, False)}
        for alone in (False, True):
            for no_bos in (False, True):
                key = "last_query" + ("_alone" if alone else "") + ("_no_bos" if no_bos else "")
                res["lengths"][L][key] = last_query(model, L, a.rows, a.seed, alone, no_bos)
        print(L, json.dumps(res["lengths"][L]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
