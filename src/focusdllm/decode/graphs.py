"""CUDA-graph replay of the in-block step: the row forward alone, or the whole step (`GraphedSteps`).

An in-block step of an 8B model is a few milliseconds of GPU work spread over ~1500 small kernels;
launching them from Python costs as much again. `row_forward` has static shapes for a given row count
and no host syncs, and everything it reads or writes persistently (canvas tokens, KV cache, plan
tensors) lives at fixed addresses, so the whole step is captured once and replayed.
"""

from __future__ import annotations

import dataclasses

import torch

from ..focus.indicator import StepRows
from .forward import row_forward


class GraphedRowForward:
    """Drop-in for `row_forward(model, canvas, cache, rows, plan)` that captures and replays.

    Warm-up runs before capture write the same K/V the replay writes (a row step is idempotent:
    every layer writes its rows before attending), so warming up on live state is safe.
    """

    def __init__(self, warmup: int = 1):
        self.warmup = warmup
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, model, canvas, cache, rows: StepRows, plan):
        key = (rows.rows.shape[1], id(plan), id(cache), id(canvas))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(model, canvas, cache, rows, plan)
            self.graphs[key] = entry
        graph, static_rows, out = entry
        for name in ("rows", "write", "active", "focus"):
            getattr(static_rows, name).copy_(getattr(rows, name))
        graph.replay()
        return out[0].clone(), out[1].clone()

    def _capture(self, model, canvas, cache, rows, plan):
        static = StepRows(
            rows.rows.clone(), rows.write.clone(), rows.active.clone(), rows.focus.clone(),
            rows.cand, rows.src, rows.dense,
        )
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                row_forward(model, canvas, cache, static, plan)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = row_forward(model, canvas, cache, static, plan)
        return graph, static, out


class GraphedSteps:
    """Drop-in for a `StepRunner` that captures whole in-block steps (rows, network, LM head, sampling,
    commit) as one CUDA graph per `runner.graph_key`; steps without a key (refreshes, host-synced rules)
    run through the runner as before.

    A step mutates the decode state (it commits tokens), so it is not idempotent: the first step of a key
    runs eagerly (the real step, and the warm-up of compiled code and allocator), then the same step is
    recorded without running (capture records kernels only), and later steps of that key replay it.
    """

    def __init__(self, runner):
        self.runner = runner
        self.plain = dataclasses.replace(runner, forward=row_forward)  # no nested capture
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle()

    def replays(self, st, t: int) -> bool:
        """Whether step t would replay an already captured graph."""
        key = self.runner.graph_key(st, t)
        return key is not None and key in self.graphs

    def __call__(self, st, t: int):
        key = self.runner.graph_key(st, t)
        if key is None:
            return self.runner(st, t)
        entry = self.graphs.get(key)
        if entry is not None:
            graph, res = entry
            graph.replay()
            return res
        res = self.plain(st, t)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            captured = self.plain(st, t)
        self.graphs[key] = (graph, captured)
        return dataclasses.replace(res, captured=True)
