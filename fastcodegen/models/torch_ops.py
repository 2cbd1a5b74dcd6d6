"""The CodeGen operations in plain PyTorch: readable, on any device, in any dtype.

Each of `in_proj`, `paged_attention`, `decode_attention` and `out_proj` is
a row of the "torch" backend's kernel table (`ops.py`) and the reference the
Triton kernel in its place, in `fastcodegen.kernels`, is tested against.

Numerics follow transformers' CodeGen: GEMMs in the model dtype, rotary in
float32 on the dtype-rounded projection, keys stored in the model dtype,
q.k scores and softmax in float32 with the 1/sqrt(head_dim) scale applied to
the float32 scores, probabilities cast to the model dtype before P @ V. One
difference: q is stored in the model dtype after rotary (as a kernel's
`tl.dot` needs it), where transformers keeps it in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..weights import CodeGenWeights, InProjLayout


def rotary_tables(rotary_dim: int, max_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_positions, rotary_dim / 2] float32, computed as transformers does."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    angles = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq
    return angles.cos().to(device).contiguous(), angles.sin().to(device).contiguous()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary on the first 2 * cos.shape[-1] dims of each head.

    x [T, H, D] float32; cos, sin [T, R/2]. Pairs are (x[i], x[i + R/2]): the
    layout the converter's row regrouping produces.
    """
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, H, D] into the caches [num_blocks, block_size, H, D] at slot_mapping [T]; -1 skips a token."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def in_proj(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: InProjLayout,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm, the [q|k|v|fc_in] projection, rotary, the K/V store, fc_in's bias and gelu_new.

    x [T, d]; w_in [3d + f, d] in InProjLayout order; positions, slot_mapping
    [T]; cos, sin [max_positions, rotary_dim / 2] float32; caches
    [num_blocks, block_size, H, D]. Returns q [T, d] (rotated, model dtype)
    and gelu(fc_in(ln(x))) [T, f]; writes k (rotated) and v to the caches.
    """
    t, h, hd = x.shape[0], layout.n_head, layout.head_dim
    ln = F.layer_norm(x, (x.shape[1],), ln_weight, ln_bias, eps)
    y = F.linear(ln, w_in, b_in)  # [T, 3d + f]
    c, s = cos[positions], sin[positions]
    q = apply_rotary(layout.heads(y, "q").float(), c, s).to(x.dtype)
    k = apply_rotary(layout.heads(y, "k").float(), c, s).to(x.dtype)
    store_kv(k, y[:, layout.v].view(t, h, hd), k_cache, v_cache, slot_mapping)
    return q.reshape(t, h * hd), F.gelu(y[:, layout.m], approximate="tanh")


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_context_len: int,
) -> torch.Tensor:
    """Causal attention of new tokens over each sequence's cached context.

    q [T, H, D]; caches [num_blocks, block_size, H, D]; block_tables [B, *]
    int32; context_lens [B] (tokens in the cache, the new ones included);
    query_start_loc [B + 1]. Query i of sequence b sits at position
    context_lens[b] - query_len[b] + i and sees keys at positions up to its
    own. Returns [T, H, D] in the cache dtype.

    Rows with one new token (the decodes of a mixed step) are attended as one
    batch, as `decode_attention` does; each longer query runs on its own, so
    that a long prompt beside many short sequences never pads them all to its
    length. Rows with no new token are skipped.
    """
    out = torch.empty_like(q, dtype=v_cache.dtype)
    starts, ctx = query_start_loc.tolist(), context_lens.tolist()
    singles = [b for b in range(len(ctx)) if starts[b + 1] - starts[b] == 1]
    if singles:
        rows = torch.tensor(singles, device=q.device)
        first = query_start_loc[rows].long()
        out[first] = decode_attention(
            q[first], k_cache, v_cache, block_tables[rows], context_lens[rows], max(ctx[b] for b in singles)
        )
    for b in range(len(ctx)):
        a, e = starts[b], starts[b + 1]
        if e - a <= 1:
            continue
        out[a:e] = _attend(
            q[a:e], k_cache, v_cache, block_tables[b : b + 1], context_lens[b : b + 1],
            torch.tensor([0, e - a], device=q.device), e - a, ctx[b],
        )  # fmt: skip
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
) -> torch.Tensor:
    """`paged_attention` of a decode step, every row with exactly one new token, as one padded batch.

    q [B, H, D]: query i belongs to sequence i, so a step with a row that has
    no new token must not come here (the scheduler's `is_decode` says which
    steps may). A row with context length 0 (a CUDA-graph padding row) gets
    zeros.
    """
    b = context_lens.shape[0]
    assert q.shape[0] == b, "a decode step has one query per row"
    zeros = torch.zeros_like(q, dtype=v_cache.dtype)
    if max_context_len == 0:
        return zeros
    starts = torch.arange(b + 1, device=q.device, dtype=torch.int32)
    attended = _attend(q, k_cache, v_cache, block_tables, context_lens, starts, 1, max_context_len)
    # A padding row's softmax over no key is NaN: it is replaced, a live row's NaN (a fault) is kept.
    return torch.where((context_lens > 0)[:, None, None], attended, zeros)


def _attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_context_len: int,
) -> torch.Tensor:
    """paged_attention over a batch padded to [B, max_query_len] queries and [B, max_context_len] keys."""
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    device = q.device
    starts, ctx = query_start_loc.long(), context_lens.long()
    q_lens = starts[1:] - starts[:-1]  # [B]
    kpos = torch.arange(max_context_len, device=device)  # [K]
    slots = block_tables[:, kpos // block_size].long() * block_size + kpos % block_size  # [B, K]
    k = k_cache.reshape(-1, *k_cache.shape[2:])[slots]  # [B, K, H, D]
    v = v_cache.reshape(-1, *v_cache.shape[2:])[slots]
    # Slots past a row's context hold whatever their block held before (a NaN left by a failed request
    # included): zero them, since a masked probability of 0 times NaN is still NaN.
    v = v.masked_fill((kpos[None, :] >= ctx[:, None])[:, :, None, None], 0)
    qi = torch.arange(max_query_len, device=device)  # [Q]
    q_valid = qi[None, :] < q_lens[:, None]  # [B, Q]
    q_index = (starts[:-1, None] + qi[None, :]).clamp(max=q.shape[0] - 1)
    qpos = (ctx - q_lens)[:, None] + qi[None, :]  # [B, Q]
    visible = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < ctx[:, None, None])  # [B, Q, K]
    scores = torch.einsum("bqhd,bkhd->bhqk", q[q_index].float(), k.float()) / math.sqrt(head_dim)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, Q, H, D]
    return out[q_valid]


def out_proj(
    a: torch.Tensor, g: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """The parallel residual: x + out_proj(a) + fc_out(g) as one GEMM over [a | g].

    a [T, d] attention output; g [T, f] gelu(fc_in(ln(x))); w_out [d, d + f];
    b_out [d]; residual [T, d]. Returns [T, d].
    """
    return F.linear(torch.cat([a, g], dim=-1), w_out, b_out) + residual


def final_logits(x: torch.Tensor, weights: CodeGenWeights, eps: float) -> torch.Tensor:
    """ln_f then lm_head: [N, d] -> [N, vocab_size] float32."""
    ln = F.layer_norm(x, (x.shape[1],), weights.ln_f_weight, weights.ln_f_bias, eps)
    return F.linear(ln, weights.lm_head_weight, weights.lm_head_bias).float()
