"""Model definitions and checkpoint I/O."""

from .loading import CheckpointError, init_random, load_model, read_config, save_model
from .transformer import DiffusionLM

__all__ = ["CheckpointError", "DiffusionLM", "init_random", "load_model", "read_config", "save_model"]
