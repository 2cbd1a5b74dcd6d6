"""Paged attention for decode steps: split-K ("flash decoding") in two kernels.

One new token per sequence attends to its whole cached context. With a
batch of one and a long context, one program per (sequence, head) would
leave most of the GPU idle, so the context is cut into NUM_SPLITS parts: the
first kernel computes, per (sequence, head, split), the partial softmax
statistics (max and sum of exp) and the unnormalised output of its part; the
second combines the splits.

The grid is (batch, heads, NUM_SPLITS). `settings.num_splits` picks the
fewest splits whose programs fill the SMs' resident slots in whole waves,
from the batch size, the geometry and the engine's context limit
(`max_model_len`), never from the sequences' lengths, which are read from
device memory: a captured CUDA graph stays valid for any lengths. Each
program streams 32-64 keys per tile (`settings.DecodeTiles`), K and V
together, through a software pipeline (`num_stages`); the sequence's block
ids are read once, before the loop. A sequence with context length 0 (a
padding row of a graph's batch) gets a zero output.

Numerics follow the reference, `fastcodegen.models.torch_ops.decode_attention`:
scores and softmax in float32, scale on the float32 scores, probabilities
rounded to the model dtype before P @ V, as in prefill.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import settings


@triton.jit
def _kv_tile(
    K_CACHE, V_CACHE, ids, h, n0, end, stride_cb, stride_cs, stride_ch,
    HD: tl.constexpr, HD_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, TABLE_PAD: tl.constexpr,
):  # fmt: skip
    """Head h's keys and values at positions n0 .. n0 + BLOCK_N of a sequence whose block ids are `ids` (read
    before the loop), zeros from `end` on: (kpos, k_ok [BLOCK_N], k, v [BLOCK_N, HD_PAD])."""
    kpos = n0 + tl.arange(0, BLOCK_N)
    k_ok = kpos < end
    d = tl.arange(0, HD_PAD)
    block = tl.gather(ids, tl.minimum(kpos // PAGE, TABLE_PAD - 1), axis=0)
    row = block.to(tl.int64) * stride_cb + (kpos % PAGE) * stride_cs + h * stride_ch  # [BLOCK_N]
    kv_mask = k_ok[:, None] & (d < HD)[None, :]
    k = tl.load(K_CACHE + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V_CACHE + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
    return kpos, k_ok, k, v


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
    NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TABLE_PAD: tl.constexpr,  # power of two >= the block table's width
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
    # The query is row 0 of a 16-row operand (the smallest tl.dot takes; the other rows are zeros): as a dot,
    # the K and V tiles go through shared memory on the software pipeline (cp.async, num_stages deep),
    # their loads issued stages ahead of the math. The block ids are read once, before the loop, so that no
    # K or V load waits on a load of its own iteration (which would serialise the pipeline).
    r = tl.arange(0, 16)
    q = tl.load(Q + b * stride_qb + h * stride_qh + r[:, None] * 0 + d[None, :], mask=(r[:, None] == 0) & d_ok[None, :],
                other=0.0)  # fmt: skip
    m_i = tl.full([16], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([16], dtype=tl.float32)
    acc = tl.zeros([16, HD_PAD], dtype=tl.float32)
    slots = tl.arange(0, TABLE_PAD)
    ids = tl.load(BLOCK_TABLES + b * stride_bt + slots, mask=slots < tl.cdiv(ctx, PAGE), other=0)
    for n0 in range(start, end, BLOCK_N):
        kpos, k_ok, k, v = _kv_tile(
            K_CACHE, V_CACHE, ids, h, n0, end, stride_cb, stride_cs, stride_ch, HD, HD_PAD, PAGE, BLOCK_N, TABLE_PAD
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale  # [16, BLOCK_N] float32
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    part = (b * H + h) * NUM_SPLITS + split
    row0 = r == 0
    tl.store(PART_OUT + part * HD_PAD + r[:, None] * 0 + d[None, :], acc, mask=row0[:, None])
    tl.store(PART_MAX + part + r * 0, m_i, mask=row0)
    tl.store(PART_SUM + part + r * 0, l_i, mask=row0)


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


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    max_model_len: int | None = None,
    num_sms: int = settings.DEFAULT_NUM_SMS,
    splits: int | None = None,
) -> torch.Tensor:
    """`torch_ops.decode_attention`'s arguments and result, then launch options: q [B, H, D] -> [B, H, D].

    One new token per sequence: equals `torch_ops.paged_attention` with
    query_start_loc = 0..B (one query each); a row with context length 0
    gets zeros. The grid never depends on the sequences' lengths (read from
    device memory: `max_context_len` is not used), so a captured CUDA graph
    stays valid: its split count is `splits` when given, else
    `settings.num_splits` for B rows on `num_sms` SMs under the context
    limit `max_model_len` (by default, the context the block tables address).
    """
    b, h, hd = q.shape
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    if splits is None:
        limit = block_tables.shape[1] * k_cache.shape[1] if max_model_len is None else max_model_len
        splits = settings.num_splits(b, h, limit, hd, q.element_size(), num_sms)
    hd_pad = settings.decode_head_dim_pad(hd)
    tiles = settings.DecodeTiles.of(hd_pad)
    part_out = torch.empty((b, h, splits, hd_pad), device=q.device, dtype=torch.float32)
    part_max = torch.empty((b, h, splits), device=q.device, dtype=torch.float32)
    part_sum = torch.empty((b, h, splits), device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    _split_kernel[(b, h, splits)](
        q, k_cache, v_cache, part_out, part_max, part_sum, block_tables, context_lens, 1.0 / math.sqrt(hd),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        H=h, HD=hd, HD_PAD=hd_pad, PAGE=k_cache.shape[1], NUM_SPLITS=splits, BLOCK_N=tiles.block_n,
        DOT_PRECISION=settings.dot_precision(q.dtype), TABLE_PAD=triton.next_power_of_2(block_tables.shape[1]),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    _combine_kernel[(b, h)](
        part_out, part_max, part_sum, out, out.stride(0), out.stride(1),
        H=h, HD=hd, HD_PAD=hd_pad, NUM_SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
    )  # fmt: skip
    return out
