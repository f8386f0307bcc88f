"""Sparse attention op speed: compiled flex vs dense SDPA vs gather + SDPA (pytest-benchmark).

GPU (bf16): keys 8K/16K/32K/64K x queries 16/32/128 x blocks kept 5/10/25% x LLaDA (32 MHA heads) and
Dream (28 q / 4 kv heads), d=128, 64-key blocks. CPU (fp32): a small subset at 4K/16K keys.
Each op includes its own index / BlockMask building from the `KeySelection` (that is its per-layer cost in
a decode step; the per-block counts of sinks / response keys are computed once per step in a decode, so the
selection carries them precomputed here too); gather gets the static bound `max_keys` (kept blocks * block +
sinks + response), so no op syncs with the host. Selections: top-K random prompt blocks per selection head +
16 sinks + the last 256 (response) keys.

Timing modes (`--op-timing`, or env FOCUSDLLM_OP_TIMING; recorded as extra_info["timing"]):
  graph (default on CUDA): one call of the op is captured into a `torch.cuda.CUDAGraph` (after warm-up on a
      side stream) and `graph.replay()` is timed, `n` replays between two synchronizes per round, so the
      stats are per call, without Python / launch overhead: what a CUDA-graph-replayed decode step pays.
      extra_info["gpu_us"]: the same from CUDA events. If capture fails (or the replay disagrees with the
      eager output), the case is timed eagerly, with extra_info["graph_error"] set.
  eager (CPU; `--op-timing=eager` on CUDA): wall clock of one Python call + synchronize per round.
At the end of the session bench/conftest.py sets extra_info["speedup_vs_dense"] (dense median / op median,
same layout / keys / queries) and prints a summary table.

    pytest bench/bench_attention_ops.py -q --benchmark-json=bench/results/attention_ops.json  # graph on CUDA
    pytest bench/bench_attention_ops.py -q --op-timing=eager --benchmark-json=...  # eager wall clock
"""

from __future__ import annotations

import functools
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from focusdllm.attention import KeySelection
from focusdllm.attention.flex import flex_available, flex_sparse_attention
from focusdllm.attention.gather import gather_attention
from focusdllm.attention.selection import block_counts

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
D, BS, N_SINKS, N_RESP = 128, 64, 16, 256
LAYOUTS = {"llada": (32, 32), "dream": (28, 4)}  # (Hq, Hkv); selection per KV head
if CUDA:
    KEYS, QUERIES, KEEPS, ROUNDS = (8192, 16384, 32768, 65536), (16, 32, 128), (0.05, 0.10, 0.25), 30
else:
    KEYS, QUERIES, KEEPS, ROUNDS = (4096, 16384), (32,), (0.10,), 5
ROUND_S = 2e-3  # graph mode: replays per round chosen so one round is ~2 ms of GPU time
MAX_REPLAYS = 2000
TIMING_ENV = "FOCUSDLLM_OP_TIMING"

torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # one per shape


def _cases():
    for layout in LAYOUTS:
        for keys in KEYS:
            for t in QUERIES:
                yield pytest.param(layout, keys, t, 1.0, "dense", id=f"{layout}-{keys}-q{t}-dense")
                for keep in KEEPS:
                    for backend in ("flex", "gather"):
                        yield pytest.param(layout, keys, t, keep, backend, id=f"{layout}-{keys}-q{t}-{keep}-{backend}")


@functools.lru_cache(maxsize=1)
def _qkv(layout: str, keys: int, t: int):
    hq, hkv = LAYOUTS[layout]
    g = torch.Generator(DEVICE).manual_seed(0)
    q = torch.randn(1, hq, t, D, generator=g, device=DEVICE, dtype=DTYPE)  # (B, Hq, T, D)
    k = torch.randn(1, hkv, keys, D, generator=g, device=DEVICE, dtype=DTYPE)  # (B, Hkv, Cap, D)
    v = torch.randn(1, hkv, keys, D, generator=g, device=DEVICE, dtype=DTYPE)
    return q, k, v


def _selection(hs: int, keys: int, keep: float) -> tuple[KeySelection, int]:
    """Top-K prompt blocks + sinks + response keys; also a static bound on kept keys per head."""
    g = torch.Generator(DEVICE).manual_seed(1)
    prompt = keys - N_RESP
    nb, nb_prompt = keys // BS, prompt // BS
    n_keep = max(1, math.ceil(keep * nb_prompt))
    top = torch.rand(1, hs, nb_prompt, generator=g, device=DEVICE).topk(n_keep, -1).indices
    block_keep = torch.zeros(1, hs, nb, dtype=torch.bool, device=DEVICE).scatter_(-1, top, True)
    token_keep = torch.zeros(1, hs, keys, dtype=torch.bool, device=DEVICE)
    sinks = torch.randint(0, prompt, (1, hs, N_SINKS), generator=g, device=DEVICE)
    token_keep.scatter_(-1, sinks, True)
    token_keep[..., prompt:] = True
    valid = torch.ones(1, keys, dtype=torch.bool, device=DEVICE)
    counts = block_counts(token_keep, valid, BS)  # per step in a decode (shared by every sparse layer), not per op
    return KeySelection(block_keep, token_keep, valid, BS, counts), n_keep * BS + N_SINKS + N_RESP


def _timing_mode(config) -> str:
    """'graph' or 'eager': --op-timing, else $FOCUSDLLM_OP_TIMING, else graph on CUDA / eager on CPU."""
    mode = config.getoption("op_timing", default=None) or os.environ.get(TIMING_ENV) or "auto"
    if mode not in ("auto", "graph", "eager"):
        raise pytest.UsageError(f"op timing must be auto, graph or eager, not {mode!r}")
    return ("graph" if CUDA else "eager") if mode == "auto" else mode


def _capture(fn):
    """Warm `fn` up on a side stream, capture one call; check one replay against the eager output."""
    ref = fn().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream()):  # own capture stream: a failed capture stays there
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    err, scale = (out.float() - ref.float()).abs().max().item(), ref.float().abs().max().item()
    if not err <= 1e-2 * scale + 1e-6:  # same inputs and kernels: a real difference means the graph is not the op
        graph.reset()
        raise RuntimeError(f"graph replay differs from the eager call (max abs err {err:.3g})")
    return graph


def _replay_us(graph, n: int) -> float:
    """Per-replay GPU time from CUDA events over `n` back-to-back replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / n


def _bench_graph(benchmark, graph) -> dict:
    """benchmark.pedantic over rounds of `n` replays (sync after the last one): stats are per call."""
    est = _replay_us(graph, 10)
    n = max(10, min(MAX_REPLAYS, math.ceil(ROUND_S * 1e6 / max(est, 1e-3))))
    count = [0]

    def replay():
        graph.replay()
        count[0] += 1
        if count[0] == n:  # the last replay of a round: the round's timer stops after the GPU is done
            count[0] = 0
            torch.cuda.synchronize()

    torch.cuda.synchronize()
    benchmark.pedantic(replay, rounds=ROUNDS, iterations=n, warmup_rounds=1)
    return {"replays_per_round": n, "gpu_us": round(_replay_us(graph, n), 3)}


def _bench_eager(benchmark, fn) -> dict:
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def call():
        fn()
        sync()

    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    return {}


@pytest.mark.parametrize(("layout", "keys", "t", "keep", "backend"), list(_cases()))
def test_attention_op(benchmark, request, layout, keys, t, keep, backend):
    if backend == "flex" and not flex_available(DEVICE)[0]:
        pytest.skip(flex_available(DEVICE)[1])
    mode = _timing_mode(request.config)
    q, k, v = _qkv(layout, keys, t)
    hq, hkv = LAYOUTS[layout]
    sel, bound = _selection(hkv, keys, keep)
    if backend == "dense":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
    elif backend == "flex":
        fn = lambda: flex_sparse_attention(q, k, v, sel)
    else:
        fn = lambda: gather_attention(q, k, v, sel, max_keys=bound)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    info: dict = {"timing": mode}
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(3):  # compile + warm-up outside the timed region
            fn()
            sync()
        info["warmup_s"] = round(time.perf_counter() - t0, 3)
        graph = None
        if mode == "graph":
            try:
                if not CUDA:
                    raise RuntimeError("CUDA-graph timing needs CUDA")
                graph = _capture(fn)
            except Exception as e:  # not capturable: say so, time it eagerly
                if CUDA:
                    torch.cuda.synchronize()  # raises if the failed capture broke the context: then the case fails
                info.update(timing="eager", graph_error=f"{type(e).__name__}: {e}"[:500])
        if graph is not None:
            try:
                info.update(_bench_graph(benchmark, graph))
            finally:
                graph.reset()
        else:
            info.update(_bench_eager(benchmark, fn))
    benchmark.extra_info.update(
        layout=layout, q_heads=hq, kv_heads=hkv, head_dim=D, keys=keys, queries=t, block_size=BS,
        keep_ratio=keep, density=float(sel.density().mean()) if backend != "dense" else 1.0,
        max_keys=bound if backend == "gather" else None, backend=backend, dtype=str(DTYPE),
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if CUDA else f"cpu ({torch.get_num_threads()} threads)",
        **info,
    )
