"""The CodeGen forward pass over a paged KV cache, written against the per-layer operations of `ops.py`.

Each block of CodeGen is `x + out_proj(attn(ln(x))) + fc_out(gelu(fc_in(ln(x))))`
(one LayerNorm feeding both branches). In the fused layout of `weights.py`
that is three operations per layer:

    q, g = ops.in_proj(x, ...)      # ln, [q|k|v|fc_in] GEMM, rotary, K/V store, gelu
    a    = ops.attention(q, ...)    # paged attention over the cache
    x    = ops.out_proj(a, g, x)    # [a | g] @ [out_proj | fc_out]^T + bias + x

`Ops` runs them through a backend's table of kernels (`make_ops`): plain
PyTorch (the reference, and what runs without a GPU) or the Triton kernels.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kv_cache import KVCache
from ..step import StepInputs
from ..weights import CodeGenWeights
from .ops import Ops


class CodeGenModel:
    def __init__(self, config: ModelConfig, weights: CodeGenWeights, ops: Ops):
        self.model_config = config
        self.weights = weights
        self.ops = ops

    @torch.inference_mode()
    def forward(self, step: StepInputs, kv_cache: KVCache) -> torch.Tensor:
        """Hidden states [T, d] of the step's new tokens; writes their K/V to the cache."""
        x = self.weights.wte[step.input_ids]
        for i, layer in enumerate(self.weights.layers):
            k_cache, v_cache = kv_cache.layer(i)
            q, g = self.ops.in_proj(x, layer, step, k_cache, v_cache)
            a = self.ops.attention(q, k_cache, v_cache, step)
            x = self.ops.out_proj(a, g, layer, x)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """ln_f then lm_head: [N, d] -> [N, vocab_size] float32."""
        return self.ops.logits(hidden, self.weights)
