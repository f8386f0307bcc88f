"""Load and save checkpoints in the official HF layouts (safetensors, sharded), or build presets.

`load_model` builds the module on the meta device and fills it shard by shard, so an 8B model
never holds a second full copy in RAM.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import MODEL_PRESETS, ConfigError, ModelConfig
from . import dream, llada
from .transformer import DiffusionLM, Rotary

LAYOUTS = {"llada": llada, "dream": dream}
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says what is wrong and how to fix it."""


def _layout_for_model_type(model_type: str | None):
    mt = (model_type or "").lower()
    if mt == "llada":
        return llada
    if mt == "dream":
        return dream
    raise CheckpointError(
        f"unknown model_type {model_type!r} in config.json; supported: 'llada' (LLaDA-8B, "
        "LLaDA-1.5, UltraLLaDA) and 'Dream' (Dream-v0-7B)"
    )


def key_map(cfg: ModelConfig) -> dict[str, str]:
    """our parameter name -> official key, expanded over layers."""
    out = {}
    for ours, theirs in LAYOUTS[cfg.arch].KEYS.items():
        if "bias" in ours and not cfg.qkv_bias:
            continue
        if "{i}" in ours:
            for i in range(cfg.n_layers):
                out[ours.format(i=i)] = theirs.format(i=i)
        else:
            out[ours] = theirs
    return out


def read_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; point load_model at a HF model folder")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); re-download or re-save it") from e
    return _layout_for_model_type(raw.get("model_type")).config_from_hf(raw)


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is corrupt ({e}); re-download it") from e
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path} lacks shards listed in its index: {missing}; download them")
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if list(path.glob("*.bin")):
        raise CheckpointError(
            f"{path} holds only PyTorch .bin weights; convert them to safetensors first"
        )
    raise CheckpointError(f"{path} has no model.safetensors nor model.safetensors.index.json")


def init_random(model: DiffusionLM, seed: int = 0, std: float | None = None) -> DiffusionLM:
    """Fill weights with N(0, std) (default 1/sqrt(d_model): ~0.016 at 8B shapes, large enough at tiny
    shapes that attention and logits are far from uniform), norms with 1; fast on a GPU."""
    std = model.config.d_model ** -0.5 if std is None else std
    g = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
    return model


def _materialise(cfg: ModelConfig, dtype, device) -> DiffusionLM:
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    model = model.to(dtype).to_empty(device=device)  # no full-size fp32 copy
    model.rope = Rotary(cfg.head_dim, cfg.rope_theta * cfg.rope_scaling, cfg.rope_fp32).to(device)
    return model


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **overrides,
) -> DiffusionLM:
    """Load a local HF checkpoint folder, a shipped model or a random-weight preset.

    Args:
        name_or_path: a folder with config.json + safetensors (one file or shards + index), a
            shipped model name (e.g. "focus-tiny"), or a preset ("llada-8b", "dream-7b",
            "ultrallada-8b", "llada-tiny", "dream-tiny") for random weights of that shape.
        dtype, device: where the weights live.
        seed: random-weight seed for presets.
        **overrides: ModelConfig fields to override (e.g. mask_id=...).
    """
    device = torch.device(device)
    path = Path(name_or_path)
    if not path.exists() and (WEIGHTS_DIR / str(name_or_path)).is_dir():
        path = WEIGHTS_DIR / str(name_or_path)
    if not path.exists():
        if str(name_or_path) in MODEL_PRESETS:
            cfg = MODEL_PRESETS[str(name_or_path)].with_(**overrides)
            return init_random(_materialise(cfg, dtype, device), seed).eval()
        raise CheckpointError(
            f"{name_or_path!r} is neither a folder nor a known model; presets: "
            f"{sorted(MODEL_PRESETS)}, shipped: {sorted(p.name for p in WEIGHTS_DIR.glob('*'))}"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    cfg = read_config(path).with_(**overrides)
    shards = _shard_files(path)
    want = key_map(cfg)  # ours -> theirs
    theirs_to_ours = {v: k for k, v in want.items()}
    model = _materialise(cfg, dtype, device)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for key in f.keys():
                    ours = theirs_to_ours.get(key)
                    if ours is None:
                        if re.search(r"(rotary|inv_freq|masked_bias|attn\.bias)", key):
                            continue
                        raise CheckpointError(
                            f"{shard.name} holds unexpected tensor {key!r} for a {cfg.arch} model; "
                            "check that config.json matches the weights"
                        )
                    t = f.get_tensor(key)
                    p = params[ours]
                    if tuple(t.shape) != tuple(p.shape):
                        raise CheckpointError(
                            f"{shard.name}: {key} has shape {tuple(t.shape)} but config.json implies "
                            f"{tuple(p.shape)}; the config and the weights disagree"
                        )
                    with torch.no_grad():
                        p.copy_(t.to(device=device, dtype=dtype))
                    loaded.add(ours)
                    del t
        except SafetensorError as e:
            raise CheckpointError(f"{shard} is not a readable safetensors file ({e}); re-download it") from e
    missing = sorted(set(want) - loaded)
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensors, e.g. {[want[m] for m in missing[:3]]}; "
            "a shard is missing or the checkpoint is truncated"
        )
    return model.eval()


def save_model(model: DiffusionLM, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` in the official layout (config.json + safetensors shards + index when > 1)."""
    cfg = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LAYOUTS[cfg.arch].config_to_hf(cfg), indent=2))
    if cfg.arch == "dream":  # the official DreamModel.from_pretrained requires one
        ids = {"mask_token_id": cfg.mask_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
               "bos_token_id": cfg.bos_id}
        (path / "generation_config.json").write_text(json.dumps(ids, indent=2))
    sd = model.state_dict()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for ours, theirs in key_map(cfg).items():
        t = sd[ours].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][theirs] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


__all__ = ["CheckpointError", "ConfigError", "load_model", "save_model", "init_random", "read_config"]
