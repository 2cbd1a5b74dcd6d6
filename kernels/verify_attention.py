"""Paged attention for steps of a few new tokens per sequence (speculative decoding's verify steps): split-K.

A verify step gives each speculating sequence its last token and k proposals,
k + 1 queries at the end of a long cached context. The prefill kernel would
run one program per (sequence, head) over the whole context: at batch 1 a
few dozen programs on a hundred-odd SMs. This kernel splits the context like
the decode kernel (`decode_attention.py`) and carries up to MAX_QUERIES
queries of a sequence as the rows of the 16-row operand the decode kernel
already multiplies (there, row 0 is the one query and the rest zeros), so the
sequence's K and V are read once per split for all its queries.

Sequence b has query_len = QUERY_START[b+1] - QUERY_START[b] new tokens
(0 to MAX_QUERIES; a graph's padding row has none), and query i sits at
position context_len - query_len + i and sees the keys up to its own (causal).
The first kernel writes, per (token, head, split), the partial softmax
statistics and unnormalised output of its part of the context; the decode
kernel's combine (`decode_attention._combine_kernel`) runs over tokens instead
of sequences. Tokens that belong to
no sequence (a graph's padding tokens) get no partials: their output is
undefined and never read.

The grid is (sequences, heads, NUM_SPLITS), the splits planned as for decode
from the number of sequences, the geometry and the context limit
(`settings.num_splits`), never from lengths or query counts, so a captured
CUDA graph serves any step of as many sequences. Numerics are the
reference's (`fastcodegen.models.torch_ops.paged_attention`): float32 scores
and softmax, the scale on the float32 scores, probabilities rounded to the
model dtype before P @ V.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import decode_attention, settings
from .decode_attention import _kv_tile

# Queries per sequence: the rows of the smallest tl.dot operand, which decode already pays for.
MAX_QUERIES = 16


@triton.jit
def _verify_split_kernel(
    Q,  # [T, H, HD]: token stride stride_qt, head stride stride_qh, dims contiguous
    K_CACHE, V_CACHE,  # [num_blocks, PAGE, H, HD]: block, slot and head strides stride_cb, stride_cs, stride_ch
    PART_OUT,  # [T, H, NUM_SPLITS, HD_PAD] float32, contiguous
    PART_MAX, PART_SUM,  # [T, H, NUM_SPLITS] float32, contiguous
    BLOCK_TABLES,  # [B, max_blocks] int32, row stride stride_bt
    CONTEXT_LENS,  # [B] int32
    QUERY_START,  # [B + 1] int32
    sm_scale,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
    H: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr, PAGE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, QUERIES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TABLE_PAD: tl.constexpr,  # power of two >= the block table's width
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(QUERY_START + b)
    q_len = tl.load(QUERY_START + b + 1) - q_start
    ctx = tl.load(CONTEXT_LENS + b)
    # Each split takes a whole number of BLOCK_N tiles.
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)
    d = tl.arange(0, HD_PAD)
    d_ok = d < HD
    r = tl.arange(0, QUERIES)
    r_ok = r < q_len
    qpos = ctx - q_len + r  # [QUERIES] each query's position: it sees keys up to it
    q = tl.load(Q + (q_start + r)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    m_i = tl.full([QUERIES], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([QUERIES], dtype=tl.float32)
    acc = tl.zeros([QUERIES, HD_PAD], dtype=tl.float32)
    slots = tl.arange(0, TABLE_PAD)
    # The block ids are read once, before the loop, so that no K or V load waits on a load of its iteration.
    ids = tl.load(BLOCK_TABLES + b * stride_bt + slots, mask=slots < tl.cdiv(ctx, PAGE), other=0)
    for n0 in range(start, end, BLOCK_N):
        kpos, k_ok, k, v = _kv_tile(
            K_CACHE, V_CACHE, ids, h, n0, end, stride_cb, stride_cs, stride_ch, HD, HD_PAD, PAGE, BLOCK_N, TABLE_PAD
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale  # [QUERIES, BLOCK_N] float32
        s = tl.where(k_ok[None, :] & (kpos[None, :] <= qpos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A query that has seen no key yet (all masked so far) keeps m = -inf: a finite stand-in keeps
        # exp's argument a number (-inf - -inf would be NaN) and gives its row weight 0.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    part = ((q_start + r) * H + h) * NUM_SPLITS + split  # [QUERIES]
    tl.store(PART_OUT + part[:, None] * HD_PAD + d[None, :], acc, mask=r_ok[:, None])
    tl.store(PART_MAX + part, m_i, mask=r_ok)
    tl.store(PART_SUM + part, l_i, mask=r_ok)


def verify_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_context_len: int,
    max_model_len: int | None = None,
    num_sms: int = settings.DEFAULT_NUM_SMS,
    splits: int | None = None,
) -> torch.Tensor:
    """`torch_ops.paged_attention`'s arguments and result for steps of at most MAX_QUERIES new tokens per
    sequence, then decode's launch options: q [T, H, D] -> [T, H, D].

    `max_query_len` is checked against MAX_QUERIES; `max_context_len` is not
    used (lengths are read from device memory). The split count is `splits`
    when given, else `settings.num_splits` for the number of sequences on
    `num_sms` SMs under the context limit `max_model_len` (by default, the
    context the block tables address).
    """
    if max_query_len > MAX_QUERIES:
        raise ValueError(f"verify_attention takes at most {MAX_QUERIES} new tokens a sequence, got {max_query_len}")
    t, h, hd = q.shape
    num_seqs = context_lens.shape[0]
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    if splits is None:
        limit = block_tables.shape[1] * k_cache.shape[1] if max_model_len is None else max_model_len
        splits = settings.num_splits(num_seqs, h, limit, hd, q.element_size(), num_sms)
    hd_pad = settings.decode_head_dim_pad(hd)
    tiles = settings.DecodeTiles.of(hd_pad)
    out = torch.empty_like(q)
    if t == 0 or num_seqs == 0:
        return out
    part_out = torch.empty((t, h, splits, hd_pad), device=q.device, dtype=torch.float32)
    part_max = torch.empty((t, h, splits), device=q.device, dtype=torch.float32)
    part_sum = torch.empty((t, h, splits), device=q.device, dtype=torch.float32)
    _verify_split_kernel[(num_seqs, h, splits)](
        q, k_cache, v_cache, part_out, part_max, part_sum, block_tables, context_lens, query_start_loc,
        1.0 / math.sqrt(hd),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        H=h, HD=hd, HD_PAD=hd_pad, PAGE=k_cache.shape[1], NUM_SPLITS=splits, BLOCK_N=tiles.block_n,
        QUERIES=MAX_QUERIES, DOT_PRECISION=settings.dot_precision(q.dtype),
        TABLE_PAD=triton.next_power_of_2(block_tables.shape[1]), num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )  # fmt: skip
    decode_attention._combine_kernel[(t, h)](
        part_out, part_max, part_sum, out, out.stride(0), out.stride(1),
        H=h, HD=hd, HD_PAD=hd_pad, NUM_SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
    )  # fmt: skip
    return out
