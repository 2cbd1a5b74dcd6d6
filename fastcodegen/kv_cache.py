"""The paged KV cache: its tensors and how many blocks fit.

One tensor [n_layer, 2, num_blocks, block_size, n_head, head_dim]: for layer
l, `data[l, 0]` holds K and `data[l, 1]` V. A token's slot s is block
s // block_size, row s % block_size, so `k.view(-1, n_head, head_dim)[s]` is
its key. Keys are stored after rotary, in the model's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import EngineConfig, ModelConfig
from .kernels.settings import split_k_scratch_bytes

# Tokens of KV cache on the CPU when kv_cache_tokens is not set.
CPU_DEFAULT_CONTEXTS = 4


class NotEnoughMemoryError(RuntimeError):
    """The device cannot hold the KV cache of one full-length sequence beside the weights and working memory."""


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Zeroed, not empty: attention reads whole blocks, and a never-written
        # row must not hold a NaN (0 * NaN poisons P @ V).
        self.data = torch.zeros(
            (config.n_layer, 2, num_blocks, block_size, config.n_head, config.head_dim), device=device, dtype=dtype
        )

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copies whole blocks src -> dst (device index tensors), every layer, K and V."""
        self.data[:, :, dst] = self.data[:, :, src]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i, each [num_blocks, block_size, n_head, head_dim]."""
        return self.data[i, 0], self.data[i, 1]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def activation_bytes(model: ModelConfig, engine: EngineConfig) -> int:
    """An upper estimate of the working memory beside the weights and the KV cache.

    The eager forward at the largest prefill, the logits of the most rows a
    step samples and the sampler's temporaries over them, and (when decode
    steps are captured) the CUDA graphs' private memory pool, which eager
    steps cannot reuse (`graph_bytes`).
    """
    element = torch.empty((), dtype=engine.dtype).element_size()
    d, f, v = model.n_embd, model.n_inner, model.vocab_size
    per_token = _activations_per_token(model)
    # fp32 scores, their mask and softmax for the longest prompt (the torch backend's attention)
    scores = 3 * model.n_head * engine.max_model_len * engine.max_model_len * 4
    forward = 2 * engine.max_num_batched_tokens * per_token * element + scores
    forward += split_k_scratch_bytes(3 * d + f)  # the Triton projections' partial sums at decode steps
    # Sampled rows [S, V]: the logits in the model dtype and in float32, and the sampler's work over them
    # (scaled logits, sorted values and int64 order, cumulative sums, masks, probabilities, noise).
    sampler = engine.max_samples * v * (element + SAMPLER_BYTES_PER_LOGIT)
    return forward + sampler + graph_bytes(model, engine)


def _activations_per_token(model: ModelConfig) -> int:
    """Elements a token's activations take in a layer: w_in's output, w_out's input, residual and LN copies."""
    d, f = model.n_embd, model.n_inner
    return (3 * d + f) + (d + f) + 4 * d


def graph_bytes(model: ModelConfig, engine: EngineConfig, verify: bool = True) -> int:
    """An upper estimate of the memory the CUDA graphs of `model` keep (0 without graphs).

    The largest bucket's activations and logits (the pool reuses them across
    graphs), and each set of graphs' float32 output buffer, sized for its
    largest bucket: decode steps of every sequence and, with `verify` and
    speculative decoding, verify steps of k + 1 tokens a row.
    """
    if not engine.uses_cuda_graphs:
        return 0
    element = torch.empty((), dtype=engine.dtype).element_size()
    d, f, v = model.n_embd, model.n_inner, model.vocab_size
    outputs = [engine.max_num_seqs]
    if verify and engine.speculating_rows:  # at most cuda_graphs.verify_buckets' largest bucket's tokens
        tokens = engine.speculating_rows * (engine.num_speculative_tokens + 1)
        outputs.append(min(tokens, engine.max_num_batched_tokens))
    largest = max(outputs)
    transient = 2 * largest * _activations_per_token(model) * element + largest * v * (element + 4)
    return transient + sum(outputs) * v * 4 + split_k_scratch_bytes(3 * d + f)


# Bytes the sampler's temporaries take per logit of a sampled row (float32 copies, an int64 sort order).
SAMPLER_BYTES_PER_LOGIT = 12 * 4 + 8


def num_kv_blocks(
    model: ModelConfig, engine: EngineConfig, weight_bytes: int, draft: Optional[ModelConfig] = None
) -> int:
    """How many KV blocks to allocate; at least one full-length sequence must fit.

    With `kv_cache_tokens` set, that many tokens. Otherwise, on the CPU,
    CPU_DEFAULT_CONTEXTS full-length sequences; on CUDA, what this engine may
    use: `gpu_memory_utilization` of the device's memory less its own weights
    (`weight_bytes`) and working memory (`activation_bytes`), and never more
    than is available now, counting memory PyTorch holds cached but unused as
    available. Other engines in the process (and freed memory PyTorch keeps)
    are not charged to this one's share. A `draft` model keeps a cache of as
    many blocks: each block costs both (`weight_bytes` then counts both
    models' weights).
    """
    block_bytes = engine.block_size * model.kv_bytes_per_token(engine.dtype)
    if draft is not None:
        block_bytes += engine.block_size * draft.kv_bytes_per_token(engine.dtype)
    min_blocks = -(-engine.max_model_len // engine.block_size)
    if engine.kv_cache_tokens is not None:
        return -(-engine.kv_cache_tokens // engine.block_size)
    if engine.device.type != "cuda":
        return CPU_DEFAULT_CONTEXTS * min_blocks
    free, total = torch.cuda.mem_get_info(engine.device)
    cached_unused = torch.cuda.memory_reserved(engine.device) - torch.cuda.memory_allocated(engine.device)
    working = activation_bytes(model, engine) + (graph_bytes(draft, engine, verify=False) if draft is not None else 0)
    share = int(total * engine.gpu_memory_utilization) - weight_bytes - working
    available = free + cached_unused - working
    budget = min(share, available)
    blocks = budget // block_bytes
    if blocks < min_blocks:
        raise NotEnoughMemoryError(
            f"not enough GPU memory for the KV cache: {max(budget, 0) / 2**30:.2f} GiB left "
            f"(this engine's share {max(share, 0) / 2**30:.2f} GiB, available now {max(available, 0) / 2**30:.2f} "
            f"GiB, after {weight_bytes / 2**30:.2f} GiB of weights and {working / 2**30:.2f} GiB of working memory); "
            f"a {engine.max_model_len}-token sequence needs {min_blocks * block_bytes / 2**30:.2f} GiB. "
            "Raise gpu_memory_utilization, set kv_cache_tokens, lower max_model_len / max_num_seqs / "
            "max_num_batched_tokens, or close other engines (Engine.close())"
        )
    return int(blocks)
