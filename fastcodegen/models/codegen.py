"""The CodeGen forward pass over a paged KV cache, written against an ops backend.

Each block of CodeGen is `x + out_proj(attn(ln(x))) + fc_out(gelu(fc_in(ln(x))))`
(one LayerNorm feeding both branches). In the fused layout of `weights.py`
that is three operations per layer:

    q, g = ops.in_proj(x, ...)      # ln, [q|k|v|fc_in] GEMM, rotary, K/V store, gelu
    a    = ops.attention(q, ...)    # paged attention over the cache
    x    = ops.out_proj(a, g, x)    # [a | g] @ [out_proj | fc_out]^T + bias + x

A backend implements them: `TorchOps` in plain PyTorch (the reference, and
what runs without a GPU), `TritonOps` with the Triton kernels.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..batch import Batch
from ..config import ModelConfig
from ..kv_cache import KVCache
from ..weights import CodeGenWeights, LayerWeights


class Ops(Protocol):
    def in_proj(
        self, x: torch.Tensor, layer: LayerWeights, batch: Batch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: Batch
    ) -> torch.Tensor: ...

    def out_proj(
        self, a: torch.Tensor, g: torch.Tensor, layer: LayerWeights, residual: torch.Tensor
    ) -> torch.Tensor: ...

    def logits(self, x: torch.Tensor, weights: CodeGenWeights) -> torch.Tensor: ...


class CodeGenModel:
    def __init__(self, config: ModelConfig, weights: CodeGenWeights, ops: Ops):
        self.config = config
        self.weights = weights
        self.ops = ops

    @torch.inference_mode()
    def forward(self, batch: Batch, kv_cache: KVCache) -> torch.Tensor:
        """Hidden states [T, d] of the batch's new tokens; writes their K/V to the cache."""
        x = self.weights.wte[batch.input_ids]
        for i, layer in enumerate(self.weights.layers):
            k_cache, v_cache = kv_cache.layer(i)
            q, g = self.ops.in_proj(x, layer, batch, k_cache, v_cache)
            a = self.ops.attention(q, k_cache, v_cache, batch)
            x = self.ops.out_proj(a, g, layer, x)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """ln_f then lm_head: [N, d] -> [N, vocab_size] float32."""
        return self.ops.logits(hidden, self.weights)
