"""focusdllm: Focus-dLLM long-context inference for diffusion language models."""

from .config import ConfigError, FocusConfig, ModelConfig
from .decode import GenerateOutput, generate
from .models import CheckpointError, DiffusionLM, load_model, save_model

__all__ = [
    "CheckpointError", "ConfigError", "DiffusionLM", "FocusConfig", "GenerateOutput", "ModelConfig", "generate",
    "load_model", "save_model",
]
