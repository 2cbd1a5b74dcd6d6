"""Steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is a few hundred kernel launches that each run
for microseconds: launching them one by one from Python costs more than they
do. A CUDA graph records them once and replays them with one call. Each
bucket's graph is captured after an eager warm-up of the same bucket (Triton
compiles and picks its configs then, never during capture), largest bucket
first, into the one memory pool all the engine's graphs share.

A graph reads persistent device buffers, which its owner fills and pads
before each replay: the model runner's for the target's decode steps and
verify steps (speculative decoding), the draft model's own for its decode
passes. A bucket's padding step fixes the shapes the graph was captured with
(rows, tokens, the longest query); a step replays the graph of the smallest
bucket it fits. Sampling stays outside the graphs. This object holds the
graphs and their outputs only, not the model that fills their inputs, so
nothing here keeps a closed engine's memory alive.
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable

import torch

from .config import EngineConfig
from .kv_cache import KVCache
from .models.codegen import CodeGenModel
from .step import StepInputs

logger = logging.getLogger("fastcodegen")


def default_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, then steps of 16, up to max_rows."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(80, max(max_rows, 80) + 1, 16))
    out = sorted({b for b in sizes if b < max_rows} | {max_rows})
    return out


def verify_buckets(engine: EngineConfig) -> list[int]:
    """The verify graphs' buckets of rows: up to the most sequences that speculate in one step, none without
    speculative decoding. A bucket of B rows runs B * (k + 1) tokens, so none exceeds max_num_batched_tokens."""
    rows, k = engine.speculating_rows, engine.num_speculative_tokens
    return [b for b in default_buckets(rows) if b * (k + 1) <= engine.max_num_batched_tokens] if rows else []


class CudaGraphs:
    """One graph per bucket of rows: a forward and its logits over every token of the bucket's padding step."""

    def __init__(self, buckets: list[int], name: str = "decode steps"):
        self.buckets = sorted(buckets)
        self.name = name  # what the graphs run, for the log
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @staticmethod
    def new_pool() -> tuple:
        """A memory pool for graphs to share (pass it to every `capture`)."""
        return torch.cuda.graph_pool_handle()

    def fits(self, rows: int) -> bool:
        return rows <= self.buckets[-1]

    def bucket(self, rows: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, rows)]

    @torch.inference_mode()
    def capture(
        self, model: CodeGenModel, kv_cache: KVCache, padding_step: Callable[[int], StepInputs], pool: tuple
    ) -> None:
        """Captures every bucket; `padding_step(b)` fills the persistent buffers with a b-row padding step.

        `pool`: the memory pool (torch.cuda.graph_pool_handle()) all the
        engine's graphs share. They replay one at a time on one stream, so
        each reuses the others' scratch memory. Every bucket writes its
        logits into one output buffer, sized for the largest (float32 logits
        per bucket would hold hundreds of MB): the caller reads a replay's
        logits (copies what it keeps) before the next replay.
        """
        device = kv_cache.data.device
        out = None
        for b in reversed(self.buckets):  # the largest first: its output buffer serves all
            step = padding_step(b)
            for _ in range(2):  # warm-up: compiles the kernels for this shape
                logits = model.compute_logits(model.forward(step, kv_cache))
            if out is None:
                out = torch.empty((step.num_tokens, logits.shape[1]), dtype=logits.dtype, device=device)
            del logits
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out[: step.num_tokens].copy_(model.compute_logits(model.forward(step, kv_cache)))
            self._graphs[b] = (graph, out[: step.num_tokens])
        torch.cuda.synchronize(device)
        logger.info("captured CUDA graphs for %s, batches %s", self.name, self.buckets)

    def replay(self, bucket: int) -> torch.Tensor:
        """Replays a bucket's graph on what the persistent buffers hold; its logits [bucket tokens, vocab_size]."""
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits

    def close(self) -> None:
        """Drops the graphs and their memory pool."""
        self._graphs.clear()
