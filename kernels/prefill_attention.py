"""Paged flash attention for prefill: ragged prompts, optionally after an already cached prefix.

Sequence b has query_len new tokens packed at query_start_loc[b] in q and
context_len tokens in the cache, the new ones included (their K/V were stored
by the input projection): query i sits at position context_len - query_len + i
and attends causally to every cached position up to its own. That one rule
covers plain prompts (context = query), prompts whose first part was cached
earlier (prefix reuse) and chunked prefill.

Grid: (sequences, heads, query blocks of the longest prompt); a program whose
block lies past its sequence's prompt does nothing. Keys and values are read
through the block table one BLOCK_N tile at a time (a tile may span cache
blocks: each row finds its own), K and V of a tile issued together on the
software pipeline, stages ahead: the sequence's block ids are read once,
before the loop. The tiles wholly
before the block's first query run without masks; only the diagonal ones
(and the context's end) are masked. Scores and the online softmax are
float32, the 1/sqrt(head_dim) scale applied to the float32 scores;
probabilities are cast to the model dtype for P @ V, as the reference
(`fastcodegen.models.torch_ops.paged_attention`) does. A head_dim that is
not a power of two is split into two that are (80 = 64 + 16), not padded
(`settings.head_dim_parts`); tiles, warps and pipeline depth by head size
are `settings.PrefillTiles`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import settings


@triton.jit
def _attend_tile(
    qa, qb, m_i, l_i, acc_a, acc_b,
    K_CACHE, V_CACHE, ids, h, n0, qpos, kv_end, sm_scale,
    stride_cb, stride_cs, stride_ch,
    HD_A: tl.constexpr, HD_B: tl.constexpr, HD_B_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One BLOCK_N tile of keys into the online softmax. MASKED: the tile holds the diagonal or the context end."""
    kpos = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        k_ok = kpos < kv_end
    # From the table row already in registers: the K and V loads depend on no load of their own iteration,
    # so the pipeline issues them stages ahead (a block id loaded in the loop would serialise it).
    block = tl.gather(ids, tl.minimum(kpos // PAGE, ids.shape[0] - 1), axis=0)
    row = block.to(tl.int64) * stride_cb + (kpos % PAGE) * stride_cs + h * stride_ch  # [BLOCK_N]
    da = tl.arange(0, HD_A)
    if MASKED:
        ka = tl.load(K_CACHE + row[:, None] + da[None, :], mask=k_ok[:, None], other=0.0)
        va = tl.load(V_CACHE + row[:, None] + da[None, :], mask=k_ok[:, None], other=0.0)
    else:
        ka = tl.load(K_CACHE + row[:, None] + da[None, :])
        va = tl.load(V_CACHE + row[:, None] + da[None, :])
    s = tl.dot(qa, tl.trans(ka), input_precision=DOT_PRECISION)
    if HD_B > 0:
        db = HD_A + tl.arange(0, HD_B_PAD)
        b_ok = db < HD_A + HD_B
        if MASKED:
            kb_mask = k_ok[:, None] & b_ok[None, :]
        else:
            kb_mask = b_ok[None, :]
        kb = tl.load(K_CACHE + row[:, None] + db[None, :], mask=kb_mask, other=0.0)
        vb = tl.load(V_CACHE + row[:, None] + db[None, :], mask=kb_mask, other=0.0)
        s = tl.dot(qb, tl.trans(kb), s, input_precision=DOT_PRECISION)
    s = s * sm_scale  # [BLOCK_M, BLOCK_N] float32
    if MASKED:
        s = tl.where((kpos[None, :] <= qpos[:, None]) & k_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(va.dtype)
    acc_a = acc_a * alpha[:, None] + tl.dot(p, va, input_precision=DOT_PRECISION)
    if HD_B > 0:
        acc_b = acc_b * alpha[:, None] + tl.dot(p, vb, input_precision=DOT_PRECISION)
    return m_new, l_i, acc_a, acc_b


@triton.jit
def _prefill_kernel(
    Q,  # [T, H, HD]: token stride stride_qt, head stride stride_qh, dims contiguous
    K_CACHE, V_CACHE,  # [num_blocks, PAGE, H, HD]: block stride stride_cb, slot stride stride_cs, head stride stride_ch
    OUT,  # [T, H, HD]: token stride stride_ot, head stride stride_oh
    BLOCK_TABLES,  # [B, max_blocks] int32, row stride stride_bt
    CONTEXT_LENS,  # [B] int32
    QUERY_START,  # [B + 1] int32
    sm_scale,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_ot, stride_oh, stride_bt,
    HD_A: tl.constexpr, HD_B: tl.constexpr,  # head dims as a power of two plus a smaller one (80 = 64 + 16) or 0
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TABLE_PAD: tl.constexpr,  # power of two >= the block table's width
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    pid_m = tl.program_id(2)
    q_start = tl.load(QUERY_START + b)
    q_len = tl.load(QUERY_START + b + 1) - q_start
    if pid_m * BLOCK_M < q_len:
        HD_B_PAD: tl.constexpr = 16 if HD_B <= 16 else HD_B
        ctx = tl.load(CONTEXT_LENS + b)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        qpos = ctx - q_len + offs_m  # [BLOCK_M] positions of the queries
        q_rows = Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh
        da = tl.arange(0, HD_A)
        qa = tl.load(q_rows + da[None, :], mask=m_ok[:, None], other=0.0)
        db = HD_A + tl.arange(0, HD_B_PAD)
        b_ok = db < HD_A + HD_B
        qb = tl.load(q_rows + db[None, :], mask=m_ok[:, None] & b_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_a = tl.zeros([BLOCK_M, HD_A], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, HD_B_PAD], dtype=tl.float32)
        slots = tl.arange(0, TABLE_PAD)
        ids = tl.load(BLOCK_TABLES + b * stride_bt + slots, mask=slots < tl.cdiv(ctx, PAGE), other=0)
        # Keys before the block's first query are visible to all its queries: whole tiles of them need no
        # mask. Past them, up to the block's last query position, the tiles on the diagonal are masked.
        full_end = ((ctx - q_len + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
        kv_end = tl.minimum(ctx, ctx - q_len + (pid_m + 1) * BLOCK_M)
        for n0 in range(0, full_end, BLOCK_N):
            m_i, l_i, acc_a, acc_b = _attend_tile(
                qa, qb, m_i, l_i, acc_a, acc_b, K_CACHE, V_CACHE, ids, h, n0, qpos, kv_end, sm_scale,
                stride_cb, stride_cs, stride_ch, HD_A, HD_B, HD_B_PAD, PAGE, BLOCK_N, False, DOT_PRECISION,
            )  # fmt: skip
        for n0 in range(full_end, kv_end, BLOCK_N):
            m_i, l_i, acc_a, acc_b = _attend_tile(
                qa, qb, m_i, l_i, acc_a, acc_b, K_CACHE, V_CACHE, ids, h, n0, qpos, kv_end, sm_scale,
                stride_cb, stride_cs, stride_ch, HD_A, HD_B, HD_B_PAD, PAGE, BLOCK_N, True, DOT_PRECISION,
            )  # fmt: skip
        out_rows = OUT + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh
        dtype = OUT.dtype.element_ty
        tl.store(out_rows + da[None, :], (acc_a / l_i[:, None]).to(dtype), mask=m_ok[:, None])
        if HD_B > 0:
            tl.store(out_rows + db[None, :], (acc_b / l_i[:, None]).to(dtype), mask=m_ok[:, None] & b_ok[None, :])


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
    """`torch_ops.paged_attention`'s arguments and result: q [T, H, D] -> [T, H, D].

    `max_context_len` is not used: the kernel reads each sequence's length from `context_lens`.
    """
    t, h, hd = q.shape
    num_seqs = context_lens.shape[0]
    out = torch.empty_like(q)
    if t == 0:
        return out
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    hd_a, hd_b = settings.head_dim_parts(hd)
    tiles = settings.PrefillTiles.of(hd)
    grid = (num_seqs, h, triton.cdiv(max_query_len, tiles.block_m))
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, context_lens, query_start_loc, 1.0 / math.sqrt(hd),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        HD_A=hd_a, HD_B=hd_b, PAGE=k_cache.shape[1], BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        DOT_PRECISION=settings.dot_precision(q.dtype), TABLE_PAD=triton.next_power_of_2(block_tables.shape[1]),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return out
