"""generate(mode="focus") gives the same tokens on every executor: flex == torch, CUDA graphs == eager
(bitwise on CPU fp32; in bf16 on GPU up to kernel choice, so there by agreement)."""

import contextlib

import pytest
import torch

import focusdllm
from focusdllm import FocusConfig, generate
from focusdllm.attention.flex import flex_available


def _case(model, seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size - 8, (1, n), generator=g).to(model.device)


def _focus(backend, **kw):
    return FocusConfig(block_size=16, keep_ratio=0.25, min_blocks=2, num_sinks=4, backend=backend, **kw)


@pytest.mark.skipif(not flex_available("cpu")[0], reason="compiled flex needs an AVX2 CPU and a C++ compiler")
def test_flex_equals_torch_tokens_cpu():
    torch._dynamo.reset()
    model = focusdllm.load_model("llada-tiny", dtype=torch.float32, seed=3)
    for seed in range(3):
        ids = _case(model, seed, 150 + 17 * seed)
        kw = dict(gen_length=32, block_length=16, steps=16, mode="focus")
        a = generate(model, ids, focus=_focus("torch"), **kw)
        b = generate(model, ids, focus=_focus("flex"), **kw)
        assert b.stats["backend"] == "flex"
        assert torch.equal(a.sequences, b.sequences), f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_cuda_graphs_and_flex_on_gpu(arch, backend):
    cfg = focusdllm.ModelConfig.from_name(f"{arch}-tiny").with_(d_model=256, n_layers=8, n_heads=4,
                                                                n_kv_heads=4 if arch == "llada" else 2)
    model = focusdllm.models.init_random(focusdllm.DiffusionLM(cfg).cuda().to(torch.bfloat16), seed=1).eval()
    ids = _case(model, 0, 1000)
    kw = dict(gen_length=64, block_length=32, steps=32)
    for mode, extra in [("fastdllm", {}), ("focus", {"focus": _focus(backend)}),
                        ("focus", {"focus": _focus(backend, reuse_prompt_kv=True)})]:
        eager = generate(model, ids, mode=mode, **extra, **kw)
        graphed = generate(model, ids, mode=mode, cuda_graphs=True, **extra, **kw)
        # cuBLAS may pick other algorithms under stream capture: bf16 near-ties can flip a token
        same = (eager.sequences == graphed.sequences).float().mean().item()
        assert same > 0.97, (mode, extra, same)
        if mode == "focus":
            ref = generate(model, ids, mode=mode, focus=extra["focus"].with_(backend="torch"), **kw)
            agree = (ref.sequences == eager.sequences).float().mean().item()
            assert agree > 0.97, agree  # bf16 flex vs gather may flip a near-tie


@pytest.mark.gpu
def test_many_lengths_and_batches_do_not_exhaust_recompiles():
    """An eval-like sweep (12 prompt lengths x 2 batch sizes, mean and bound scores) runs compiled throughout:
    the compiled selection / sink helpers use dynamic shapes, so no CompileFallbackError."""
    import focusdllm
    from focusdllm import FocusConfig

    model = focusdllm.load_model("llada-tiny", dtype=torch.bfloat16, device="cuda", seed=0)
    with torch._dynamo.config.patch(recompile_limit=64):
        for i, n in enumerate(range(300, 1500, 100)):
            ids = torch.randint(0, 100, (1 + i % 2, n), device="cuda")
            for cfg in (FocusConfig(block_size=16, backend="flex"), FocusConfig.fast(block_size=16, backend="flex")):
                out = generate(model, ids, gen_length=32, block_length=16, steps=16, mode="focus", focus=cfg)
                assert out.sequences.shape == (ids.shape[0], n + 32)


@contextlib.contextmanager
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _fp32_model(arch):
    torch._dynamo.reset()  # new dtype and shapes: start the compile caches afresh (recompile limit)
    cfg = focusdllm.ModelConfig.from_name(f"{arch}-tiny").with_(d_model=128, n_layers=6, n_heads=4,
                                                                n_kv_heads=4 if arch == "llada" else 2)
    return focusdllm.models.init_random(focusdllm.DiffusionLM(cfg).cuda(), seed=2).eval()


_GRAPH_MODES = [("fastdllm", {"cache": "dual"}), ("fastdllm", {"cache": "prefix"}),
                ("focus", {"focus": _focus("flex")}), ("focus", {"focus": _focus("torch", reuse_prompt_kv=True)})]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_whole_step_graphs_equal_eager_fp32(arch):
    """Whole in-block steps captured as CUDA graphs (rows + network + sampling + commit) give the eager tokens
    in fp32 (TF32 off, so only summation order could differ), for every cached policy."""
    model = _fp32_model(arch)
    ids = _case(model, 1, 700)
    kw = dict(gen_length=64, block_length=16, steps=32)
    with _no_tf32():
        for mode, extra in _GRAPH_MODES:
            eager = generate(model, ids, mode=mode, **extra, **kw)
            graphed = generate(model, ids, mode=mode, cuda_graphs=True, **extra, **kw)
            assert graphed.stats["cuda_graphs"] == "step"
            assert torch.equal(eager.sequences, graphed.sequences), (mode, extra)


@pytest.mark.gpu
def test_whole_step_graphs_catch_stale_state(monkeypatch):
    """Planted bug: a block start that rebinds the still-masked flags instead of updating them in place leaves
    the captured steps reading (and writing) the first block's flags; the equality above must then fail."""
    from focusdllm.decode.step import DecodeState

    real_start = DecodeState.start_block

    def rebinding_start(self, blk, mask_id):
        real_start(self, blk, mask_id)
        self.masked = self.masked.clone()  # same values, new tensor: eager runs do not care

    model = _fp32_model("llada")
    ids = _case(model, 1, 700)
    kw = dict(gen_length=64, block_length=16, steps=32, mode="focus", focus=_focus("torch"))
    with _no_tf32():
        eager = generate(model, ids, **kw)
        monkeypatch.setattr(DecodeState, "start_block", rebinding_start)
        assert torch.equal(generate(model, ids, **kw).sequences, eager.sequences)  # eager does not care
        graphed = generate(model, ids, cuda_graphs=True, **kw)
    assert not torch.equal(graphed.sequences, eager.sequences)
