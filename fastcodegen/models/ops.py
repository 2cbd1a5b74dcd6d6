"""The model's per-layer operations, run the same way over any backend's table of four kernels.

A backend is a `Kernels` table (in_proj, prefill attention, decode attention,
out_proj, and optionally an attention for steps of a few new tokens per
sequence): `TORCH`, the plain PyTorch functions of `torch_ops.py`, or the
Triton kernels' table (`triton_kernels`), which carries their launch state.
`Ops` holds what the calls share and makes them; `make_ops` builds it for a
backend.

The embedding gather, the final LayerNorm and lm_head stay library calls on
every backend (`torch_ops.final_logits`): the gather moves batch x d values,
the LayerNorm runs once per step on the rows being sampled, and lm_head is a
plain GEMM with a bias that cuBLAS already runs at its peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import torch

from ..config import ModelConfig
from ..step import StepInputs
from ..weights import CodeGenWeights, InProjLayout, LayerWeights
from . import torch_ops

BACKENDS = ("torch", "triton")


def _no_options() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Kernels:
    """One backend: its four per-layer functions and the keyword options it passes them.

    in_proj, prefill_attention, decode_attention and out_proj take the
    positional arguments of `torch_ops.in_proj`, `paged_attention`,
    `decode_attention` and `out_proj`; `projection_options` go to in_proj and
    out_proj, `decode_options` to decode_attention. `verify_attention`, when
    set, takes `paged_attention`'s arguments and `decode_options` and serves
    steps of at most `verify_max_query_len` new tokens per sequence
    (speculative decoding's verify steps) that are not decode steps.
    """

    name: str
    in_proj: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    prefill_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor]
    out_proj: Callable[..., torch.Tensor]
    projection_options: Mapping[str, Any] = field(default_factory=_no_options)
    decode_options: Mapping[str, Any] = field(default_factory=_no_options)
    verify_attention: Optional[Callable[..., torch.Tensor]] = None
    verify_max_query_len: int = 0


TORCH = Kernels("torch", torch_ops.in_proj, torch_ops.paged_attention, torch_ops.decode_attention, torch_ops.out_proj)


def triton_kernels(
    config: ModelConfig,
    device: torch.device,
    max_model_len: int,
    num_sms: Optional[int] = None,
    interpreted: Optional[bool] = None,
) -> Kernels:
    """The Triton kernels' table for `config` on `device`, decode splits bounded by the context limit `max_model_len`.

    Launches are planned for the device (`settings.device_sms`,
    `settings.interpreted_on`) unless `num_sms` or `interpreted` say otherwise
    (tools that plan a GPU's launches on another device).
    """
    # Imported here: the kernels need Triton, the rest of the engine does not.
    from ..kernels import decode_attention, in_proj, out_proj, prefill_attention, settings, verify_attention

    num_sms = settings.device_sms(device) if num_sms is None else num_sms
    interpreted = settings.interpreted_on(device) if interpreted is None else interpreted
    # Split-K arrival counters, zeroed once: every launch leaves them zeroed for the next one (and for a CUDA
    # graph's replays). in_proj's N is the widest a projection has.
    tiles = settings.split_k_tiles(InProjLayout.of(config).width, num_sms)
    counters = torch.zeros(tiles, device=device, dtype=torch.int32)
    return Kernels(
        "triton",
        in_proj.in_proj,
        prefill_attention.paged_attention,
        decode_attention.decode_attention,
        out_proj.out_proj,
        projection_options=MappingProxyType({"counters": counters, "num_sms": num_sms, "interpreted": interpreted}),
        decode_options=MappingProxyType({"max_model_len": max_model_len, "num_sms": num_sms}),
        verify_attention=verify_attention.verify_attention,
        verify_max_query_len=verify_attention.MAX_QUERIES,
    )


class Ops:
    """The operations `CodeGenModel` runs per layer, through a `Kernels` table (any backend, the same calls).

    Holds what the calls share: the model's config, the fused weights'
    layout (`InProjLayout`) and the rotary tables.
    """

    def __init__(self, config: ModelConfig, kernels: Kernels, device: torch.device):
        self.model_config = config
        self.kernels = kernels
        self.layout = InProjLayout.of(config)
        self.cos, self.sin = torch_ops.rotary_tables(config.rotary_dim, config.n_positions, device)

    def in_proj(
        self, x: torch.Tensor, layer: LayerWeights, step: StepInputs, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [T, d] rotated, gelu(fc_in(ln_1(x))) [T, f]) of x [T, d]; stores the step's keys and values."""
        k = self.kernels
        return k.in_proj(
            x, layer.ln_weight, layer.ln_bias, layer.w_in, layer.b_in, step.positions, step.slot_mapping,
            self.cos, self.sin, k_cache, v_cache, self.layout, self.model_config.layer_norm_epsilon,
            **k.projection_options,
        )  # fmt: skip

    def attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: StepInputs
    ) -> torch.Tensor:
        """Paged attention of q [T, d] over the caches: [T, d]."""
        c, k = self.model_config, self.kernels
        heads = q.view(-1, c.n_head, c.head_dim)
        # Only a step whose every row has exactly one new token may take the decode kernel: it pairs query
        # row i with sequence i, which a row with no new token (a prompt that got no chunk, a decode held
        # back) would shift, even when max_query_len is 1.
        if step.is_decode:
            out = k.decode_attention(
                heads, k_cache, v_cache, step.block_tables, step.context_lens, step.max_context_len,
                **k.decode_options,
            )  # fmt: skip
        elif k.verify_attention is not None and step.max_query_len <= k.verify_max_query_len:
            # A few new tokens per row at the end of their contexts: split over the context like decode.
            out = k.verify_attention(
                heads, k_cache, v_cache, step.block_tables, step.context_lens, step.query_start_loc,
                step.max_query_len, step.max_context_len, **k.decode_options,
            )  # fmt: skip
        else:
            out = k.prefill_attention(
                heads, k_cache, v_cache, step.block_tables, step.context_lens, step.query_start_loc,
                step.max_query_len, step.max_context_len,
            )  # fmt: skip
        return out.reshape(q.shape[0], -1)

    def out_proj(self, a: torch.Tensor, g: torch.Tensor, layer: LayerWeights, residual: torch.Tensor) -> torch.Tensor:
        """The parallel residual: residual + out_proj(a) + fc_out(g), [T, d]."""
        k = self.kernels
        return k.out_proj(a, g, layer.w_out, layer.b_out, residual, **k.projection_options)

    def logits(self, x: torch.Tensor, weights: CodeGenWeights) -> torch.Tensor:
        """ln_f then lm_head: [N, d] -> [N, vocab_size] float32."""
        return torch_ops.final_logits(x, weights, self.model_config.layer_norm_epsilon)


def make_ops(config: ModelConfig, backend: str, device: torch.device, max_model_len: int) -> Ops:
    """The operations of `backend` ("torch" or "triton") for a model of `config` on `device`.

    `max_model_len` is the engine's context limit (it bounds the Triton
    decode kernel's splits).
    """
    if backend == "torch":
        kernels = TORCH
    elif backend == "triton":
        kernels = triton_kernels(config, device, max_model_len)
    else:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    return Ops(config, kernels, device)
