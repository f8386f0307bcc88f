"""Summarise side-by-side short stage-1 runs (`bash bench/gpu_jobs.sh stage1-variants`): per run, its variant, seed,
loss over the last 2,000 steps and the dense accuracy per task and length (final eval at random depths, suite grid
with the needle at depths 0..1), multikey's misses by depth. Writes one JSON and prints a table.

    python bench/stage1_variants.py /tmp/s1 --out bench/results/stage1_variants.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch


def summarise(log: Path) -> dict:
    """One run's train_log.jsonl -> its args that name the variant, tail loss, accuracies and multikey's misses."""
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    start = next(r for r in recs if r.get("event") == "start")
    trained = next((r for r in recs if r.get("event") == "trained"), {})  # {}: killed before the end
    args = start["args"]
    out = {"run": log.parent.name, "seed": args["seed"], "aux_keyed": args.get("aux_keyed", 0.0),
           "span_other": args.get("span_other", 0.0), "gpu": start.get("gpu"), "steps": trained.get("steps"),
           "train_secs": trained.get("train_secs"), "tail_loss": trained.get("tail_loss"), "finished": bool(trained)}
    for r in recs:
        if r.get("event") in ("final_eval", "suite_eval"):
            kind = "eval" if r["event"] == "final_eval" else "suite"
            out[f"{kind}_{r['task']}_{r['length']}"] = r["acc"]
            if kind == "suite" and r["task"] == "multikey":
                out[f"suite_multikey_{r['length']}_misses"] = r["misses_at_depth"]
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="the folder holding one output folder per run")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    runs = [summarise(p) for p in sorted(Path(a.root).glob("*/train_log.jsonl"))]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine = {"torch": torch.__version__, "gpu": gpu}
    Path(a.out).write_text(json.dumps({"machine": {**machine, "python": platform.python_version()}, "runs": runs},
                                      indent=1))
    cols = [k for k in dict.fromkeys(k for r in runs for k in r) if k.startswith(("eval_", "suite_"))
            and not k.endswith("_misses")]
    print("run".ljust(16), "tail_loss", *cols)
    for r in runs:
        print(r["run"].ljust(16), r["tail_loss"], *[r.get(c) for c in cols])
    return runs


if __name__ == "__main__":
    main()
