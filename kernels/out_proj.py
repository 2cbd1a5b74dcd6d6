"""Fused parallel-residual output: x + out_proj(attn) + fc_out(gelu_h) + fc_out.bias as one GEMM.

CodeGen's block adds the attention and MLP branches to the residual. out_proj
has no bias, so both projections are one GEMM over the concatenation
[attn | gelu_h] (K = d + f) with the weight [out_proj | fc_out] (`w_out`),
and the epilogue adds fc_out's bias and the residual. The two inputs are
read from their own buffers (no concatenated copy): the K loop runs over
attn's columns, then over gelu_h's.

Decode steps have a handful of rows and N = d columns: too few output tiles
to keep every SM busy while streaming the weight. `settings.gemm_plan` then
splits K; the last program of each tile adds the float32 partials in a fixed
order (deterministic, no float atomics) and applies the epilogue, in the
same launch (`split_k.py`). Prefill steps load their operand tiles
through TMA (`tma.py`). In Triton's interpreter (the CPU) the launch takes
`settings.interpreter_plan`, the fewest programs, and no TMA: the
interpreter runs each program in Python.

Rounding follows the reference, `fastcodegen.models.torch_ops.out_proj`,
which the kernel tests compare it against: the GEMM plus bias is rounded to
the model dtype, then the residual is added. Tiles and K splits come from
`settings.projection_plan`, as in_proj's do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import settings, tma
from .split_k import reduce_split_k
from .split_k import scratch as split_k_scratch


@triton.jit
def _accumulate(acc, A, W, rows, row_ok, cols, col_ok, k_first, K, stride_am, stride_wn,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr):  # fmt: skip
    """acc += A[rows, k] @ W[cols, k]^T over the K slices k_first, k_first + SPLIT_K, ..."""
    a_ptr = A + rows[:, None].to(tl.int64) * stride_am
    w_ptr = W + cols[None, :] * stride_wn
    for k0 in range(k_first * BLOCK_K, K, SPLIT_K * BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(a_ptr + ks[None, :], mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptr + ks[:, None], mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < K
            a = tl.load(a_ptr + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _accumulate_tma(acc, A_DESC, W_DESC, row0, col0, k_first, K, w_k0,
                    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """`_accumulate` with both tiles copied by TMA (zeros past the edges); W's K starts at column w_k0."""
    for k0 in range(k_first * BLOCK_K, K, SPLIT_K * BLOCK_K):
        a = A_DESC.load([row0, k0])
        w = W_DESC.load([col0, w_k0 + k0])
        acc = tl.dot(a, w.T, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _out_proj_kernel(
    A1,  # [M, K1] attention output, row stride stride_a1
    A2,  # [M, K2] gelu(fc_in(ln(x))), row stride stride_a2
    W,  # [N, K1 + K2] w_out = [out_proj | fc_out], row stride stride_wn
    BIAS,  # [N] fc_out bias
    RES,  # [M, N] residual, row stride stride_rm
    OUT,  # [M, N], row stride stride_om
    PARTIAL, COUNTERS,  # split-K scratch (split_k.py); unused when SPLIT_K == 1
    A1_DESC, A2_DESC, W_DESC,  # TMA descriptors of A1, A2 ([BLOCK_M, BLOCK_K] tiles), W ([BLOCK_N, BLOCK_K]); or None
    M, N, K1, K2,
    stride_a1, stride_a2, stride_wn, stride_rm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K1 and K2 are multiples of BLOCK_K * SPLIT_K: no K masks
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # load the operand tiles through the descriptors (tma.py)
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if USE_TMA:
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = _accumulate_tma(acc, A1_DESC, W_DESC, row0, col0, split, K1, 0, BLOCK_K, SPLIT_K, DOT_PRECISION)
        acc = _accumulate_tma(acc, A2_DESC, W_DESC, row0, col0, split, K2, K1, BLOCK_K, SPLIT_K, DOT_PRECISION)
    else:
        acc = _accumulate(acc, A1, W, rows, row_ok, cols, col_ok, split, K1, stride_a1, stride_wn,
                          BLOCK_K, SPLIT_K, EVEN_K, DOT_PRECISION)  # fmt: skip
        acc = _accumulate(acc, A2, W + K1, rows, row_ok, cols, col_ok, split, K2, stride_a2, stride_wn,
                          BLOCK_K, SPLIT_K, EVEN_K, DOT_PRECISION)  # fmt: skip
    last = True
    if SPLIT_K > 1:
        tile = pid_m * tl.num_programs(1) + pid_n
        acc, last = reduce_split_k(acc, PARTIAL, COUNTERS, tile, split, mask, BLOCK_M, BLOCK_N, SPLIT_K)
    if last:
        dtype = OUT.dtype.element_ty
        y = (acc + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]).to(dtype).to(tl.float32)
        r = tl.load(RES + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + rows[:, None] * stride_om + cols[None, :], (y + r).to(dtype), mask=mask)


def out_proj(
    a: torch.Tensor,
    g: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    residual: torch.Tensor,
    split_k: int | None = None,
    counters: torch.Tensor | None = None,
    num_sms: int = settings.DEFAULT_NUM_SMS,
    interpreted: bool = False,
) -> torch.Tensor:
    """`torch_ops.out_proj`'s arguments and result ([T, d]), then launch options.

    The plan is `settings.projection_plan`'s for `num_sms` SMs (or Triton's
    interpreter); `split_k` overrides its number of K splits; `counters` is
    split-K's zeroed arrival counters, kept between launches (`split_k.py`).
    """
    m, k1 = a.shape
    k2 = g.shape[1]
    n = w_out.shape[0]
    assert w_out.shape[1] == k1 + k2 and a.stride(1) == g.stride(1) == w_out.stride(1) == residual.stride(1) == 1
    out = torch.empty((m, n), device=a.device, dtype=a.dtype)
    if m == 0:
        return out
    plan = settings.projection_plan(m, k1 + k2, 0, n, a.element_size(), num_sms, interpreted, split_k)
    grid = (triton.cdiv(m, plan.block_m), triton.cdiv(n, plan.block_n), plan.split_k)
    partial, counters = split_k_scratch(grid[0] * grid[1], plan, a.device, counters)
    step = plan.block_k * plan.split_k
    use_tma = not interpreted and tma.usable(plan, m, a, g, w_out)
    descs = (None, None, None)
    if use_tma:
        bm, bn, bk = plan.block_m, plan.block_n, plan.block_k
        descs = (tma.descriptor(a, bm, bk), tma.descriptor(g, bm, bk), tma.descriptor(w_out, bn, bk))
    _out_proj_kernel[grid](
        a, g, w_out, b_out, residual, out, partial, counters, *descs, m, n, k1, k2,
        a.stride(0), g.stride(0), w_out.stride(0), residual.stride(0), out.stride(0),
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, SPLIT_K=plan.split_k,
        EVEN_K=k1 % step == 0 and k2 % step == 0, DOT_PRECISION=settings.dot_precision(a.dtype), USE_TMA=use_tma,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )  # fmt: skip
    return out
