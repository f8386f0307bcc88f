"""LLaDA-8B / LLaDA-1.5 / UltraLLaDA checkpoint layout (OLMo-style keys, `model_type: "llada"`)."""

from __future__ import annotations

from ..config import ConfigError, ModelConfig

MODEL_TYPE = "llada"

# our name -> official name; "{i}" is the layer index
KEYS = {
    "embed.weight": "model.transformer.wte.weight",
    "norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
    "blocks.{i}.attn_norm.weight": "model.transformer.blocks.{i}.attn_norm.weight",
    "blocks.{i}.q_proj.weight": "model.transformer.blocks.{i}.q_proj.weight",
    "blocks.{i}.k_proj.weight": "model.transformer.blocks.{i}.k_proj.weight",
    "blocks.{i}.v_proj.weight": "model.transformer.blocks.{i}.v_proj.weight",
    "blocks.{i}.o_proj.weight": "model.transformer.blocks.{i}.attn_out.weight",
    "blocks.{i}.mlp_norm.weight": "model.transformer.blocks.{i}.ff_norm.weight",
    "blocks.{i}.gate_proj.weight": "model.transformer.blocks.{i}.ff_proj.weight",
    "blocks.{i}.up_proj.weight": "model.transformer.blocks.{i}.up_proj.weight",
    "blocks.{i}.down_proj.weight": "model.transformer.blocks.{i}.ff_out.weight",
}


def rope_factor(raw: dict) -> float:
    """A theta multiplier from `rope_scaling` ({"type": "ntk"|"theta", "factor": k}) or `scaling_factor`."""
    rs = raw.get("rope_scaling")
    if rs is None:
        return float(raw.get("scaling_factor", 1.0))
    kind = rs.get("type", rs.get("rope_type", "ntk"))
    if kind not in ("ntk", "theta", "default"):
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported; supported: 'ntk'/'theta' (multiplies "
            "rope_theta by 'factor'). Bake other schemes into rope_theta in config.json."
        )
    return float(rs.get("factor", 1.0))


def config_from_hf(raw: dict) -> ModelConfig:
    need = ("d_model", "n_layers", "n_heads")
    missing = [k for k in need if k not in raw]
    if missing:
        raise ConfigError(f"config.json (model_type llada) lacks {missing}; is it a LLaDA checkpoint?")
    vocab = raw.get("embedding_size") or raw.get("vocab_size")
    d = raw["d_model"]
    mlp = raw.get("mlp_hidden_size") or d * raw.get("mlp_ratio", 4)
    mask_id = raw.get("mask_token_id", 126336)
    eos = raw.get("eos_token_id", 126081)
    return ModelConfig(
        arch="llada", vocab_size=vocab, d_model=d, n_layers=raw["n_layers"],
        n_heads=raw["n_heads"], n_kv_heads=raw.get("n_kv_heads") or raw["n_heads"],
        mlp_hidden=mlp, rms_eps=raw.get("rms_norm_eps", 1e-5),
        rope_theta=float(raw.get("rope_theta", 10000.0)), rope_scaling=rope_factor(raw),
        qkv_bias=bool(raw.get("include_qkv_bias", False) or raw.get("include_bias", False)),
        mask_id=mask_id, eos_id=eos, pad_id=raw.get("pad_token_id", eos),
        bos_id=raw.get("bos_token_id", 126080),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.qkv_bias:
        raise ConfigError("the LLaDA layout has no q/k/v biases; save this model as arch='dream'")
    return {
        "model_type": MODEL_TYPE, "architectures": ["LLaDAModelLM"],
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads, "mlp_hidden_size": cfg.mlp_hidden, "mlp_ratio": 4,
        "vocab_size": cfg.vocab_size, "embedding_size": cfg.vocab_size,
        "rope": True, "rope_theta": cfg.rope_theta * cfg.rope_scaling, "rope_full_precision": True,
        # the official code ignores (LLaDA) or rejects (Dream) a theta factor: bake it into rope_theta
        "rope_scaling": None,
        "rms_norm_eps": cfg.rms_eps, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "activation_type": "silu", "block_type": "llama",
        "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
        "attention_layer_norm": False, "scale_logits": False, "input_emb_norm": False,
        "alibi": False, "block_group_size": 1, "flash_attention": False, "use_cache": False,
        "init_device": "meta", "max_sequence_length": 4096,
        "mask_token_id": cfg.mask_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
        "bos_token_id": cfg.bos_id,
    }
