"""focusdllm: Focus-dLLM long-context inference for diffusion language models."""

from .config import ConfigError, FocusConfig, ModelConfig
from .models import CheckpointError, DiffusionLM, load_model, save_model

__all__ = ["CheckpointError", "ConfigError", "DiffusionLM", "FocusConfig", "ModelConfig", "load_model", "save_model"]
