"""Tiny random checkpoints in the official layouts (config.json dict + official-key state dict).

For tests only: shapes like the library's "llada-tiny" / "dream-tiny" presets, weights N(0, std),
norm weights 1, Dream's q/k/v biases small. Built here so the oracle needs nothing from focusdllm.
"""

from __future__ import annotations

import torch

from .model import KEYS, Checkpoint, checkpoint_from


def tiny_config(arch: str, n_layers: int = 4, d_model: int = 64, n_heads: int = 4,
                n_kv_heads: int | None = None, vocab: int = 128, mlp: int = 128) -> dict:
    """An official config.json dict; ids at the top of the vocab (mask = vocab - 1)."""
    if arch == "llada":
        return {"model_type": "llada", "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
                "n_kv_heads": n_kv_heads or n_heads, "mlp_hidden_size": mlp, "vocab_size": vocab,
                "embedding_size": vocab, "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-5,
                "mask_token_id": vocab - 1, "eos_token_id": vocab - 2, "pad_token_id": vocab - 3}
    return {"model_type": "Dream", "hidden_size": d_model, "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads or max(1, n_heads // 2),
            "intermediate_size": mlp, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "rope_scaling": None, "mask_token_id": vocab - 1, "eos_token_id": vocab - 2,
            "pad_token_id": vocab - 3}


def tiny_checkpoint(arch: str = "llada", seed: int = 0, std: float = 0.1, **shape) -> Checkpoint:
    """A random float64 checkpoint of `arch` ("llada" or "dream") built from tiny_config(**shape)."""
    raw = tiny_config(arch, **shape)
    ck = checkpoint_from(raw, {})
    d, hd = ck.n_heads * ck.head_dim, ck.head_dim
    mlp = raw.get("mlp_hidden_size") or raw["intermediate_size"]
    shapes = {"embed": (ck.vocab_size, d), "final_norm": (d,), "lm_head": (ck.vocab_size, d),
              "attn_norm": (d,), "q": (d, d), "k": (ck.n_kv_heads * hd, d), "v": (ck.n_kv_heads * hd, d),
              "o": (d, d), "mlp_norm": (d,), "gate": (mlp, d), "up": (mlp, d), "down": (d, mlp)}
    if arch == "dream":
        shapes.update(q_bias=(d,), k_bias=(ck.n_kv_heads * hd,), v_bias=(ck.n_kv_heads * hd,))
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shp in shapes.items():
        layers = range(ck.n_layers) if "{i}" in KEYS[ck.arch][name] else [None]
        for i in layers:
            key = KEYS[ck.arch][name].format(i=i)
            if name.endswith("norm"):
                weights[key] = torch.ones(shp, dtype=torch.float64)
            else:
                weights[key] = torch.randn(shp, generator=g, dtype=torch.float64) * std
    return checkpoint_from(raw, weights)
