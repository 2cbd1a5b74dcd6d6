"""LayerNorm of each row, once per step: ln_1(x) for the input projection.

One program per row holds the whole row in registers (d <= 16384), so the
statistics take one read of x: mean first, then the variance of the centred
values (the two-pass formula, exact as F.layer_norm's), float32 throughout,
and ln(x) is written in the model dtype: the operand the projection's GEMM
reads, rounded where the reference rounds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_WIDTH = 16384


@triton.jit
def _layer_norm_kernel(
    X,  # [M, K], row stride stride_xm
    W, B,  # [K] weight and bias
    OUT,  # [M, K] model dtype, row stride stride_om
    K, eps,
    stride_xm, stride_om,
    BLOCK_K: tl.constexpr,  # next power of two >= K
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    x = tl.load(X + row * stride_xm + ks, mask=k_ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / K
    centred = tl.where(k_ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / K + eps)
    w = tl.load(W + ks, mask=k_ok, other=0.0).to(tl.float32)
    b = tl.load(B + ks, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_om + ks, (centred * rstd * w + b).to(OUT.dtype.element_ty), mask=k_ok)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """F.layer_norm(x, (K,), weight, bias, eps) for x [M, K], in x's dtype."""
    m, k = x.shape
    if k > MAX_WIDTH:
        raise ValueError(f"layer_norm: rows of {k} values are wider than the kernel's {MAX_WIDTH}")
    assert x.stride(1) == 1 and weight.shape == bias.shape == (k,)
    out = torch.empty_like(x)
    if m == 0:
        return out
    block_k = triton.next_power_of_2(k)
    _layer_norm_kernel[(m,)](
        x, weight, bias, out, k, eps, x.stride(0), out.stride(0),
        BLOCK_K=block_k, num_warps=min(16, max(4, block_k // 1024)),
    )  # fmt: skip
    return out
