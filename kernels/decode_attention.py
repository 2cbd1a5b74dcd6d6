"""Paged attention for decode steps: split-K ("flash decoding") in two kernels.

One new token per sequence attends to its whole cached context. With a
batch of one and a long context, one program per (sequence, head) would
leave most of the GPU idle, so the context is cut into NUM_SPLITS parts: the
first kernel computes, per (sequence, head, split), the partial softmax
statistics (max and sum of exp) and the unnormalised output of its part; the
second combines the splits.

The grid is (batch, heads, NUM_SPLITS) and NUM_SPLITS depends only on the
batch size and the device, never on the sequences' lengths, which are read
from device memory: a captured CUDA graph stays valid for any lengths. A
sequence with context length 0 (a padding row of a graph's batch) gets a
zero output. Scores and softmax in float32, scale on the float32 scores,
probabilities rounded to the model dtype before P @ V as in prefill.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastcodegen.models.torch_ops import paged_attention as paged_attention_reference  # noqa: F401  (the reference)


@triton.jit
def _split_kernel(
    Q,  # [B, H, HD]: sequence stride stride_qb, head stride stride_qh, dims contiguous
    K_CACHE, V_CACHE,  # [num_blocks, PAGE, H, HD]: block, slot and head strides stride_cb, stride_cs, stride_ch
    PART_OUT,  # [B, H, NUM_SPLITS, HD_PAD] float32, contiguous
    PART_MAX, PART_SUM,  # [B, H, NUM_SPLITS] float32, contiguous
    BLOCK_TABLES,  # [B, max_blocks] int32, row stride stride_bt
    CONTEXT_LENS,  # [B] int32
    sm_scale,
    stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
    H: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr, PAGE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(CONTEXT_LENS + b)
    # Each split takes a whole number of BLOCK_N tiles.
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)
    d = tl.arange(0, HD_PAD)
    d_ok = d < HD
    q = tl.load(Q + b * stride_qb + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([HD_PAD], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        k_ok = kpos < end
        block = tl.load(BLOCK_TABLES + b * stride_bt + kpos // PAGE, mask=k_ok, other=0)
        row = block.to(tl.int64) * stride_cb + (kpos % PAGE) * stride_cs + h * stride_ch
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K_CACHE + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * sm_scale  # [BLOCK_N]
        s = tl.where(k_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(V_CACHE + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        p = p.to(v.dtype).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    part = (b * H + h) * NUM_SPLITS + split
    tl.store(PART_OUT + part * HD_PAD + d, acc)
    tl.store(PART_MAX + part, m_i)
    tl.store(PART_SUM + part, l_i)


@triton.jit
def _combine_kernel(
    PART_OUT, PART_MAX, PART_SUM,  # as written by _split_kernel
    OUT,  # [B, H, HD]: sequence stride stride_ob, head stride stride_oh
    stride_ob, stride_oh,
    H: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < NUM_SPLITS
    base = (b * H + h) * NUM_SPLITS
    m = tl.load(PART_MAX + base + s, mask=s_ok, other=float("-inf"))
    l = tl.load(PART_SUM + base + s, mask=s_ok, other=0.0)
    d = tl.arange(0, HD_PAD)
    o = tl.load(PART_OUT + (base + s)[:, None] * HD_PAD + d[None, :], mask=s_ok[:, None], other=0.0)
    # Empty splits (and empty sequences) have l = 0 and m = -inf: weight 0. A finite
    # stand-in for their -inf keeps exp's argument a number (-inf - -inf would be NaN).
    m = tl.where(l > 0, m, -3.0e38)
    m_max = tl.max(m, axis=0)
    w = tl.where(l > 0, tl.exp(m - m_max), 0.0)
    total = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d < HD)


def num_splits(batch: int, heads: int, max_context: int, block_n: int = 32, num_sms: int = 132) -> int:
    """Splits per (sequence, head): about four programs per SM in all, at most one split per tile of context.

    Depends on the batch size, the head count and the model's context limit,
    not on any sequence's length.
    """
    want = triton.cdiv(4 * num_sms, batch * heads)
    return max(1, min(want, triton.cdiv(max_context, block_n), 64))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    splits: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence: q [B, H, D] -> [B, H, D] (into `out` if given).

    Equals `paged_attention_reference` with query_start_loc = 0..B (one
    query each); `splits` fixes the grid (see `num_splits`).
    """
    b, h, hd = q.shape
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    hd_pad = max(16, triton.next_power_of_2(hd))
    block_n = 32 if hd_pad <= 128 else 16
    part_out = torch.empty((b, h, splits, hd_pad), device=q.device, dtype=torch.float32)
    part_max = torch.empty((b, h, splits), device=q.device, dtype=torch.float32)
    part_sum = torch.empty((b, h, splits), device=q.device, dtype=torch.float32)
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(2) == 1
    _split_kernel[(b, h, splits)](
        q, k_cache, v_cache, part_out, part_max, part_sum, block_tables, context_lens, 1.0 / math.sqrt(hd),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        H=h, HD=hd, HD_PAD=hd_pad, PAGE=k_cache.shape[1], NUM_SPLITS=splits, BLOCK_N=block_n,
        num_warps=4 if hd_pad <= 128 else 8,
    )  # fmt: skip
    _combine_kernel[(b, h)](
        part_out, part_max, part_sum, out, out.stride(0), out.stride(1),
        H=h, HD=hd, HD_PAD=hd_pad, NUM_SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
    )  # fmt: skip
    return out
