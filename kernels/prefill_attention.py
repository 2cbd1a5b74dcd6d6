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
blocks: each row finds its own). Scores and the online softmax are float32,
the 1/sqrt(head_dim) scale applied to the float32 scores; probabilities are
cast to the model dtype for P @ V. head_dim is padded to a power of two with
masks (80 -> 128).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastcodegen.models.torch_ops import paged_attention as paged_attention_reference  # noqa: F401  (the reference)


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
    HD: tl.constexpr, HD_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    pid_m = tl.program_id(2)
    q_start = tl.load(QUERY_START + b)
    q_len = tl.load(QUERY_START + b + 1) - q_start
    if pid_m * BLOCK_M < q_len:
        ctx = tl.load(CONTEXT_LENS + b)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        qpos = ctx - q_len + offs_m  # [BLOCK_M] positions of the queries
        d = tl.arange(0, HD_PAD)
        d_ok = d < HD
        q = tl.load(
            Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + d[None, :],
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HD_PAD], dtype=tl.float32)
        # Keys past the block's last query position are never visible to it.
        kv_end = tl.minimum(ctx, ctx - q_len + (pid_m + 1) * BLOCK_M)
        for n0 in range(0, kv_end, BLOCK_N):
            kpos = n0 + tl.arange(0, BLOCK_N)
            k_ok = kpos < kv_end
            block = tl.load(BLOCK_TABLES + b * stride_bt + kpos // PAGE, mask=k_ok, other=0)
            row = block.to(tl.int64) * stride_cb + (kpos % PAGE) * stride_cs + h * stride_ch  # [BLOCK_N]
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(K_CACHE + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale  # [BLOCK_M, BLOCK_N] float32
            s = tl.where((kpos[None, :] <= qpos[:, None]) & k_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(V_CACHE + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            OUT + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + d[None, :],
            out.to(OUT.dtype.element_ty),
            mask=m_ok[:, None] & d_ok[None, :],
        )


def _blocks(head_dim_pad: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): smaller tiles where a 256-wide head strains registers."""
    if head_dim_pad >= 256:
        return 32, 32, 8
    return 64, 32, 4


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_context_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel with `paged_attention_reference`'s signature: q [T, H, D] -> [T, H, D] (into `out` if given)."""
    t, h, hd = q.shape
    num_seqs = context_lens.shape[0]
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(2) == 1
    if t == 0:
        return out
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    hd_pad = max(16, triton.next_power_of_2(hd))
    block_m, block_n, warps = _blocks(hd_pad)
    grid = (num_seqs, h, triton.cdiv(max_query_len, block_m))
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, context_lens, query_start_loc, 1.0 / math.sqrt(hd),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        HD=hd, HD_PAD=hd_pad, PAGE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps,
    )  # fmt: skip
    return out
