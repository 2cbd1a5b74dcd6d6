"""The CodeGen operations in plain PyTorch: readable, on any device, in any dtype.

Numerics follow transformers' CodeGen: rotary and the q.k scores in float32
(keys rounded to the cache dtype first, as transformers' cache does), the
1/sqrt(head_dim) scale applied to the float32 scores, softmax in float32, and
probabilities cast to the model dtype before P @ V. GEMMs run in the model
dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..batch import Batch
from ..config import ModelConfig
from ..weights import CodeGenWeights, InProjLayout, LayerWeights


def rotary_tables(rotary_dim: int, max_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_positions, rotary_dim / 2] float32, computed as transformers does."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    angles = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq
    return angles.cos().to(device), angles.sin().to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary on the first 2 * cos.shape[-1] dims of each head.

    x [T, H, D] float32; cos, sin [T, R/2]. Pairs are (x[i], x[i + R/2]): the
    layout the converter's row permutation produces.
    """
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, H, D] into the caches [num_blocks, block_size, H, D] at slot_mapping [T]; -1 skips a token."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: Batch, scale: float
) -> torch.Tensor:
    """Causal attention of the new tokens over each sequence's cached context.

    q [T, H, D] float32; caches [num_blocks, block_size, H, D]; returns
    [T, H, D] in the cache dtype. Query i of sequence b sits at position
    context_lens[b] - query_len[b] + i and sees keys at positions up to its own.
    """
    block_size = k_cache.shape[1]
    device = q.device
    starts, ctx = batch.query_start_loc.long(), batch.context_lens.long()
    q_lens = starts[1:] - starts[:-1]  # [B]
    kpos = torch.arange(batch.max_context_len, device=device)  # [K]
    slots = batch.block_tables[:, kpos // block_size].long() * block_size + kpos % block_size  # [B, K]
    k = k_cache.reshape(-1, *k_cache.shape[2:])[slots]  # [B, K, H, D]
    v = v_cache.reshape(-1, *v_cache.shape[2:])[slots]
    qi = torch.arange(batch.max_query_len, device=device)  # [Q]
    q_valid = qi[None, :] < q_lens[:, None]  # [B, Q]
    q_index = (starts[:-1, None] + qi[None, :]).clamp(max=q.shape[0] - 1)
    qpos = (ctx - q_lens)[:, None] + qi[None, :]  # [B, Q]
    visible = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < ctx[:, None, None])  # [B, Q, K]
    scores = torch.einsum("bqhd,bkhd->bhqk", q[q_index], k.float()) / scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, Q, H, D]
    return out[q_valid]


class TorchOps:
    def __init__(self, config: ModelConfig, device: torch.device):
        self.config = config
        self.layout = InProjLayout.of(config)
        self.cos, self.sin = rotary_tables(config.rotary_dim, config.n_positions, device)
        self.scale = math.sqrt(config.head_dim)

    def in_proj(
        self, x: torch.Tensor, layer: LayerWeights, batch: Batch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns q [T, H, D] float32 (rotated) and gelu(fc_in(ln(x))) [T, f]; stores K and V."""
        c, layout = self.config, self.layout
        ln = F.layer_norm(x, (c.n_embd,), layer.ln_weight, layer.ln_bias, c.layer_norm_epsilon)
        y = F.linear(ln, layer.w_in, layer.b_in)  # [T, 3d + f]
        cos, sin = self.cos[batch.positions], self.sin[batch.positions]
        q = apply_rotary(layout.heads(y, "q").float(), cos, sin)
        k = apply_rotary(layout.heads(y, "k").float(), cos, sin)
        v = y[:, layout.v].view(-1, c.n_head, c.head_dim)
        store_kv(k.to(x.dtype), v, k_cache, v_cache, batch.slot_mapping)
        return q, F.gelu(y[:, layout.m], approximate="tanh")

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: Batch) -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, batch, self.scale).reshape(q.shape[0], -1)

    def out_proj(self, a: torch.Tensor, g: torch.Tensor, layer: LayerWeights, residual: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat([a, g], dim=-1), layer.w_out, layer.b_out) + residual

    def logits(self, x: torch.Tensor, weights: CodeGenWeights) -> torch.Tensor:
        c = self.config
        ln = F.layer_norm(x, (c.n_embd,), weights.ln_f_weight, weights.ln_f_bias, c.layer_norm_epsilon)
        return F.linear(ln, weights.lm_head_weight, weights.lm_head_bias).float()
