"""The paged KV cache: its tensors and how many blocks fit.

One tensor [n_layer, 2, num_blocks, block_size, n_head, head_dim]: for layer
l, `data[l, 0]` holds K and `data[l, 1]` V. A token's slot s is block
s // block_size, row s % block_size, so `k.view(-1, n_head, head_dim)[s]` is
its key. Keys are stored after rotary, in the model's dtype.
"""

from __future__ import annotations

import torch

from .config import EngineConfig, ModelConfig

# Tokens of KV cache on the CPU when kv_cache_tokens is not set.
CPU_DEFAULT_CONTEXTS = 4


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Zeroed, not empty: attention reads whole blocks, and a never-written
        # row must not hold a NaN (0 * NaN poisons P @ V).
        self.data = torch.zeros(
            (config.n_layer, 2, num_blocks, block_size, config.n_head, config.head_dim), device=device, dtype=dtype
        )

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i, each [num_blocks, block_size, n_head, head_dim]."""
        return self.data[i, 0], self.data[i, 1]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def activation_bytes(model: ModelConfig, engine: EngineConfig) -> int:
    """An upper estimate of the eager forward's working memory at the largest prefill."""
    element = torch.empty((), dtype=engine.dtype).element_size()
    t, d, f = engine.max_num_batched_tokens, model.n_embd, model.n_inner
    per_token = (3 * d + f) + (d + f) + 4 * d  # w_in output, w_out input, residual/LN copies
    # fp32 scores, their mask and softmax for the longest prompt
    scores = 3 * model.n_head * engine.max_model_len * engine.max_model_len * 4
    logits = engine.max_num_seqs * model.vocab_size * 4 * 3
    return 2 * t * per_token * element + scores + logits


def num_kv_blocks(model: ModelConfig, engine: EngineConfig) -> int:
    """How many KV blocks to allocate; at least one full-length sequence must fit.

    With `kv_cache_tokens` set, that many tokens. Otherwise, on the CPU,
    CPU_DEFAULT_CONTEXTS full-length sequences; on CUDA, what remains of
    `gpu_memory_utilization` of the device's memory after the weights (already
    loaded) and the working memory of a forward pass.
    """
    block_bytes = engine.block_size * model.kv_bytes_per_token(engine.dtype)
    min_blocks = -(-engine.max_model_len // engine.block_size)
    if engine.kv_cache_tokens is not None:
        return -(-engine.kv_cache_tokens // engine.block_size)
    if engine.device.type != "cuda":
        return CPU_DEFAULT_CONTEXTS * min_blocks
    free, total = torch.cuda.mem_get_info(engine.device)
    budget = int(total * engine.gpu_memory_utilization) - (total - free) - activation_bytes(model, engine)
    blocks = budget // block_bytes
    if blocks < min_blocks:
        raise RuntimeError(
            f"not enough GPU memory for the KV cache: {max(budget, 0) / 2**30:.2f} GiB left after the weights, "
            f"a {engine.max_model_len}-token sequence needs {min_blocks * block_bytes / 2**30:.2f} GiB; "
            "raise gpu_memory_utilization or lower max_model_len / max_num_batched_tokens"
        )
    return int(blocks)
