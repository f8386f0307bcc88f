"""The decode loop, its transfer rules and argument checks."""

from .generate import GenerateOutput, generate

__all__ = ["GenerateOutput", "generate"]
