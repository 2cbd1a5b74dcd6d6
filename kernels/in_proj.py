"""Fused input projection: LayerNorm -> [q|k|v|fc_in] GEMM -> rotary, paged K/V store, bias + gelu_new.

One pass over ln(x) serves the attention and the MLP (CodeGen's parallel
residual feeds both from the same LayerNorm), so the GEMM has N = 3d + f
(7d) columns. Rows of `w_in` follow `InProjLayout`: [Q1 | K1 | Q2 | K2 | QP |
KP | V | M]. The grid has two kinds of column tiles:

* rotary tiles over Q1|K1: each also multiplies the partner rows (Q2|K2, a
  fixed `rotary_partner` columns further), so the pair (x[i], x[i + r]) of
  every head is in registers together and rotary is elementwise;
* plain tiles over QP|KP|V|M: q pass-through dims, k and v straight into the
  paged cache, fc_in's bias and gelu_new.

Each program first computes its rows' LayerNorm statistics (float32), then
normalises x tiles on the fly as it loads them: ln(x) is never written out.
Keys and values go to the cache slot of their token (`slot_mapping`; -1
writes nothing, which makes padded rows free).

Numerics match `fastcodegen.models.torch_ops.in_proj` (the reference below):
the projection is rounded to the model dtype, then rotated in float32 with
the same cos/sin table; gelu in float32 on the rounded pre-activation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcodegen.models.torch_ops import in_proj as in_proj_reference  # noqa: F401  (the reference)
from fastcodegen.weights import InProjLayout


@triton.jit
def _gelu_new(x):
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(y) = 1 - 2 / (exp(2y) + 1):
    # exact at both ends; y is capped at 15, where tanh is 1 in float32, so exp never overflows.
    y = tl.minimum(0.7978845608028654 * (x + 0.044715 * x * x * x), 15.0)
    return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))


@triton.jit
def _ln_tile(X, LN_W, LN_B, rows, row_ok, mean, rstd, k0, K, stride_xm, BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """ln(x)[rows, k0:k0+BLOCK_K] in the model dtype, zero outside the matrix."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    mask = row_ok[:, None] & k_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(LN_W + ks, mask=k_ok, other=0.0).to(tl.float32)
    b = tl.load(LN_B + ks, mask=k_ok, other=0.0).to(tl.float32)
    xn = (x - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
    return tl.where(mask, xn, 0.0).to(OUT_DTYPE)


@triton.jit
def _w_tile(W, cols, col_ok, k0, K, stride_wn, BLOCK_K: tl.constexpr):
    """w_in[cols, k0:k0+BLOCK_K] as a [BLOCK_K, BLOCK_N] operand."""
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(W + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & (ks < K)[:, None], other=0.0)


@triton.jit
def _in_proj_kernel(
    X,  # [M, K] hidden states, row stride stride_xm
    LN_W, LN_B,  # [K] ln_1 weight and bias
    W,  # [N, K] w_in in InProjLayout order, row stride stride_wn; N = 3K + F
    BIAS,  # [N] b_in
    POS,  # [M] int64 token positions
    SLOTS,  # [M] int64 KV cache slot of each token; -1: store nothing
    COS, SIN,  # [max_positions, HALF] float32
    Q_OUT,  # [M, H * HD] rotated q, row stride stride_qm
    G_OUT,  # [M, F] gelu(fc_in(ln(x))), row stride stride_gm
    K_CACHE, V_CACHE,  # [slots, H, HD]: slot stride stride_cs, head stride stride_ch, dims contiguous
    M, K, eps,
    stride_xm, stride_wn, stride_qm, stride_gm, stride_cs, stride_ch,
    H: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr, F: tl.constexpr,
    ROT_TILES: tl.constexpr,  # column tiles over Q1|K1; the rest are plain tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dtype = Q_OUT.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M

    # LayerNorm statistics of this tile's rows (two passes: exact mean, then variance).
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), axis=1)
    mean = total / K
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks < K)[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, x - mean[:, None], 0.0)
        total += tl.sum(centred * centred, axis=1)
    rstd = 1.0 / tl.sqrt(total / K + eps)

    slot = tl.load(SLOTS + rows, mask=row_ok, other=-1)
    store_row = row_ok & (slot >= 0)
    ROT_WIDTH: tl.constexpr = H * HALF  # columns of Q1 (and of K1)
    PARTNER: tl.constexpr = 2 * ROT_WIDTH  # Q1|K1 column c pairs with column c + PARTNER

    if pid_n < ROT_TILES:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # in Q1|K1
        col_ok = cols < PARTNER
        acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = _ln_tile(X, LN_W, LN_B, rows, row_ok, mean, rstd, k0, K, stride_xm, BLOCK_K, dtype)
            acc1 = tl.dot(a, _w_tile(W, cols, col_ok, k0, K, stride_wn, BLOCK_K), acc1, input_precision=DOT_PRECISION)
            acc2 = tl.dot(
                a, _w_tile(W, cols + PARTNER, col_ok, k0, K, stride_wn, BLOCK_K), acc2, input_precision=DOT_PRECISION
            )
        acc1 += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(BIAS + cols + PARTNER, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        x1 = acc1.to(dtype).to(tl.float32)
        x2 = acc2.to(dtype).to(tl.float32)

        is_k = cols >= ROT_WIDTH
        idx = tl.where(is_k, cols - ROT_WIDTH, cols)
        head = idx // HALF
        j = idx % HALF
        pos = tl.load(POS + rows, mask=row_ok, other=0)
        tab = pos[:, None] * HALF + j[None, :]
        tab_ok = row_ok[:, None] & col_ok[None, :]
        cos = tl.load(COS + tab, mask=tab_ok, other=0.0)
        sin = tl.load(SIN + tab, mask=tab_ok, other=0.0)
        out1 = (x1 * cos - x2 * sin).to(dtype)
        out2 = (x2 * cos + x1 * sin).to(dtype)

        dim = head * HD + j
        q_mask = row_ok[:, None] & (col_ok & ~is_k)[None, :]
        q_ptr = Q_OUT + rows[:, None] * stride_qm + dim[None, :]
        tl.store(q_ptr, out1, mask=q_mask)
        tl.store(q_ptr + HALF, out2, mask=q_mask)
        k_mask = store_row[:, None] & (col_ok & is_k)[None, :]
        k_ptr = K_CACHE + slot[:, None] * stride_cs + (head * stride_ch + j)[None, :]
        tl.store(k_ptr, out1, mask=k_mask)
        tl.store(k_ptr + HALF, out2, mask=k_mask)
    else:
        QP: tl.constexpr = 2 * PARTNER  # start of the plain columns
        KP: tl.constexpr = QP + H * PASS
        V0: tl.constexpr = KP + H * PASS
        M0: tl.constexpr = V0 + H * HD
        cols = QP + (pid_n - ROT_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < M0 + F
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = _ln_tile(X, LN_W, LN_B, rows, row_ok, mean, rstd, k0, K, stride_xm, BLOCK_K, dtype)
            acc = tl.dot(a, _w_tile(W, cols, col_ok, k0, K, stride_wn, BLOCK_K), acc, input_precision=DOT_PRECISION)
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = acc.to(dtype)

        if PASS > 0:
            in_qp = cols < KP
            in_kp = (cols >= KP) & (cols < V0)
            idx = tl.where(in_qp, cols - QP, cols - KP)
            dim = (idx // PASS) * HD + 2 * HALF + idx % PASS  # head, then past the rotary dims
            tl.store(Q_OUT + rows[:, None] * stride_qm + dim[None, :], y, mask=row_ok[:, None] & in_qp[None, :])
            k_ptr = K_CACHE + slot[:, None] * stride_cs + ((idx // PASS) * stride_ch + 2 * HALF + idx % PASS)[None, :]
            tl.store(k_ptr, y, mask=store_row[:, None] & in_kp[None, :])
        in_v = (cols >= V0) & (cols < M0)
        idx = cols - V0
        v_ptr = V_CACHE + slot[:, None] * stride_cs + ((idx // HD) * stride_ch + idx % HD)[None, :]
        tl.store(v_ptr, y, mask=store_row[:, None] & in_v[None, :])
        in_m = (cols >= M0) & col_ok
        g = _gelu_new(y.to(tl.float32)).to(dtype)
        tl.store(G_OUT + rows[:, None] * stride_gm + (cols - M0)[None, :], g, mask=row_ok[:, None] & in_m[None, :])


def _blocks(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by the number of rows: decode steps have few."""
    if m <= 16:
        return 16, 64, 128, 4
    if m <= 64:
        return 32, 64, 64, 4
    return 64, 128, 32, 8


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
    q_out: torch.Tensor | None = None,
    g_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel with `in_proj_reference`'s signature and results: (q [T, d], g [T, f]); writes k, v to the caches.

    q_out [T, d] and g_out [T, f], when given, receive the results (persistent buffers).
    """
    m, k = x.shape
    h, hd, half, f = layout.n_head, layout.head_dim, layout.half, layout.n_inner
    assert w_in.shape == (layout.width, k) and w_in.stride(1) == 1 and x.stride(1) == 1
    assert k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1)  # slot = block * block_size + offset
    q = torch.empty((m, h * hd), device=x.device, dtype=x.dtype) if q_out is None else q_out
    g = torch.empty((m, f), device=x.device, dtype=x.dtype) if g_out is None else g_out
    assert q.shape == (m, h * hd) and g.shape == (m, f) and q.stride(1) == g.stride(1) == 1
    block_m, block_n, block_k, warps = _blocks(m)
    rot_tiles = triton.cdiv(2 * layout.rotary_width, block_n)
    plain_tiles = triton.cdiv(layout.width - 2 * layout.rotary_partner, block_n)
    grid = (triton.cdiv(m, block_m), rot_tiles + plain_tiles)
    _in_proj_kernel[grid](
        x, ln_weight, ln_bias, w_in, b_in, positions, slot_mapping, cos, sin, q, g, k_cache, v_cache,
        m, k, eps,
        x.stride(0), w_in.stride(0), q.stride(0), g.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=h, HD=hd, HALF=half, PASS=layout.pass_dim, F=f, ROT_TILES=rot_tiles,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=warps,
    )  # fmt: skip
    return q, g
