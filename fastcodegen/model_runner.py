"""Runs the model on a scheduled step: builds the batch tensors, runs the forward, returns logits."""

from __future__ import annotations

import torch

from .batch import Batch
from .config import EngineConfig, ModelConfig
from .kv_cache import KVCache, num_kv_blocks
from .models.codegen import CodeGenModel
from .models.torch_ops import TorchOps
from .models.triton_ops import TritonOps
from .sequence import Sequence
from .weights import CodeGenWeights


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, weights: CodeGenWeights):
        self.config = model_config
        self.engine_config = engine_config
        self.device = engine_config.device
        self.block_size = engine_config.block_size
        ops = TritonOps if engine_config.backend == "triton" else TorchOps
        self.model = CodeGenModel(model_config, weights, ops(model_config, self.device))
        num_blocks = num_kv_blocks(model_config, engine_config)
        self.kv_cache = KVCache(model_config, num_blocks, self.block_size, self.device, engine_config.dtype)

    def prepare(self, seqs: list[Sequence], is_prefill: bool) -> Batch:
        """The batch tensors of a step: all tokens of each sequence (prefill) or its last one (decode)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        for seq in seqs:
            n = seq.num_tokens
            start = 0 if is_prefill else n - 1
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:])
            positions.extend(range(start, n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, n))
            query_start.append(query_start[-1] + n - start)
            context_lens.append(n)
        max_blocks = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs]

        def tensor(data: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(data, dtype=dtype, device=self.device)

        return Batch(
            input_ids=tensor(input_ids, torch.int64),
            positions=tensor(positions, torch.int64),
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(tables, torch.int32),
            context_lens=tensor(context_lens, torch.int32),
            query_start_loc=tensor(query_start, torch.int32),
            logits_indices=tensor(query_start[1:], torch.int64) - 1,
            max_query_len=max(b - a for a, b in zip(query_start, query_start[1:])),
            max_context_len=max(context_lens),
        )

    def execute(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Logits [len(seqs), vocab_size] float32 for each sequence's next token."""
        batch = self.prepare(seqs, is_prefill)
        hidden = self.model.forward(batch, self.kv_cache)
        return self.model.compute_logits(hidden[batch.logits_indices])
