"""The CodeGen operations through the Triton kernels of `fastcodegen.kernels`: the "triton" backend.

Per layer: LayerNorm and the fused input projection ([q|k|v|fc_in] GEMM,
rotary, K/V store, gelu), paged attention (the split-K decode kernel when
the scheduler marks the step a decode step, every row with exactly one new
token; the prefill kernel otherwise), and the fused
parallel-residual output GEMM. The embedding gather, the final LayerNorm and
lm_head stay library calls (`torch_ops.final_logits`): the gather moves
batch x d values, the LayerNorm runs once per step on the rows being sampled,
and lm_head is a plain GEMM with a bias that cuBLAS already runs at its peak.
"""

from __future__ import annotations

import torch

from ..batch import Batch
from ..config import ModelConfig
from ..weights import CodeGenWeights, InProjLayout, LayerWeights
from .torch_ops import final_logits, rotary_tables


class TritonOps:
    def __init__(self, config: ModelConfig, device: torch.device, max_model_len: int | None = None):
        """`max_model_len`: the engine's context limit (default n_positions), which bounds decode splits."""
        # Imported here: the kernels need Triton, the rest of the engine does not.
        from ..kernels import decode_attention, in_proj, out_proj, prefill_attention, settings

        self._in_proj = in_proj.in_proj
        self._prefill = prefill_attention.paged_attention
        self._decode = decode_attention.decode_attention
        self._num_splits = decode_attention.num_splits
        self._out_proj = out_proj.out_proj
        self.config = config
        self.max_model_len = config.n_positions if max_model_len is None else max_model_len
        self.layout = InProjLayout.of(config)
        self.cos, self.sin = rotary_tables(config.rotary_dim, config.n_positions, device)
        self.num_sms = settings.device_sms(device)
        self.interpreted = device.type == "cpu"  # Triton's interpreter: plans with the fewest programs
        # Split-K arrival counters, zeroed once: every launch leaves them zeroed for the next one (and for a
        # CUDA graph's replays).
        counters = settings.split_k_tiles(self.layout.width, self.num_sms)
        self.counters = torch.zeros(counters, device=device, dtype=torch.int32)

    def in_proj(
        self, x: torch.Tensor, layer: LayerWeights, batch: Batch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._in_proj(
            x, layer.ln_weight, layer.ln_bias, layer.w_in, layer.b_in, batch.positions, batch.slot_mapping,
            self.cos, self.sin, k_cache, v_cache, self.layout, self.config.layer_norm_epsilon,
            counters=self.counters, num_sms=self.num_sms, interpreted=self.interpreted,
        )  # fmt: skip

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: Batch) -> torch.Tensor:
        c = self.config
        q = q.view(-1, c.n_head, c.head_dim)
        # Only a step whose every row has exactly one new token may take the decode kernel: it pairs
        # query row i with sequence i, which a row with no new token (a prompt that got no chunk, a
        # decode held back) would shift, even when max_query_len is 1.
        if batch.is_decode:
            splits = self._num_splits(
                batch.num_seqs, c.n_head, self.max_model_len, c.head_dim, q.element_size(), num_sms=self.num_sms
            )
            out = self._decode(q, k_cache, v_cache, batch.block_tables, batch.context_lens, splits)
        else:
            out = self._prefill(
                q, k_cache, v_cache, batch.block_tables, batch.context_lens, batch.query_start_loc,
                batch.max_query_len, batch.max_context_len,
            )  # fmt: skip
        return out.view(q.shape[0], -1)

    def out_proj(self, a: torch.Tensor, g: torch.Tensor, layer: LayerWeights, residual: torch.Tensor) -> torch.Tensor:
        return self._out_proj(
            a, g, layer.w_out, layer.b_out, residual,
            counters=self.counters, num_sms=self.num_sms, interpreted=self.interpreted,
        )  # fmt: skip

    def logits(self, x: torch.Tensor, weights: CodeGenWeights) -> torch.Tensor:
        return final_logits(x, weights, self.config.layer_norm_epsilon)
