"""Runs the model on a scheduled step: metadata to the device, block copies, forward (eager or a CUDA graph), logits."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .batch import Batch
from .config import EngineConfig, ModelConfig
from .cuda_graphs import CudaGraphs
from .kv_cache import KVCache, num_kv_blocks
from .models.codegen import CodeGenModel
from .models.torch_ops import TorchOps
from .models.triton_ops import TritonOps
from .scheduler import HostStep, Scheduler
from .weights import CodeGenWeights


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, weights: CodeGenWeights):
        self.config = model_config
        self.engine_config = engine_config
        self.device = engine_config.device
        if engine_config.backend == "triton":
            ops = TritonOps(model_config, self.device, engine_config.max_model_len)
        else:
            ops = TorchOps(model_config, self.device)
        self.model = CodeGenModel(model_config, weights, ops)
        num_blocks = num_kv_blocks(model_config, engine_config, weights.nbytes())
        self.kv_cache = KVCache(model_config, num_blocks, engine_config.block_size, self.device, engine_config.dtype)
        self.graphs: Optional[CudaGraphs] = None  # set by capture_cuda_graphs()
        self._pad_decode: Optional[Callable[[HostStep, int], HostStep]] = None
        self._dev: Optional[dict[str, torch.Tensor]] = None
        if self.device.type == "cuda":
            # Persistent device copies of the step metadata: steps copy into them
            # (asynchronously, from pinned memory), CUDA graphs read them.
            e = engine_config
            max_blocks = -(-e.max_model_len // e.block_size)

            def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
                return torch.zeros(shape, device=self.device, dtype=dtype)

            self._dev = {
                "input_ids": zeros(e.max_num_batched_tokens, dtype=torch.int64),
                "positions": zeros(e.max_num_batched_tokens, dtype=torch.int64),
                "slot_mapping": zeros(e.max_num_batched_tokens, dtype=torch.int64),
                "query_start_loc": zeros(e.max_num_seqs + 1, dtype=torch.int32),
                "context_lens": zeros(e.max_num_seqs, dtype=torch.int32),
                "block_tables": zeros(e.max_num_seqs, max_blocks, dtype=torch.int32),
                "logits_indices": zeros(2 * e.max_num_seqs, dtype=torch.int64),
            }

    def upload(self, step: HostStep) -> Batch:
        """The step's Batch on the model's device (on CUDA: copied into the persistent buffers)."""
        host = {
            "input_ids": step.input_ids,
            "positions": step.positions,
            "slot_mapping": step.slot_mapping,
            "query_start_loc": step.query_start_loc,
            "context_lens": step.context_lens,
            "block_tables": step.block_tables,
            "logits_indices": step.logits_indices,
        }
        if self._dev is not None:
            host = {name: self._dev[name][: t.shape[0]].copy_(t, non_blocking=True) for name, t in host.items()}
        info = step.info
        return Batch(
            **host, max_query_len=info.max_query_len, max_context_len=info.max_context_len, is_decode=info.is_decode
        )

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copies whole KV blocks (every layer, K and V): a sample's own copy of a block it shared."""
        src, dst = src.to(self.device), dst.to(self.device)
        self.kv_cache.data[:, :, dst] = self.kv_cache.data[:, :, src]

    def capture_cuda_graphs(self, scheduler: Scheduler, buckets: list[int]) -> None:
        """Captures decode steps of each bucket size; later decode steps that fit replay them."""
        self._pad_decode = scheduler.pad_decode  # the scheduler owns the host buffers padding writes
        self.graphs = CudaGraphs(buckets)
        self.graphs.capture(self.model, self.kv_cache, lambda rows: self.upload(scheduler.padding_step(rows)))

    def run_graph(self, step: HostStep) -> torch.Tensor:
        """Logits [num_samples, vocab_size] of a decode step, by replaying its bucket's graph."""
        assert self.graphs is not None and self._pad_decode is not None
        bucket = self.graphs.bucket(step.info.num_rows)
        self.upload(self._pad_decode(step, bucket))
        logits = self.graphs.replay(bucket)
        return logits[step.logits_indices.to(logits.device, non_blocking=True)]

    @torch.inference_mode()
    def execute(self, step: HostStep) -> torch.Tensor:
        """Logits [num_samples, vocab_size] float32 of the step's sampled rows."""
        info = step.info
        if info.num_copies:
            self.copy_blocks(step.copy_src, step.copy_dst)
        if self.graphs is not None and info.is_decode and self.graphs.fits(info.num_rows):
            return self.run_graph(step)
        batch = self.upload(step)
        hidden = self.model.forward(batch, self.kv_cache)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def close(self) -> None:
        """Drops the graphs, the KV cache, the weights and the device buffers (their memory returns to PyTorch)."""
        if self.graphs is not None:
            self.graphs.close()
        self.graphs = None
        self._pad_decode = None
        self._dev = None
        self.kv_cache = None
        self.model = None
