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

LayerNorm runs first, once per step (`layer_norm.py` writes ln_1(x) in the
model dtype), so the projection is a pure GEMM whose epilogue does the rest;
recomputing the row statistics in every column tile would read x once per
tile and stall each tile's main loop. The launch's tiles and K splits are
`settings.projection_plan`'s: decode steps split K (`split_k.py`) when the
column tiles alone would leave SMs idle (`settings.gemm_plan`); in Triton's
interpreter, the fewest programs (`settings.interpreter_plan`). Prefill
steps load their operand tiles through TMA (`tma.py`).
Keys and values go to the cache slot of their token (`slot_mapping`; -1
writes nothing, which makes padded rows free).

Numerics match the reference, `fastcodegen.models.torch_ops.in_proj`, which
the kernel tests compare it against: the projection is rounded to the model
dtype, then rotated in float32 with the same cos/sin table; gelu in float32
on the rounded pre-activation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcodegen.weights import InProjLayout

from . import settings, tma
from .layer_norm import layer_norm
from .split_k import reduce_split_k
from .split_k import scratch as split_k_scratch


@triton.jit
def _gelu_new(x):
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(y) = 1 - 2 / (exp(2y) + 1):
    # exact at both ends; y is capped at 15, where tanh is 1 in float32, so exp never overflows.
    y = tl.minimum(0.7978845608028654 * (x + 0.044715 * x * x * x), 15.0)
    return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))


@triton.jit
def _w_tile(W, cols, col_ok, ks, k_ok, stride_wn, EVEN_K: tl.constexpr):
    """w_in[cols, ks] as a [BLOCK_K, BLOCK_N] operand."""
    if EVEN_K:
        mask = col_ok[None, :]
    else:
        mask = col_ok[None, :] & k_ok[:, None]
    return tl.load(W + cols[None, :] * stride_wn + ks[:, None], mask=mask, other=0.0)


@triton.jit
def _rotary_tile(
    LN_X, W, BIAS, POS, SLOTS, COS, SIN, Q_OUT, K_CACHE, PARTIAL, COUNTERS, X_DESC, W_ROT_DESC,
    M, K, rows, row_ok, tile, pid_m, pid_n, split,
    stride_xm, stride_wn, stride_qm, stride_cs, stride_ch,
    H: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """A Q1|K1 tile: BLOCK_N / 2 columns and their partners, rotated together; q out, k to the cache."""
    dtype = Q_OUT.dtype.element_ty
    ROT_WIDTH: tl.constexpr = H * HALF  # columns of Q1 (and of K1)
    PARTNER: tl.constexpr = 2 * ROT_WIDTH  # Q1|K1 column c pairs with column c + PARTNER
    ROT_N: tl.constexpr = BLOCK_N // 2
    cols = pid_n * ROT_N + tl.arange(0, ROT_N)  # in Q1|K1
    col_ok = cols < PARTNER
    a_ptr = LN_X + rows[:, None].to(tl.int64) * stride_xm
    acc1 = tl.zeros([BLOCK_M, ROT_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, ROT_N], dtype=tl.float32)
    for k0 in range(split * BLOCK_K, K, SPLIT_K * BLOCK_K):
        if USE_TMA:  # zeros past the edges; the partner rows of a last, partial tile are masked at the store
            a = X_DESC.load([pid_m * BLOCK_M, k0])
            w1 = W_ROT_DESC.load([pid_n * ROT_N, k0]).T
            w2 = W_ROT_DESC.load([pid_n * ROT_N + PARTNER, k0]).T
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a_mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & k_ok[None, :]
            a = tl.load(a_ptr + ks[None, :], mask=a_mask, other=0.0)
            w1 = _w_tile(W, cols, col_ok, ks, k_ok, stride_wn, EVEN_K)
            w2 = _w_tile(W, cols + PARTNER, col_ok, ks, k_ok, stride_wn, EVEN_K)
        acc1 = tl.dot(a, w1, acc1, input_precision=DOT_PRECISION)
        acc2 = tl.dot(a, w2, acc2, input_precision=DOT_PRECISION)
    last = True
    if SPLIT_K > 1:
        # Both halves of the rotary pairs reduce as one [BLOCK_M, BLOCK_N] tile (interleaved).
        both = tl.join(acc1, acc2).reshape(BLOCK_M, BLOCK_N)
        mask = (row_ok[:, None] & col_ok[None, :]).to(tl.int8)
        mask = tl.join(mask, mask).reshape(BLOCK_M, BLOCK_N) != 0
        both, last = reduce_split_k(both, PARTIAL, COUNTERS, tile, split, mask, BLOCK_M, BLOCK_N, SPLIT_K)
        acc1, acc2 = tl.split(both.reshape(BLOCK_M, ROT_N, 2))
    if last:
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

        slot = tl.load(SLOTS + rows, mask=row_ok, other=-1)
        store_row = row_ok & (slot >= 0)
        dim = head * HD + j
        q_mask = row_ok[:, None] & (col_ok & ~is_k)[None, :]
        q_ptr = Q_OUT + rows[:, None] * stride_qm + dim[None, :]
        tl.store(q_ptr, out1, mask=q_mask)
        tl.store(q_ptr + HALF, out2, mask=q_mask)
        k_mask = store_row[:, None] & (col_ok & is_k)[None, :]
        k_ptr = K_CACHE + slot[:, None] * stride_cs + (head * stride_ch + j)[None, :]
        tl.store(k_ptr, out1, mask=k_mask)
        tl.store(k_ptr + HALF, out2, mask=k_mask)


@triton.jit
def _plain_tile(
    LN_X, W, BIAS, SLOTS, Q_OUT, G_OUT, K_CACHE, V_CACHE, PARTIAL, COUNTERS, X_DESC, W_DESC,
    M, K, rows, row_ok, tile, pid_m, plain_n, split,
    stride_xm, stride_wn, stride_qm, stride_gm, stride_cs, stride_ch,
    H: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr, F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """A QP|KP|V|M tile: q pass-through dims, k and v to the cache, fc_in's bias and gelu_new."""
    dtype = Q_OUT.dtype.element_ty
    QP: tl.constexpr = 4 * H * HALF  # start of the plain columns, past Q1|K1|Q2|K2
    KP: tl.constexpr = QP + H * PASS
    V0: tl.constexpr = KP + H * PASS
    M0: tl.constexpr = V0 + H * HD
    cols = QP + plain_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M0 + F
    a_ptr = LN_X + rows[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(split * BLOCK_K, K, SPLIT_K * BLOCK_K):
        if USE_TMA:  # zeros past the edges
            a = X_DESC.load([pid_m * BLOCK_M, k0])
            w = W_DESC.load([QP + plain_n * BLOCK_N, k0]).T
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a_mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & k_ok[None, :]
            a = tl.load(a_ptr + ks[None, :], mask=a_mask, other=0.0)
            w = _w_tile(W, cols, col_ok, ks, k_ok, stride_wn, EVEN_K)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    last = True
    if SPLIT_K > 1:
        mask = row_ok[:, None] & col_ok[None, :]
        acc, last = reduce_split_k(acc, PARTIAL, COUNTERS, tile, split, mask, BLOCK_M, BLOCK_N, SPLIT_K)
    if last:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = acc.to(dtype)
        slot = tl.load(SLOTS + rows, mask=row_ok, other=-1)
        store_row = row_ok & (slot >= 0)
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


@triton.jit
def _in_proj_kernel(
    LN_X,  # [M, K] ln_1(x) in the model dtype, row stride stride_xm
    W,  # [N, K] w_in in InProjLayout order, row stride stride_wn; N = 3K + F
    BIAS,  # [N] b_in
    POS,  # [M] int64 token positions
    SLOTS,  # [M] int64 KV cache slot of each token; -1: store nothing
    COS, SIN,  # [max_positions, HALF] float32
    Q_OUT,  # [M, H * HD] rotated q, row stride stride_qm
    G_OUT,  # [M, F] gelu(fc_in(ln(x))), row stride stride_gm
    K_CACHE, V_CACHE,  # [slots, H, HD]: slot stride stride_cs, head stride stride_ch, dims contiguous
    PARTIAL, COUNTERS,  # split-K scratch (split_k.py); unused when SPLIT_K == 1
    X_DESC, W_DESC, W_ROT_DESC,  # TMA descriptors: LN_X [BLOCK_M, BLOCK_K], W [BLOCK_N | BLOCK_N / 2, BLOCK_K]; or None
    M, K,
    stride_xm, stride_wn, stride_qm, stride_gm, stride_cs, stride_ch,
    H: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr, F: tl.constexpr,
    ROT_TILES: tl.constexpr,  # column tiles over Q1|K1 (BLOCK_N / 2 columns and their partners each)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % (BLOCK_K * SPLIT_K) == 0: no K masks
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # load the operand tiles through the descriptors (tma.py)
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    tile = pid_m * tl.num_programs(1) + pid_n
    if pid_n < ROT_TILES:
        _rotary_tile(
            LN_X, W, BIAS, POS, SLOTS, COS, SIN, Q_OUT, K_CACHE, PARTIAL, COUNTERS, X_DESC, W_ROT_DESC,
            M, K, rows, row_ok, tile, pid_m, pid_n, split,
            stride_xm, stride_wn, stride_qm, stride_cs, stride_ch,
            H, HD, HALF, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, EVEN_K, DOT_PRECISION, USE_TMA,
        )  # fmt: skip
    else:
        _plain_tile(
            LN_X, W, BIAS, SLOTS, Q_OUT, G_OUT, K_CACHE, V_CACHE, PARTIAL, COUNTERS, X_DESC, W_DESC,
            M, K, rows, row_ok, tile, pid_m, pid_n - ROT_TILES, split,
            stride_xm, stride_wn, stride_qm, stride_gm, stride_cs, stride_ch,
            H, HD, HALF, PASS, F, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, EVEN_K, DOT_PRECISION, USE_TMA,
        )  # fmt: skip


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
    split_k: int | None = None,
    counters: torch.Tensor | None = None,
    num_sms: int = settings.DEFAULT_NUM_SMS,
    interpreted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch_ops.in_proj`'s arguments and results (q [T, d], g [T, f]; k, v into the caches), then launch options.

    The plan is `settings.projection_plan`'s for `num_sms` SMs (or Triton's
    interpreter); `split_k` overrides its number of K splits; `counters` is
    split-K's zeroed arrival counters, kept between launches (`split_k.py`).
    """
    m, k = x.shape
    h, hd, half, f = layout.n_head, layout.head_dim, layout.half, layout.n_inner
    assert w_in.shape == (layout.width, k) and w_in.stride(1) == 1 and x.stride(1) == 1
    assert k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1)  # slot = block * block_size + offset
    q = torch.empty((m, h * hd), device=x.device, dtype=x.dtype)
    g = torch.empty((m, f), device=x.device, dtype=x.dtype)
    if m == 0:
        return q, g
    ln_x = layer_norm(x, ln_weight, ln_bias, eps)
    rot_columns, plain_columns = 2 * layout.rotary_width, layout.width - 2 * layout.rotary_partner
    plan = settings.projection_plan(m, k, rot_columns, plain_columns, x.element_size(), num_sms, interpreted, split_k)
    rot_tiles = triton.cdiv(rot_columns, plan.block_n // 2)
    grid = (triton.cdiv(m, plan.block_m), settings.column_tiles(plan.block_n, rot_columns, plain_columns), plan.split_k)
    partial, counters = split_k_scratch(grid[0] * grid[1], plan, x.device, counters)
    use_tma = not interpreted and tma.usable(plan, m, ln_x, w_in)
    descs = (None, None, None)
    if use_tma:
        bm, bn, bk = plan.block_m, plan.block_n, plan.block_k
        descs = (tma.descriptor(ln_x, bm, bk), tma.descriptor(w_in, bn, bk), tma.descriptor(w_in, bn // 2, bk))
    _in_proj_kernel[grid](
        ln_x, w_in, b_in, positions, slot_mapping, cos, sin, q, g, k_cache, v_cache, partial, counters, *descs,
        m, k,
        ln_x.stride(0), w_in.stride(0), q.stride(0), g.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=h, HD=hd, HALF=half, PASS=layout.pass_dim, F=f, ROT_TILES=rot_tiles,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, SPLIT_K=plan.split_k,
        EVEN_K=k % (plan.block_k * plan.split_k) == 0, DOT_PRECISION=settings.dot_precision(x.dtype), USE_TMA=use_tma,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )  # fmt: skip
    return q, g
