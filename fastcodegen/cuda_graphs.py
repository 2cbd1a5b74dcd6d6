"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is a few hundred kernel launches that each run
for microseconds: launching them one by one from Python costs more than they
do. A CUDA graph records them once and replays them with one call. Each
bucket's graph is captured after an eager warm-up of the same bucket (Triton
compiles and picks its configs then, never during capture), largest bucket
first, all into one memory pool.

A graph reads the model runner's persistent device buffers, which the
runner fills and pads before each replay. Sampling stays outside the graph.
This object holds the graphs and their outputs only, not the runner that
fills their inputs, so nothing here keeps a closed engine's memory alive.
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable

import torch

from .kv_cache import KVCache
from .models.codegen import CodeGenModel
from .step import StepInputs

logger = logging.getLogger("fastcodegen")


def default_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, then steps of 16, up to max_rows."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(80, max(max_rows, 80) + 1, 16))
    out = sorted({b for b in sizes if b < max_rows} | {max_rows})
    return out


class CudaGraphs:
    def __init__(self, buckets: list[int]):
        self.buckets = sorted(buckets)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def fits(self, rows: int) -> bool:
        return rows <= self.buckets[-1]

    def bucket(self, rows: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, rows)]

    @torch.inference_mode()
    def capture(self, model: CodeGenModel, kv_cache: KVCache, padding_step: Callable[[int], StepInputs]) -> None:
        """Captures every bucket; `padding_step(b)` fills the persistent buffers with a b-row padding step."""
        device = kv_cache.data.device
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            step = padding_step(b)
            for _ in range(2):  # warm-up: compiles the kernels for this shape
                model.compute_logits(model.forward(step, kv_cache))
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = model.compute_logits(model.forward(step, kv_cache))
            self._graphs[b] = (graph, logits)
        torch.cuda.synchronize(device)
        logger.info("captured CUDA graphs for decode batches %s", self.buckets)

    def replay(self, bucket: int) -> torch.Tensor:
        """Replays a bucket's graph on what the persistent buffers hold; its logits [bucket, vocab_size]."""
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits

    def close(self) -> None:
        """Drops the graphs and their memory pool."""
        self._graphs.clear()
