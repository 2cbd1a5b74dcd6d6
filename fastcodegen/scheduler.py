"""The step scheduler: a thin layer over the native one (`fastcodegen._C.Scheduler`).

The native scheduler owns the sequences (tokens, block tables, decoded text)
and decides each step (continuous batching, chunked prefill, prefix cache,
n-sample forks, preemption: csrc/scheduler.h). This module allocates, once,
the host buffers it writes each step's metadata into (pinned on CUDA, so the
copies to the device are asynchronous) and hands out views of the part a
step uses. Nothing here loops over sequences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import _C
from .config import EngineConfig
from .sampling_params import SamplingParams
from .tokenizer import Tokenizer

FINISH_REASONS = {1: "stop", 2: "length", 3: "abort"}


@dataclass
class HostStep:
    """One step's metadata in host memory (views of the scheduler's buffers)."""

    info: "_C.StepInfo"
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [R + 1] int32
    context_lens: torch.Tensor  # [R] int32
    block_tables: torch.Tensor  # [R, max_blocks] int32
    logits_indices: torch.Tensor  # [S] int64
    temperature: torch.Tensor  # [S] float32
    top_k: torch.Tensor  # [S] int32
    top_p: torch.Tensor  # [S] float32
    copy_src: torch.Tensor  # [C] int64 blocks to copy before the forward
    copy_dst: torch.Tensor  # [C] int64
    sample_index: np.ndarray  # [S] completion index of each sampled row
    sample_request: np.ndarray  # [S] request of each sampled row
    special_rows: np.ndarray  # rows the engine samples itself (seeded, logprobs)


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, eos_token_ids: tuple[int, ...]):
        c = _C.SchedulerConfig()
        c.num_blocks = num_blocks
        c.block_size = config.block_size
        c.max_num_seqs = config.max_num_seqs
        c.max_num_batched_tokens = config.max_num_batched_tokens
        c.max_model_len = config.max_model_len
        c.max_samples = config.max_samples
        c.watermark_blocks = max(1, num_blocks // 100)
        c.enable_prefix_caching = config.enable_prefix_caching
        c.eos_token_ids = list(eos_token_ids)
        self.core = _C.Scheduler(c)
        self.max_blocks_per_seq = self.core.max_blocks_per_seq
        pin = config.device.type == "cuda"
        t, r, s = c.max_num_batched_tokens, c.max_num_seqs, c.max_samples

        def buf(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, pin_memory=pin)

        self._b = {
            "input_ids": buf(t, torch.int64),
            "positions": buf(t, torch.int64),
            "slot_mapping": buf(t, torch.int64),
            "query_start_loc": buf(r + 1, torch.int32),
            "context_lens": buf(r, torch.int32),
            "block_tables": buf(r * self.max_blocks_per_seq, torch.int32),
            "logits_indices": buf(s, torch.int64),
            "temperature": buf(s, torch.float32),
            "top_k": buf(s, torch.int32),
            "top_p": buf(s, torch.float32),
            "sample_seq": buf(s, torch.int64),
            "sample_index": buf(s, torch.int32),
            "sample_request": buf(s, torch.int64),
            "special_rows": buf(s, torch.int32),
            "copy_src": buf(r, torch.int64),
            "copy_dst": buf(r, torch.int64),
        }
        self._np = {k: v.numpy() for k, v in self._b.items()}
        self.core.bind(*self._np.values())
        self._block_tables = self._b["block_tables"].view(r, self.max_blocks_per_seq)
        self._view_cache: dict[tuple, HostStep] = {}

    def set_vocabulary(self, tokenizer: Tokenizer) -> None:
        self.core.set_vocabulary(
            [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_limit)], sorted(tokenizer.special_ids)
        )

    def add(self, prompt: list[int], params: SamplingParams, watch: bool) -> int:
        c = _C.RequestConfig()
        c.n = params.n
        c.max_tokens = params.max_tokens
        c.ignore_eos = params.ignore_eos
        c.skip_special_tokens = params.skip_special_tokens
        c.temperature = params.temperature
        c.top_p = params.top_p
        c.top_k = params.top_k
        c.special = params.seed is not None or params.logprobs is not None
        c.watch = watch
        c.stop_token_ids = list(params.stop_token_ids)
        c.stop_strings = list(params.stop)
        return self.core.add_request(prompt, c)

    def schedule(self) -> HostStep:
        """Decides the next step; its metadata, as views of the host buffers."""
        return self._views(self.core.schedule())

    def _views(self, info: "_C.StepInfo") -> HostStep:
        # Consecutive decode steps have the same shape: reuse their views (slicing costs microseconds).
        shape = (info.num_tokens, info.num_rows, info.num_samples, info.num_copies, info.num_special)
        cached = self._view_cache.get(shape)
        if cached is None:
            cached = self._view_cache[shape] = self._slice(info)
            if len(self._view_cache) > 64:
                self._view_cache.pop(next(iter(self._view_cache)))
        cached.info = info
        return cached

    def _slice(self, info: "_C.StepInfo") -> HostStep:
        b, t, r, s = self._b, info.num_tokens, info.num_rows, info.num_samples
        return HostStep(
            info=info,
            input_ids=b["input_ids"][:t],
            positions=b["positions"][:t],
            slot_mapping=b["slot_mapping"][:t],
            query_start_loc=b["query_start_loc"][: r + 1],
            context_lens=b["context_lens"][:r],
            block_tables=self._block_tables[:r],
            logits_indices=b["logits_indices"][:s],
            temperature=b["temperature"][:s],
            top_k=b["top_k"][:s],
            top_p=b["top_p"][:s],
            copy_src=b["copy_src"][: info.num_copies],
            copy_dst=b["copy_dst"][: info.num_copies],
            sample_index=self._np["sample_index"][:s],
            sample_request=self._np["sample_request"][:s],
            special_rows=self._np["special_rows"][: info.num_special],
        )

    def pad_decode(self, step: HostStep, rows: int) -> HostStep:
        """A decode step widened to `rows` rows; the extra rows store nothing and attend to nothing."""
        r = step.info.num_rows
        b = self._b
        b["input_ids"][r:rows] = 0
        b["positions"][r:rows] = 0
        b["slot_mapping"][r:rows] = -1
        b["context_lens"][r:rows] = 0
        b["query_start_loc"][r + 1 : rows + 1] = torch.arange(r + 1, rows + 1, dtype=torch.int32)
        return dataclasses.replace(
            step,
            input_ids=b["input_ids"][:rows],
            positions=b["positions"][:rows],
            slot_mapping=b["slot_mapping"][:rows],
            query_start_loc=b["query_start_loc"][: rows + 1],
            context_lens=b["context_lens"][:rows],
            block_tables=self._block_tables[:rows],
        )

    def padding_step(self, rows: int) -> HostStep:
        """A decode step of `rows` padding rows only (for capturing CUDA graphs)."""
        info = _C.StepInfo()
        info.is_decode = True
        info.max_query_len = 1
        self._b["query_start_loc"][0] = 0
        return self.pad_decode(self._slice(info), rows)

    def update(self, sampled: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Applies the sampled tokens: ([(seq, request)] finished, [(seq, request)] watched with new text)."""
        return self.core.update(sampled)

    def sampled_seq(self, row: int) -> int:
        """After update(): the sequence sampled row `row` went to (a fork's new id included)."""
        return int(self._np["sample_seq"][row])

    def text(self, seq: int, start: int = 0, end: Optional[int] = None) -> bytes:
        return self.core.text(seq, start, -1 if end is None else end)
