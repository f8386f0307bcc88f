"""Checkpoints in the official layouts: save -> load round trip, and one clear error per bad input."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import focusdllm
from focusdllm import ModelConfig
from focusdllm.models.loading import CheckpointError, init_random, key_map


def _model(arch, n_layers, n_kv, seed):
    base = ModelConfig.from_name(f"{arch}-tiny")
    cfg = base.with_(n_layers=n_layers, n_kv_heads=n_kv)
    m = focusdllm.DiffusionLM(cfg).double()
    return init_random(m, seed=seed).eval()


@given(
    arch=st.sampled_from(["llada", "dream"]), n_layers=st.integers(1, 3), n_kv=st.sampled_from([1, 2, 4]),
    shard=st.sampled_from([10**9, 40_000]), seed=st.integers(0, 10),
)
def test_round_trip_identical_logits(tmp_path_factory, arch, n_layers, n_kv, shard, seed):
    m = _model(arch, n_layers, n_kv, seed)
    d = tmp_path_factory.mktemp("ckpt")
    focusdllm.save_model(m, d, max_shard_bytes=shard)
    assert (d / "model.safetensors.index.json").exists() == (shard < 10**9)
    m2 = focusdllm.load_model(d, dtype=torch.float64)
    ids = torch.randint(0, 120, (2, 17), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(m(ids), m2(ids))
    assert m2.config == m.config


def test_official_key_names(tmp_path):
    m = _model("llada", 2, 4, 0)
    focusdllm.save_model(m, tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.transformer.blocks.1.attn_out.weight" in keys and "model.transformer.ff_out.weight" in keys
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llada"
    d = _model("dream", 2, 2, 0)
    focusdllm.save_model(d, tmp_path / "d")
    keys = set(load_file(str(tmp_path / "d" / "model.safetensors")))
    assert {"lm_head.weight", "model.layers.0.self_attn.k_proj.bias", "model.norm.weight"} <= keys
    assert len(keys) == len(key_map(d.config))


def test_presets_have_real_shapes():
    cfg = ModelConfig.from_name("llada-8b")
    assert (cfg.d_model, cfg.n_layers, cfg.n_kv_heads, cfg.vocab_size) == (4096, 32, 32, 126464)
    assert 7.9e9 < cfg.n_params < 8.1e9
    d = ModelConfig.from_name("dream-7b")
    assert (d.n_heads, d.n_kv_heads, d.qkv_bias, d.shift_logits) == (28, 4, True, True)
    m = focusdllm.load_model("dream-tiny", dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.device.type == "cpu"


def test_rope_theta_and_scaling_read_from_config(tmp_path):
    m = _model("llada", 1, 4, 0)
    focusdllm.save_model(m, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_theta"], raw["rope_scaling"] = 12345.0, {"type": "ntk", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    m2 = focusdllm.load_model(tmp_path)
    assert m2.config.rope_theta == 12345.0 and m2.config.rope_scaling == 4.0
    expect = 1.0 / (12345.0 * 4.0) ** (2 / m2.config.head_dim)
    assert abs(float(m2.rope.inv_freq[1]) - expect) < 1e-6 * expect
    raw["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(focusdllm.ConfigError, match="linear"):
        focusdllm.load_model(tmp_path)


@pytest.fixture()
def ckpt(tmp_path):
    m = _model("llada", 2, 4, 0)
    focusdllm.save_model(m, tmp_path, max_shard_bytes=40_000)
    return tmp_path


def test_error_missing_folder_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="neither a folder nor a known model"):
        focusdllm.load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        focusdllm.load_model(tmp_path)


def test_error_corrupt_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        focusdllm.load_model(ckpt)


def test_error_unknown_model_type(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        focusdllm.load_model(ckpt)


def test_error_missing_shard(ckpt):
    next(ckpt.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lacks shards"):
        focusdllm.load_model(ckpt)


def test_error_corrupt_shard(ckpt):
    f = next(ckpt.glob("model-00001-*.safetensors"))
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        focusdllm.load_model(ckpt)


def test_error_shape_mismatch_in_shard(ckpt):
    f = next(ckpt.glob("model-00001-*.safetensors"))
    tensors = load_file(str(f))
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3, 3, dtype=tensors[name].dtype)
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match="has shape"):
        focusdllm.load_model(ckpt)


def test_error_missing_tensor(tmp_path):
    m = _model("llada", 2, 4, 0)
    focusdllm.save_model(m, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.transformer.blocks.1.ff_norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        focusdllm.load_model(tmp_path)


def test_error_bin_only(tmp_path):
    m = _model("llada", 1, 4, 0)
    focusdllm.save_model(m, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="convert them to safetensors"):
        focusdllm.load_model(tmp_path)


def test_bad_model_config():
    with pytest.raises(focusdllm.ConfigError, match="not a multiple of n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3, d_model=64)
    with pytest.raises(focusdllm.ConfigError, match="unknown arch"):
        ModelConfig(arch="gpt")
    with pytest.raises(focusdllm.ConfigError, match="unknown model preset"):
        ModelConfig.from_name("llada-9b")
