"""The paper in readable code: the test oracle for focusdllm (never imports focusdllm).

Files, read in this order: model.py (naive LLaDA / Dream forward from an official state dict),
sampling.py (transfer rules), focus.py (Focus-dLLM's per-step pieces), decode.py (the loop).
"""

from .decode import generate
from .model import Checkpoint, checkpoint_from, full_forward, load_checkpoint, rows_forward

__all__ = ["Checkpoint", "checkpoint_from", "full_forward", "generate", "load_checkpoint", "rows_forward"]
