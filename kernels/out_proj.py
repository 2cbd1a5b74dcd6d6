"""Fused parallel-residual output: x + out_proj(attn) + fc_out(gelu_h) + fc_out.bias as one GEMM.

CodeGen's block adds the attention and MLP branches to the residual. out_proj
has no bias, so both projections are one GEMM over the concatenation
[attn | gelu_h] (K = d + f) with the weight [out_proj | fc_out] (`w_out`),
and the epilogue adds fc_out's bias and the residual. The two inputs are
read from their own buffers (no concatenated copy): the K loop runs over
attn's columns, then over gelu_h's.

Decode steps have a handful of rows and N = d columns: too few output tiles
to keep every SM busy while streaming the weight. With SPLIT_K > 1 each
program takes every SPLIT_K-th slice of K and writes a float32 partial sum;
a second kernel adds the partials in a fixed order (deterministic, no
atomics) and applies the epilogue.

Rounding follows the reference `fastcodegen.models.torch_ops.out_proj`: the
GEMM plus bias is rounded to the model dtype, then the residual is added.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcodegen.models.torch_ops import out_proj as out_proj_reference  # noqa: F401  (the reference)


@triton.jit
def _accumulate(acc, A, W, rows, row_ok, cols, col_ok, k_first, K, stride_am, stride_wn,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """acc += A[rows, k] @ W[cols, k]^T over the K slices k_first, k_first + SPLIT_K, ..."""
    for k0 in range(k_first * BLOCK_K, K, SPLIT_K * BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(A + rows[:, None] * stride_am + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _epilogue(acc, BIAS, RES, OUT, rows, row_ok, cols, col_ok, stride_rm, stride_om):
    mask = row_ok[:, None] & col_ok[None, :]
    dtype = OUT.dtype.element_ty
    y = (acc + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]).to(dtype).to(tl.float32)
    r = tl.load(RES + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :], (y + r).to(dtype), mask=mask)


@triton.jit
def _out_proj_kernel(
    A1,  # [M, K1] attention output, row stride stride_a1
    A2,  # [M, K2] gelu(fc_in(ln(x))), row stride stride_a2
    W,  # [N, K1 + K2] w_out = [out_proj | fc_out], row stride stride_wn
    BIAS,  # [N] fc_out bias
    RES,  # [M, N] residual, row stride stride_rm
    OUT,  # [M, N], row stride stride_om
    PARTIAL,  # [SPLIT_K, M, N] float32 partial sums (used when SPLIT_K > 1)
    M, N, K1, K2,
    stride_a1, stride_a2, stride_wn, stride_rm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _accumulate(acc, A1, W, rows, row_ok, cols, col_ok, split, K1, stride_a1, stride_wn,
                      BLOCK_K, SPLIT_K, DOT_PRECISION)  # fmt: skip
    acc = _accumulate(acc, A2, W + K1, rows, row_ok, cols, col_ok, split, K2, stride_a2, stride_wn,
                      BLOCK_K, SPLIT_K, DOT_PRECISION)  # fmt: skip
    if SPLIT_K == 1:
        _epilogue(acc, BIAS, RES, OUT, rows, row_ok, cols, col_ok, stride_rm, stride_om)
    else:
        ptr = PARTIAL + (split * M + rows)[:, None] * N + cols[None, :]
        tl.store(ptr, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _split_k_reduce_kernel(
    PARTIAL,  # [SPLIT_K, M, N] float32
    BIAS, RES, OUT,  # as in _out_proj_kernel
    M, N, stride_rm, stride_om,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):  # a fixed order: the same sum every run
        acc += tl.load(PARTIAL + (s * M + rows)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    _epilogue(acc, BIAS, RES, OUT, rows, row_ok, cols, col_ok, stride_rm, stride_om)


def _plan(m: int, n: int, k: int, num_sms: int = 132) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps). Split K when output tiles alone fill under two waves."""
    if m <= 16:
        block_m, block_n, block_k, warps = 16, 64, 128, 4
    elif m <= 64:
        block_m, block_n, block_k, warps = 32, 64, 64, 4
    else:
        block_m, block_n, block_k, warps = 64, 128, 32, 8
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = 1
    while tiles * split_k < 2 * num_sms and split_k < 16 and triton.cdiv(k, block_k) >= 4 * split_k:
        split_k *= 2
    return block_m, block_n, block_k, split_k, warps


def out_proj(
    a: torch.Tensor,
    g: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    residual: torch.Tensor,
    split_k: int | None = None,
    out: torch.Tensor | None = None,
    num_sms: int = 132,
) -> torch.Tensor:
    """The kernel with `out_proj_reference`'s signature: returns [T, d] (into `out` if given).

    `split_k` overrides the number of K splits planned for `num_sms` SMs.
    """
    m, k1 = a.shape
    k2 = g.shape[1]
    n = w_out.shape[0]
    assert w_out.shape[1] == k1 + k2 and a.stride(1) == g.stride(1) == w_out.stride(1) == residual.stride(1) == 1
    out = torch.empty((m, n), device=a.device, dtype=a.dtype) if out is None else out
    assert out.shape == (m, n) and out.stride(1) == 1
    block_m, block_n, block_k, planned, warps = _plan(m, n, k1 + k2, num_sms)
    split = planned if split_k is None else split_k
    partial = torch.empty((split, m, n), device=a.device, dtype=torch.float32) if split > 1 else out
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    _out_proj_kernel[grid](
        a, g, w_out, b_out, residual, out, partial, m, n, k1, k2,
        a.stride(0), g.stride(0), w_out.stride(0), residual.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=warps,
    )  # fmt: skip
    if split > 1:
        _split_k_reduce_kernel[(triton.cdiv(m, 16), triton.cdiv(n, 128))](
            partial, b_out, residual, out, m, n, residual.stride(0), out.stride(0),
            SPLIT_K=split, BLOCK_M=16, BLOCK_N=128,
        )  # fmt: skip
    return out
