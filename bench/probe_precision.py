"""Is a long-context miss numerical? Dense suite accuracy at 16K with bf16 and with fp32 weights/activations.

    PYTHONPATH=src python bench/probe_precision.py focus-tiny /path/to/other/model   # CUDA

For each model and dtype: multikey and span copy at 16K on the suite's grid (5 depths; 2 cases per depth with
seed 1234, 4 with seed 4321), one JSON line per row. bench/results/probe_precision_16k_h100.jsonl (commit
42a7bb3, so focus-tiny was run 8; the other model is run 9): of the 10 span-copy cases run 8 misses in bf16, fp32
misses 9 (and run 9 scores the same in both), so run 8's 16K losses were the model's, not bf16's.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_eval import suite_eval  # noqa: E402

from focusdllm import load_model  # noqa: E402

for name in sys.argv[1:]:
    for dt in (torch.bfloat16, torch.float32):
        m = load_model(name, dtype=dt, device="cuda")
        for i, pd in enumerate((2, 4)):
            for r in suite_eval(m, [16384], ("multikey", "spancopy"), per_depth=pd, seed=1234 if i == 0 else 4321):
                r.update(model=name, dtype=str(dt))
                print(json.dumps(r), flush=True)
        del m
