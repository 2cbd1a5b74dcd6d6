"""Kernel speed: each fastcodegen Triton kernel against the PyTorch path a user would otherwise run.

    python benchmarks/bench_kernels.py                                   # all four sizes, float16
    python benchmarks/bench_kernels.py --models 350M 6B --dtype bfloat16
    python benchmarks/bench_kernels.py --out benchmarks/results/kernels-h100.json

Needs a CUDA GPU. At the real shapes of codegen-350M, 2B, 6B and 16B
(`fastcodegen.registry.MODELS`), with random weights and inputs, it times:

    kernel             fastcodegen                                 PyTorch path
    in_proj            LayerNorm + [q|k|v|fc_in] GEMM + rotary     F.layer_norm + F.linear (with bias) of the same
                       + paged K/V store + gelu, one kernel        shapes: the GEMM alone, no rotary, store or gelu
    out_proj           GEMM over [attn | g] + bias + residual      F.linear on the already concatenated [attn | g]
                                                                   + residual add (the torch.cat is not timed)
    decode_attention   split-K paged attention, one query per      scaled_dot_product_attention on contiguous,
                       sequence, splits from settings.num_splits() unpaged K/V of the same length
    prefill_attention  paged causal flash attention                scaled_dot_product_attention(is_causal=True)
                                                                   on contiguous, unpaged K/V

The projections run at decode batches of 1, 8 and 64 rows and prefills of
512 and 2048 tokens; decode attention at batches 1, 8, 32 and contexts 128,
512, 1024, 2048; prefill attention on one prompt of 512 and of 2048 tokens.
Paged K/V live in a cache of 16-token blocks handed out in a random order,
so reads really go through the block table.

Before a row is timed, the kernel's output is checked once against its
PyTorch reference (`fastcodegen.models.torch_ops`) at that shape, and for
attention the PyTorch path's output too; a row that differs is reported as
FAIL and never timed. Times are medians of CUDA-event spans around single
calls, after warm-up, each call starting with a cold L2 (a 512 MiB buffer is
read in between): a layer's weights and K/V are not in L2 in a real forward
pass either. Host-side launch overhead is not in the numbers.

Each row also gives the achieved rate against ceilings measured in the same
run: GB/s and its fraction of the device-to-device copy bandwidth for
memory-bound rows (decode), TFLOP/s and its fraction of the fp16/bf16
torch.matmul rate (8192^3) for compute-bound rows (prefill). Bytes and FLOPs
are counted by the helper functions below. Prints a table, then one JSON line
(device, date, commit, versions, ceilings, every row); --out also writes that
JSON to a file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from common import commit

from fastcodegen.config import ModelConfig
from fastcodegen.models import torch_ops
from fastcodegen.registry import MODELS
from fastcodegen.weights import InProjLayout

SIZES = ("350M", "2B", "6B", "16B")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCK_SIZE = 16  # tokens per KV cache block

# (phase, rows of x): decode batches, then prefills of one prompt.
PROJ_CASES = (("decode", 1), ("decode", 8), ("decode", 64), ("prefill", 512), ("prefill", 2048))
DECODE_BATCHES = (1, 8, 32)
DECODE_CONTEXTS = (128, 512, 1024, 2048)
PREFILL_PROMPTS = (512, 2048)
KERNELS = ("in_proj", "out_proj", "decode_attention", "prefill_attention")

# Output checks: |ours - ref| <= TOL * (rms(ref) + |ref|) everywhere. A correct kernel differs from its
# reference by an ulp or two (different summation order): at most ~0.1 of this bound in float16 (bfloat16's
# ulp is 8x coarser, hence its larger TOL); a broken one by the size of the values, 10x or more past it.
TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}

COPY_BYTES = 1 << 30  # ceiling: dst.copy_(src) of this many bytes
MATMUL_N = 8192  # ceiling: an N x N x N GEMM
FLUSH_BYTES = 512 << 20  # read before each timed call: several times the L2 of an H100/H200 (50 MiB)


# ---------------------------------------------------------------------------------------------------------
# What each kernel must move and compute. Bytes are the least traffic to and from device memory: every
# input read once, every output written once (a kernel's re-reads from L2 and its own scratch buffers do
# not count); `elem` is the bytes per element of the model dtype. FLOPs count the multiply-adds of the
# matrix products as 2 each; LayerNorm, rotary, gelu and softmax are left out (a few per element, not per
# multiply-add).
# ---------------------------------------------------------------------------------------------------------


def in_proj_bytes(m: int, d: int, f: int, elem: int) -> int:
    """in_proj over m rows: reads x [m, d], ln weight and bias [d], w_in [3d + f, d] and b_in [3d + f];
    writes ln(x) [m, d] and reads it back (LayerNorm runs once, before the GEMM); writes q [m, d], k and v
    [m, d] each (into the cache) and g [m, f], i.e. m * (3d + f) values. Not counted: positions and slots
    (8 bytes a row each), the rows of the float32 cos/sin tables, the float32 split-K partial sums."""
    n = 3 * d + f
    return elem * (3 * m * d + 2 * d + n * d + n + m * n)


def in_proj_flops(m: int, d: int, f: int) -> int:
    """The [m, d] x [d, 3d + f] GEMM."""
    return 2 * m * d * (3 * d + f)


def out_proj_bytes(m: int, d: int, f: int, elem: int) -> int:
    """out_proj over m rows: reads attn [m, d], g [m, f], w_out [d, d + f], b_out [d] and the residual [m, d];
    writes out [m, d]. Not counted: the float32 split-K partial sums (the kernel's own scratch)."""
    return elem * (m * (d + f) + d * (d + f) + d + 2 * m * d)


def out_proj_flops(m: int, d: int, f: int) -> int:
    """The [m, d + f] x [d + f, d] GEMM."""
    return 2 * m * (d + f) * d


def decode_attention_bytes(batch: int, context: int, heads: int, head_dim: int, elem: int) -> int:
    """One query per sequence: reads K and V [batch, context, heads, head_dim] and q [batch, heads, head_dim];
    writes out [batch, heads, head_dim]. Not counted: block tables, lengths, the float32 split partials."""
    return elem * (2 * batch * context * heads * head_dim + 2 * batch * heads * head_dim)


def decode_attention_flops(batch: int, context: int, heads: int, head_dim: int) -> int:
    """q.k over the context, then p.v: 2 x 2 * context * head_dim per (sequence, head)."""
    return 4 * batch * heads * context * head_dim


def prefill_attention_bytes(tokens: int, heads: int, head_dim: int, elem: int) -> int:
    """One prompt, context = prompt: reads q, K and V [tokens, heads, head_dim] once each, writes out."""
    return elem * 4 * tokens * heads * head_dim


def prefill_attention_flops(tokens: int, heads: int, head_dim: int) -> int:
    """Causal: query i sees keys 0..i, tokens * (tokens + 1) / 2 (query, key) pairs; q.k and p.v per pair.
    Masked-out pairs a kernel computes anyway (on the diagonal tiles) are not counted."""
    return 4 * heads * head_dim * (tokens * (tokens + 1) // 2)


def copy_bytes(nbytes: int) -> int:
    """dst.copy_(src): src read and dst written."""
    return 2 * nbytes


def matmul_flops(n: int) -> int:
    return 2 * n**3


def gbps(nbytes: int, us: float) -> float:
    return nbytes / us / 1e3


def tflops(flops: int, us: float) -> float:
    return flops / us / 1e6


# ---------------------------------------------------------------------------------------------------------
# Timing and checking
# ---------------------------------------------------------------------------------------------------------


class Timer:
    """Median GPU time of fn(), in µs, from CUDA events recorded around each call.

    Before each timed call a FLUSH_BYTES buffer is summed: this evicts the
    previous call's data from L2, leaving clean lines (a zero_() flush would
    leave dirty lines whose write-back would eat into the next call's
    bandwidth), and keeps the GPU busy long enough for the host to enqueue
    the call before the GPU reaches it, so launch overhead stays out.
    Warm-up and repetition counts follow from a first estimate, to spend
    about warmup_ms and rep_ms per measurement.
    """

    def __init__(self, device: torch.device, warmup_ms: float, rep_ms: float, min_reps: int = 5, max_reps: int = 1000):
        self.flush_buf = torch.ones(FLUSH_BYTES // 4, device=device, dtype=torch.float32)
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.min_reps, self.max_reps = min_reps, max_reps

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = _event(), _event()
        start.record()
        for _ in range(5):
            self.flush_buf.sum()
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
        for _ in range(max(1, round(self.warmup_ms / estimate_ms))):
            fn()
        reps = min(self.max_reps, max(self.min_reps, round(self.rep_ms / estimate_ms)))
        spans = [(_event(), _event()) for _ in range(reps)]
        for start, end in spans:
            self.flush_buf.sum()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return 1e3 * statistics.median(start.elapsed_time(end) for start, end in spans)


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def check_error(got: torch.Tensor, expect: torch.Tensor, tol: float) -> float:
    """max |got - expect| / (tol * (rms(expect) + |expect|)): at most 1 passes; inf on a NaN or inf in got.

    The rms term keeps values near zero (and cancellations in rotary) from failing on an ulp.
    """
    got, expect = got.float(), expect.float()
    if got.shape != expect.shape or not bool(torch.isfinite(got).all()):
        return math.inf
    scale = tol * (expect.pow(2).mean().sqrt() + expect.abs()) + torch.finfo(torch.float32).tiny
    return float(((got - expect).abs() / scale).max())


@dataclass
class Bench:
    """What every case needs: where, in what dtype, how to time, and the ceilings rows are measured against."""

    device: torch.device
    dtype: torch.dtype
    timer: Callable[[Callable[[], object]], float]
    gen: torch.Generator
    num_sms: int
    copy_gbps: float = math.nan
    matmul_tflops: float = math.nan
    rows: list = field(default_factory=list)

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def tol(self) -> float:
        return TOL[self.dtype]

    def randn(self, *shape: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        return torch.empty(shape, device=self.device, dtype=self.dtype).normal_(mean, std, generator=self.gen)

    def randperm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, device=self.device, generator=self.gen)

    def case(
        self,
        kernel: str,
        model: str,
        phase: str,
        shape: str,
        nbytes: int,
        flops: int,
        ours: Callable[[], object],
        pytorch: Callable[[], object],
        check: Callable[[], dict[str, float]],
    ) -> dict:
        """Checks, then times, one row; appends it to self.rows, prints it and returns it.

        `check()` runs the kernel (and the references) once and returns
        {what: check_error}; only a row whose every error is <= 1 is timed.
        """
        row = {
            "kernel": kernel, "model": model, "phase": phase, "shape": shape,
            "bound": "memory" if phase == "decode" else "compute",
            "bytes": nbytes, "flops": flops, "check": None, "check_error": None,
            "fastcodegen_us": None, "pytorch_us": None, "ratio": None,
            "gbps": None, "tflops": None, "fraction_of_ceiling": None,
        }  # fmt: skip
        try:
            errors = check()
            worst = max(errors.values())
            row["check_error"] = worst if math.isfinite(worst) else None  # None: a NaN/inf output (strict JSON)
            bad = [f"{what} err {err:.3g}" for what, err in errors.items() if not err <= 1]
            row["check"] = "FAIL: " + ", ".join(bad) if bad else "ok"
            if not bad:
                row["fastcodegen_us"] = self.timer(ours)
                row["pytorch_us"] = self.timer(pytorch)
        except Exception as e:  # a launch or memory error: report it, go on with the next row
            row["check"], row["fastcodegen_us"], row["pytorch_us"] = "error", None, None
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if row["fastcodegen_us"] is not None and row["pytorch_us"] is not None:
            us = row["fastcodegen_us"]
            row["ratio"] = row["pytorch_us"] / us
            row["gbps"], row["tflops"] = gbps(nbytes, us), tflops(flops, us)
            if row["bound"] == "memory":
                row["fraction_of_ceiling"] = row["gbps"] / self.copy_gbps
            else:
                row["fraction_of_ceiling"] = row["tflops"] / self.matmul_tflops
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row


# ---------------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------------


def token_slots(bench: Bench, phase: str, m: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(positions [m] int64, slot_mapping [m] int64, num_blocks) for in_proj's m rows.

    decode: m sequences, one new token each at a random position, each in a block of its own;
    prefill: one prompt at positions 0..m-1 in consecutive table entries. Blocks are in a random order.
    """
    if phase == "decode":
        positions = torch.randint(0, max_positions, (m,), device=bench.device, generator=bench.gen)
        num_blocks = m
        blocks = bench.randperm(num_blocks)
    else:
        positions = torch.arange(m, device=bench.device)
        num_blocks = -(-m // BLOCK_SIZE)
        blocks = bench.randperm(num_blocks)[positions // BLOCK_SIZE]
    return positions, blocks * BLOCK_SIZE + positions % BLOCK_SIZE, num_blocks


def paged_kv(bench: Bench, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous K, V [B, L, H, D] -> (k_cache, v_cache [B * L / 16, 16, H, D], block_tables [B, L / 16] int32).

    Sequence b's j-th block is block_tables[b, j], a random permutation of all blocks.
    """
    b, length, h, hd = k.shape
    assert length % BLOCK_SIZE == 0
    per_seq = length // BLOCK_SIZE
    perm = bench.randperm(b * per_seq)
    k_cache = torch.empty((b * per_seq, BLOCK_SIZE, h, hd), device=k.device, dtype=k.dtype)
    v_cache = torch.empty_like(k_cache)
    k_cache[perm] = k.reshape(b * per_seq, BLOCK_SIZE, h, hd)
    v_cache[perm] = v.reshape(b * per_seq, BLOCK_SIZE, h, hd)
    return k_cache, v_cache, perm.view(b, per_seq).to(torch.int32)


def bench_in_proj(bench: Bench, model: str, config: ModelConfig) -> None:
    from fastcodegen.kernels.in_proj import in_proj

    layout = InProjLayout.of(config)
    d, f, n, eps = config.n_embd, config.n_inner, layout.width, config.layer_norm_epsilon
    h, hd = config.n_head, config.head_dim
    ln_w, ln_b = bench.randn(d, mean=1.0, std=0.02), bench.randn(d, std=0.02)
    w_in, b_in = bench.randn(n, d, std=0.02), bench.randn(n, std=0.02)
    cos, sin = torch_ops.rotary_tables(config.rotary_dim, config.n_positions, bench.device)
    for phase, m in PROJ_CASES:
        x = bench.randn(m, d)
        positions, slots, num_blocks = token_slots(bench, phase, m, config.n_positions)
        k_cache = torch.zeros((num_blocks, BLOCK_SIZE, h, hd), device=bench.device, dtype=bench.dtype)
        v_cache = torch.zeros_like(k_cache)
        args = (x, ln_w, ln_b, w_in, b_in, positions, slots, cos, sin)

        def ours():
            return in_proj(*args, k_cache, v_cache, layout, eps, num_sms=bench.num_sms)

        def pytorch():
            return F.linear(F.layer_norm(x, (d,), ln_w, ln_b, eps), w_in, b_in)

        def check() -> dict[str, float]:
            q, g = ours()
            k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
            q_ref, g_ref = torch_ops.in_proj(*args, k_ref, v_ref, layout, eps)

            def stored(cache: torch.Tensor) -> torch.Tensor:  # the K or V rows in_proj wrote
                return cache.view(-1, h, hd)[slots]

            return {
                "q": check_error(q, q_ref, bench.tol),
                "g": check_error(g, g_ref, bench.tol),
                "k": check_error(stored(k_cache), stored(k_ref), bench.tol),
                "v": check_error(stored(v_cache), stored(v_ref), bench.tol),
            }

        bench.case(
            "in_proj", model, phase, f"M={m} N={n} K={d}",
            in_proj_bytes(m, d, f, bench.elem), in_proj_flops(m, d, f), ours, pytorch, check,
        )  # fmt: skip


def bench_out_proj(bench: Bench, model: str, config: ModelConfig) -> None:
    from fastcodegen.kernels.out_proj import out_proj

    d, f = config.n_embd, config.n_inner
    w_out, b_out = bench.randn(d, d + f, std=0.02), bench.randn(d, std=0.02)
    for phase, m in PROJ_CASES:
        a, g, residual = bench.randn(m, d), bench.randn(m, f), bench.randn(m, d)
        ag = torch.cat([a, g], dim=-1)  # the PyTorch path's input, made once: the cat is not timed

        def ours():
            return out_proj(a, g, w_out, b_out, residual, num_sms=bench.num_sms)

        def pytorch():
            return F.linear(ag, w_out, b_out) + residual

        def check() -> dict[str, float]:
            return {"out": check_error(ours(), torch_ops.out_proj(a, g, w_out, b_out, residual), bench.tol)}

        bench.case(
            "out_proj", model, phase, f"M={m} N={d} K={d + f}",
            out_proj_bytes(m, d, f, bench.elem), out_proj_flops(m, d, f), ours, pytorch, check,
        )  # fmt: skip


def bench_decode_attention(bench: Bench, model: str, config: ModelConfig) -> None:
    from fastcodegen.kernels.settings import num_splits

    for b in DECODE_BATCHES:
        # The split count the kernel plans, as in the engine: from the batch and the model's limit, not the lengths.
        splits = num_splits(b, config.n_head, config.n_positions, config.head_dim, bench.elem, num_sms=bench.num_sms)
        for length in DECODE_CONTEXTS:
            _decode_case(bench, model, config, b, length, splits)


def _decode_case(bench: Bench, model: str, config: ModelConfig, b: int, length: int, splits: int) -> None:
    """One decode-attention row; its tensors are freed on return."""
    from fastcodegen.kernels.decode_attention import decode_attention

    h, hd = config.n_head, config.head_dim
    q, k, v = bench.randn(b, h, hd), bench.randn(b, length, h, hd), bench.randn(b, length, h, hd)
    k_cache, v_cache, tables = paged_kv(bench, k, v)
    lens = torch.full((b,), length, device=bench.device, dtype=torch.int32)
    # The PyTorch path: [B, H, L, D] contiguous, no block table.
    q4, k4, v4 = q.unsqueeze(2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    del k, v

    def ours():
        return decode_attention(
            q, k_cache, v_cache, tables, lens, length, max_model_len=config.n_positions, num_sms=bench.num_sms
        )

    def pytorch():
        return F.scaled_dot_product_attention(q4, k4, v4)

    def check() -> dict[str, float]:
        starts = torch.arange(b + 1, device=bench.device, dtype=torch.int32)
        expect = torch_ops.paged_attention(q, k_cache, v_cache, tables, lens, starts, 1, length)
        return {
            "out": check_error(ours(), expect, bench.tol),
            "pytorch path": check_error(pytorch().squeeze(2), expect, bench.tol),
        }

    bench.case(
        "decode_attention", model, "decode", f"B={b} ctx={length} H={h} D={hd} splits={splits}",
        decode_attention_bytes(b, length, h, hd, bench.elem), decode_attention_flops(b, length, h, hd),
        ours, pytorch, check,
    )  # fmt: skip


def bench_prefill_attention(bench: Bench, model: str, config: ModelConfig) -> None:
    from fastcodegen.kernels.prefill_attention import paged_attention

    h, hd = config.n_head, config.head_dim
    for t in PREFILL_PROMPTS:
        q, k, v = bench.randn(t, h, hd), bench.randn(1, t, h, hd), bench.randn(1, t, h, hd)
        k_cache, v_cache, tables = paged_kv(bench, k, v)
        lens = torch.tensor([t], device=bench.device, dtype=torch.int32)
        starts = torch.tensor([0, t], device=bench.device, dtype=torch.int32)
        # The PyTorch path: [1, H, T, D] contiguous, no block table.
        q4, k4, v4 = (x.view(1, t, h, hd).transpose(1, 2).contiguous() for x in (q, k, v))

        def ours():
            return paged_attention(q, k_cache, v_cache, tables, lens, starts, t, t)

        def pytorch():
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)

        def check() -> dict[str, float]:
            expect = torch_ops.paged_attention(q, k_cache, v_cache, tables, lens, starts, t, t)
            return {
                "out": check_error(ours(), expect, bench.tol),
                "pytorch path": check_error(pytorch()[0].transpose(0, 1), expect, bench.tol),
            }

        bench.case(
            "prefill_attention", model, "prefill", f"T={t} ctx={t} H={h} D={hd} causal",
            prefill_attention_bytes(t, h, hd, bench.elem), prefill_attention_flops(t, h, hd),
            ours, pytorch, check,
        )  # fmt: skip


BENCHES = {
    "in_proj": bench_in_proj,
    "out_proj": bench_out_proj,
    "decode_attention": bench_decode_attention,
    "prefill_attention": bench_prefill_attention,
}


def measure_ceilings(bench: Bench) -> None:
    """Device-to-device copy bandwidth and the matmul rate, into bench.copy_gbps and bench.matmul_tflops."""
    src = torch.empty(COPY_BYTES, device=bench.device, dtype=torch.uint8).random_(generator=bench.gen)
    dst = torch.empty_like(src)
    bench.copy_gbps = gbps(copy_bytes(COPY_BYTES), bench.timer(lambda: dst.copy_(src)))
    a, b = bench.randn(MATMUL_N, MATMUL_N), bench.randn(MATMUL_N, MATMUL_N)
    c = torch.empty_like(a)
    bench.matmul_tflops = tflops(matmul_flops(MATMUL_N), bench.timer(lambda: torch.matmul(a, b, out=c)))
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------

HEADER = (
    f"{'kernel':18} {'model':5} {'shape':36} {'fastcodegen µs':>14} {'pytorch µs':>11} {'ratio':>7} "
    f"{'achieved':>15} {'of ceiling':>11}  check"
)


def format_row(row: dict) -> str:
    def us(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.1f}"

    ratio = achieved = fraction = "-"
    if row["ratio"] is not None:
        ratio = f"{row['ratio']:.2f}x"
        if row["bound"] == "memory":
            achieved, fraction = f"{row['gbps']:.0f} GB/s", f"{row['fraction_of_ceiling']:.0%} copy"
        else:
            achieved, fraction = f"{row['tflops']:.1f} TFLOP/s", f"{row['fraction_of_ceiling']:.0%} mm"
    check = row["check"] + (f" ({row['error']})" if "error" in row else "")
    return (
        f"{row['kernel']:18} {row['model']:5} {row['shape']:36} {us(row['fastcodegen_us']):>14} "
        f"{us(row['pytorch_us']):>11} {ratio:>7} {achieved:>15} {fraction:>11}  {check}"
    )


NOTES = """\
ratio = PyTorch time / fastcodegen time (>1: fastcodegen is faster). Achieved rate of the fastcodegen kernel:
GB/s (vs the copy ceiling) for decode rows, TFLOP/s (vs the matmul ceiling) for prefill rows.
PyTorch paths: in_proj = F.layer_norm + F.linear with bias only (no rotary, K/V store or gelu: the kernel does more);
out_proj = F.linear on a pre-concatenated [attn | g] + residual (the torch.cat it would need is not timed);
attention = F.scaled_dot_product_attention on contiguous, unpaged K/V (no block-table gather)."""

BASELINES = {
    "in_proj": "F.linear(F.layer_norm(x), w_in, b_in): no rotary, K/V store or gelu",
    "out_proj": "F.linear(cat([attn, g]), w_out, b_out) + residual, the cat done once outside the timing",
    "decode_attention": "F.scaled_dot_product_attention(q [B,H,1,D], K, V [B,H,L,D] contiguous)",
    "prefill_attention": "F.scaled_dot_product_attention(q, K, V [1,H,T,D] contiguous, is_causal=True)",
}


def _size(name: str) -> str:
    """'350M', 'codegen-350M-mono' or 'Salesforce/codegen-350M-mono' -> '350M'."""
    stem = name.removeprefix("Salesforce/").removeprefix("codegen-").split("-")[0]
    for size in SIZES:
        if stem.lower() == size.lower():
            return size
    raise argparse.ArgumentTypeError(f"unknown model {name!r}: one of {', '.join(SIZES)} (or an official CodeGen name)")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        nargs="+",
        type=_size,
        default=list(SIZES),
        metavar="SIZE",
        help=f"CodeGen sizes to run, of {' '.join(SIZES)} (default: all)",
    )
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS), help="kernels to run (default: all)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16")
    p.add_argument("--warmup-ms", type=float, default=10.0, help="warm-up time per measurement (default 10)")
    p.add_argument("--rep-ms", type=float, default=50.0, help="timed calls per measurement, in ms (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the JSON record to this file (e.g. under benchmarks/results/)")
    return p.parse_args(argv)  # fmt: skip


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(
            f"bench_kernels.py needs a CUDA GPU, and torch {torch.__version__} sees none "
            f"(CUDA build: {torch.version.cuda or 'no'}); run it on a machine with an NVIDIA GPU."
        )
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit(
            "bench_kernels.py: TRITON_INTERPRET=1 is set, the kernels would run in Triton's interpreter; unset it."
        )
    import triton

    device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype]
    props = torch.cuda.get_device_properties(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    from fastcodegen.kernels.settings import device_sms

    bench = Bench(device, dtype, Timer(device, args.warmup_ms, args.rep_ms), gen, device_sms(device))
    measure_ceilings(bench)
    models = [m for m in SIZES if m in args.models]

    print(
        f"{props.name} ({bench.num_sms} SMs, {props.total_memory / 2**30:.0f} GiB), {args.dtype}, "
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    )
    print(
        f"ceilings: copy {bench.copy_gbps:.0f} GB/s (dst.copy_(src) of {COPY_BYTES / 2**30:g} GiB, read + write), "
        f"matmul {bench.matmul_tflops:.0f} TFLOP/s ({MATMUL_N}^3 {args.dtype})"
    )
    print(HEADER)
    for size in models:
        config = MODELS[f"codegen-{size}-mono"]
        for kernel in (k for k in KERNELS if k in args.kernels):
            try:
                BENCHES[kernel](bench, size, config)
            except Exception as e:  # e.g. out of memory allocating a model's weights
                error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"{kernel:18} {size:5} error: {error}", flush=True)
                bench.rows.append({"kernel": kernel, "model": size, "check": "error", "error": error})
            torch.cuda.empty_cache()
    print(NOTES)

    record = {
        "benchmark": "bench_kernels",
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "device": props.name,
        "num_sms": bench.num_sms,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "models": models,
        "timing": {"method": "median of CUDA-event spans, cold L2", "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                   "flush_bytes": FLUSH_BYTES},
        "ceilings": {"copy_gbps": bench.copy_gbps, "copy_bytes": COPY_BYTES,
                     "matmul_tflops": bench.matmul_tflops, "matmul_n": MATMUL_N},
        "pytorch_paths": BASELINES,
        "rows": bench.rows,
    }  # fmt: skip
    line = json.dumps(record)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    failed = [r for r in bench.rows if r["check"] != "ok"]
    if failed:
        sys.exit(f"bench_kernels.py: {len(failed)} row(s) failed their check or raised; see the table")


if __name__ == "__main__":
    main()
