"""Dream-v0-7B checkpoint layout (Qwen2-style keys + `lm_head`, `model_type: "Dream"`)."""

from __future__ import annotations

from ..config import ConfigError, ModelConfig
from .llada import rope_factor

MODEL_TYPE = "Dream"

KEYS = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.q_proj.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blocks.{i}.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.k_proj.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blocks.{i}.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.v_proj.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blocks.{i}.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def config_from_hf(raw: dict) -> ModelConfig:
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if k not in raw]
    if missing:
        raise ConfigError(f"config.json (model_type Dream) lacks {missing}; is it a Dream checkpoint?")
    eos = raw.get("eos_token_id", 151643)
    return ModelConfig(
        arch="dream", vocab_size=raw["vocab_size"], d_model=raw["hidden_size"],
        n_layers=raw["num_hidden_layers"], n_heads=raw["num_attention_heads"],
        n_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        mlp_hidden=raw["intermediate_size"], rms_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(raw.get("rope_theta", 10000.0)), rope_scaling=rope_factor(raw),
        qkv_bias=True, mask_id=raw.get("mask_token_id", 151666), eos_id=eos,
        pad_id=raw.get("pad_token_id", eos), bos_id=raw.get("bos_token_id"),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    if not cfg.qkv_bias:
        raise ConfigError("the Dream layout always has q/k/v biases; build the model with qkv_bias=True")
    return {
        "model_type": MODEL_TYPE, "architectures": ["DreamModel"],
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.mlp_hidden, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta * cfg.rope_scaling,
        # the official code ignores (LLaDA) or rejects (Dream) a theta factor: bake it into rope_theta
        "rope_scaling": None,
        "hidden_act": "silu", "tie_word_embeddings": False, "max_position_embeddings": 131072,
        "attention_dropout": 0.0, "use_cache": False, "torch_dtype": "float32",
        "mask_token_id": cfg.mask_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
        "bos_token_id": cfg.bos_id,
    }
