"""What a model's multikey answers copy, by the asked needle's depth: the failure analysis of a re-trained model.

For each depth, cases of one length (dense vanilla decode, one token per step): the answer equals the asked
needle's value (`exact`), another needle's value (`other`), or neither (`none`); `lead` is the mean count of
leading digits right, `first` the share whose first digit is right. A model that solved only the edges (depth 0
and 1, runs 20-21 of bench/train_tiny.py) shows `exact` 1 there and which of the two failure kinds elsewhere.

    python bench/probe_multikey.py --model focus-tiny --length 2048 --out probe_multikey.json
    python bench/probe_multikey.py --model runs/r20 --length 2048 --n 8 --device cpu --out probe_multikey_r20.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from focusdllm import load_model
from focusdllm.tasks import GEN_LENGTH, dense_decode, generate_case, needles


def leading_right(answer: list[int], value: list[int]) -> int:
    """How many leading tokens of `answer` equal `value`'s."""
    n = 0
    for a, b in zip(answer, value):
        if a != b:
            break
        n += 1
    return n


def probe_depth(model, length: int, depth: float, n: int, seed: int, device) -> dict:
    """n multikey cases with the asked needle at `depth`, decoded in one batch; the summary of what they copy."""
    cases = [generate_case("multikey", random.Random(seed + i), length, depth=depth) for i in range(n)]
    out = dense_decode(model, torch.tensor([c["input"] for c in cases], device=device), GEN_LENGTH["multikey"])
    exact = other = lead = first = 0
    for c, gen in zip(cases, out.tolist()):
        answer = gen[: len(c["outputs"])]
        values = [v for _, k, v in needles(c) if k != c["input"][-1]]
        exact += answer == c["outputs"]
        other += answer in values
        lead += leading_right(answer, c["outputs"])
        first += answer[0] == c["outputs"][0]
    return {"depth": depth, "n": n, "exact": exact / n, "other": other / n, "none": (n - exact - other) / n,
            "lead": lead / n, "first": first / n}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="focus-tiny", help="a shipped name or a folder with config + safetensors")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--n", type=int, default=8, help="cases per depth")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = load_model(a.model, dtype=dtype, device=a.device).eval()
    rows = []
    for i, depth in enumerate(a.depths):
        rows.append(probe_depth(model, a.length, depth, a.n, a.seed + 1000 * i, a.device))
        print(json.dumps(rows[-1]), flush=True)
    Path(a.out).write_text(json.dumps({"model": a.model, "length": a.length, "device": a.device, "rows": rows},
                                      indent=1))


if __name__ == "__main__":
    main()
