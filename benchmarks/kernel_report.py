"""A static performance report of every Triton kernel launch the engine makes, for an H200, without a GPU.

    python benchmarks/kernel_report.py [--arch 90] [--dtypes float16 bfloat16] [--json] [--markdown FILE]
                                       [--quick] [--check] [--models ...] [--progress]

The launches are the engine's own (`kernel_launches.py`: the model's `Ops`
over the Triton kernels' table, run on meta tensors at the real shapes of
codegen-350M, 2B, 6B and 16B, engine defaults, max_model_len = n_positions =
2048): decode steps of 1, 8, 32 and 64 rows and verify steps (speculative
decoding, 5 tokens a row) of as many, every sequence at a context of 2048
tokens, and prefill steps of 512 and 2048 tokens (one prompt each), in
float16 and bfloat16. Each distinct specialisation is compiled ahead of time
for sm_90 with Triton's compiler and ptxas (about three minutes on two cores;
Triton keeps the results in its cache, ~/.triton/cache, so a rerun takes
seconds), and every launch gets a row:

* from the compiled kernel: grid (programs), warps, pipeline stages,
  registers per thread, shared memory, spills (`cuobjdump -res-usage`);
  which instructions its main loops use, read from the PTX and TTGIR
  (cp.async, TMA, wgmma, mma.sync);
* from the occupancy rules of an H200's SMs (as the CUDA occupancy
  calculator applies them): programs resident per SM, waves over the 132
  SMs, how full the last wave is (a grid of one wave: how evenly its SMs
  are loaded), and the share of the launch's time that would waste (time ~
  1 / fill for one wave, ceil(waves) / waves up to 4 waves);
* from a cost model per kernel (`COST_MODELS`): the bytes the launch must
  move and the matrix FLOPs it must do, and their roofline time on the
  device (`Device`: copy bandwidth and bf16 matmul rate measured on an
  H200).

Then, per model, dtype and step, the floor of a step: the roofline times of
one layer's launches times the model's layer count (the Triton kernels
only: the embedding gather, the final LayerNorm and lm_head are library
calls). Everything here is a prediction from compiled code, not a
measurement. `RULES` are the design rules the kernels must keep (no spills,
decode launches that fill their waves, pipelined main loops, wgmma where
prefill multiplies matrices); `--check` exits 1 and prints each violation,
and tests/test_kernel_report.py checks the same rules.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import kernel_launches as kl
import torch

from fastcodegen.kernels.settings import MIN_LAST_WAVE_FILL, MIN_WAVES, meets_wave_rule, wave_fill
from fastcodegen.registry import MODELS

ROOT = Path(__file__).resolve().parents[1]
# What the report's numbers depend on besides Triton: a change here, uncommitted, is named in the header.
SOURCES = ("kernels", "fastcodegen", "benchmarks/kernel_launches.py", "benchmarks/kernel_report.py")


class ReportError(Exception):
    """A problem with the report's inputs (an unknown kernel, an argument a cost model needs): one error line."""


# ---------------------------------------------------------------------------------------------------------
# The device
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """A GPU as the report models it: its SMs' occupancy limits and the ceilings measured on it.

    `bandwidth` is a device-to-device copy's bytes per second and
    `matmul_rate` a large bf16 matmul's FLOP/s, both measured, not the
    data sheet's. The occupancy fields are those of the CUDA occupancy
    calculator for the SM's compute capability.
    """

    name: str
    sms: int
    bandwidth: float  # bytes/s
    matmul_rate: float  # FLOP/s
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    warp_size: int = 32
    registers_per_sm: int = 65536
    registers_per_block: int = 65536
    max_registers_per_thread: int = 255
    register_granularity: int = 256  # registers are given to a warp in units of this many
    register_partitions: int = 4  # the register file is split among the SM's four schedulers
    shared_per_sm: int = 228 * 1024
    max_shared_per_block: int = 227 * 1024
    reserved_shared_per_block: int = 1024  # the driver's, on top of every block's own
    shared_granularity: int = 128


# Measured in this lab on an H200 (132 SMs): copy bandwidth 4.3 TB/s, bf16 matmul 788 TFLOP/s.
H200 = Device("H200", sms=132, bandwidth=4.3e12, matmul_rate=7.88e14)
DEVICES: Mapping[str, Device] = MappingProxyType({d.name: d for d in (H200,)})


@dataclass(frozen=True)
class Occupancy:
    """Programs (thread blocks) one SM holds at once, and the limit of each resource."""

    resident: int
    by_registers: int
    by_shared: int
    by_warps: int
    by_blocks: int

    @property
    def limiter(self) -> str:
        """The resources that set `resident` ('registers', 'shared', 'warps', 'blocks'), joined by '+'."""
        limits = {"registers": self.by_registers, "shared": self.by_shared, "warps": self.by_warps}
        limits["blocks"] = self.by_blocks
        return "+".join(name for name, n in limits.items() if n == self.resident)


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(registers: int, num_warps: int, shared: int, device: Device = H200) -> Occupancy:
    """Resident programs per SM of a kernel with `registers` per thread, `num_warps` warps, `shared` bytes.

    The CUDA occupancy calculator's rules: a warp's registers are rounded up
    to the allocation granularity and must fit in one quarter of the
    register file (each scheduler has its own); a block's shared memory plus
    the driver's reserve is rounded up to the shared granularity; threads
    and blocks per SM are capped.
    """
    by_warps = device.max_threads_per_sm // device.warp_size // num_warps
    per_warp = _round_up(registers * device.warp_size, device.register_granularity)
    # The hardware checks a block's registers as if its warps were spread evenly over the file's quarters.
    per_block = per_warp * _round_up(num_warps, device.register_partitions)
    if registers > device.max_registers_per_thread or per_block > device.registers_per_block:
        by_registers = 0
    elif per_warp == 0:
        by_registers = device.max_blocks_per_sm
    else:
        warps_per_partition = device.registers_per_sm // device.register_partitions // per_warp
        by_registers = warps_per_partition * device.register_partitions // num_warps
    allocated = _round_up(shared + device.reserved_shared_per_block, device.shared_granularity)
    if shared > device.max_shared_per_block:
        by_shared = 0
    else:
        by_shared = device.shared_per_sm // allocated
    resident = min(by_registers, by_shared, by_warps, device.max_blocks_per_sm)
    return Occupancy(resident, by_registers, by_shared, by_warps, device.max_blocks_per_sm)


# Below this many waves a partly empty last wave costs time in proportion; above, later waves hide it.
QUANTIZED_BELOW_WAVES = 4


def wave_factor(waves: float, fill: float) -> float:
    """Predicted time over the floor from wave quantization, given `wave_fill`'s (waves, fill).

    A grid of one wave or less takes 1 / fill (its busiest SM sets the time);
    up to 4 waves, ceil(waves) / waves; past that, 1.
    """
    if waves == 0 or math.isinf(waves):
        return 1.0 if waves == 0 else math.inf
    if waves <= 1:
        return 1.0 / fill
    return math.ceil(waves) / waves if waves < QUANTIZED_BELOW_WAVES else 1.0


def wave_loss(waves: float, fill: float) -> float:
    """The share of a launch's predicted time its idle wave slots take: 1 - 1 / `wave_factor`."""
    return 1.0 - 1.0 / wave_factor(waves, fill)


# ---------------------------------------------------------------------------------------------------------
# What the compiler made
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pipeline:
    """How a kernel's loops move data and multiply, from its PTX and TTGIR.

    cp_async: asynchronous global-to-shared copies (Ampere's cp.async), what
    Triton's software pipelining of a loop's loads emits; tma: the Tensor
    Memory Accelerator's bulk tensor copies; wgmma: Hopper's asynchronous
    warpgroup matrix multiply; mma_sync: the synchronous (Ampere) tensor core
    instruction.
    """

    cp_async: bool
    tma: bool
    wgmma: bool
    mma_sync: bool


_CP_ASYNC_PTX = re.compile(r"\bcp\.async\.c[ag]\.")  # cp.async.ca/.cg; not cp.async.bulk (TMA) nor the waits


def pipeline_flags(ptx: str, ttgir: str) -> Pipeline:
    """The instructions a compiled kernel uses, from its PTX (and TTGIR, where Triton names the copies)."""
    return Pipeline(
        cp_async=bool(_CP_ASYNC_PTX.search(ptx)) or "async_copy_global_to_local" in ttgir,
        tma="cp.async.bulk.tensor" in ptx or "async_tma_copy_global_to_local" in ttgir,
        wgmma="wgmma.mma_async" in ptx,
        mma_sync="mma.sync" in ptx,
    )


@dataclass(frozen=True)
class Compiled:
    """What one compiled specialisation uses."""

    num_warps: int
    num_stages: int
    registers: int
    stack: int
    local: int
    shared: int
    pipeline: Pipeline


_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers per thread, stack bytes, local bytes) of a cubin's kernel, from `cuobjdump -res-usage`."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = _RES_USAGE.search(text)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line: {text[-500:]!r}")
    return int(m[1]), int(m[2]), int(m[3])


def compile_launch(launch: kl.Launch, arch: int) -> Compiled:
    """Compiles a recorded launch's specialisation for sm_`arch` with Triton's compiler and ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs, options = kl.signature(launch)
    source = ASTSource(launch.kernel, sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    registers, stack, local = resources(compiled.asm["cubin"])
    md = compiled.metadata
    return Compiled(
        md.num_warps, md.num_stages, registers, stack, local, md.shared,
        pipeline_flags(compiled.asm["ptx"], compiled.asm["ttgir"]),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The cost model: bytes and FLOPs a launch cannot avoid
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """Bytes a launch must move (weights and activations read once, outputs written once) and matrix FLOPs."""

    bytes: int
    flops: int


def contexts(shape: kl.EngineShape, step: kl.Step) -> list[int]:
    """Each sequence's context in a step, as the report assumes it.

    Decode and verify: every row a sequence at the full context, max_model_len. Prefill:
    the step's tokens packed into prompts of max_model_len (the last one
    shorter), nothing cached before them, as `engine_steps` packs them.
    """
    n = shape.max_model_len
    if step.kind in ("decode", "verify"):
        return [n] * step.rows
    return [n] * (step.tokens // n) + ([step.tokens % n] if step.tokens % n else [])


@dataclass(frozen=True)
class LaunchView:
    """A launch as a cost model sees it: its arguments by parameter name, grid, engine shape and step.

    The models take the geometry (tokens, heads, head size, widths) from the
    engine shape and the step, which say what the launch has to do whatever
    its kernel's parameters are called; arguments by name only for buffers
    a kernel chose to have (split-K partials, decode attention's splits).
    """

    kernel: str
    values: Mapping[str, Any]
    grid: tuple
    shape: kl.EngineShape
    step: kl.Step

    def has(self, name: str) -> bool:
        return name in self.values

    def value(self, name: str) -> Any:
        """The argument `name`; a ReportError naming the kernel's parameters if it has none of that name."""
        if name not in self.values:
            raise ReportError(
                f"the cost model of {self.kernel} needs its argument {name!r}, which the kernel no longer has "
                f"(its parameters: {', '.join(self.values)}): update COST_MODELS in benchmarks/kernel_report.py"
            )
        return self.values[name]

    def tensor(self, name: str) -> torch.Tensor:
        v = self.value(name)
        if not isinstance(v, torch.Tensor):
            raise ReportError(f"the cost model of {self.kernel} takes {name} for a tensor, got {v!r}")
        return v

    def nbytes(self, *names: str) -> int:
        """Bytes of the named tensors, each read or written in full once."""
        return sum(self.tensor(n).numel() * self.tensor(n).element_size() for n in names)

    @property
    def elem(self) -> int:
        """Bytes of one value of the model's dtype (weights, activations, the KV cache)."""
        return torch.empty((), dtype=self.shape.dtype).element_size()

    @property
    def tokens(self) -> int:
        return self.step.tokens

    def contexts(self) -> list[int]:
        return contexts(self.shape, self.step)


_INDEX = 4  # bytes of an int32: block-table entries, context lengths, query starts
_POSITION = 8  # bytes of an int64: token positions, cache slots
_ROTARY = 4  # bytes of a float32 cos or sin value


def _split_k_bytes(v: LaunchView, m: int, n: int) -> int:
    """Traffic of split-K's float32 partial sums: SPLIT_K of each of the m x n outputs (the padding rows of a
    tile are masked off), written once; read back once when the launch reduces them itself (it then has an
    arrival COUNTERS argument), else by another kernel, which counts that read."""
    split = v.values.get("SPLIT_K", 1)
    if split == 1:
        return 0
    partials = split * m * n * v.tensor("PARTIAL").element_size()
    return 2 * partials + 2 * v.nbytes("COUNTERS") if v.has("COUNTERS") else partials


def layer_norm_cost(v: LaunchView) -> Cost:
    """LayerNorm of each token's row: x, weight and bias read once, ln(x) written once; no matrix work."""
    d = v.shape.config.n_embd
    return Cost((2 * v.tokens * d + 2 * d) * v.elem, 0)


def in_proj_cost(v: LaunchView) -> Cost:
    """[q|k|v|fc_in] GEMM (N = 3d + f): w_in and its bias read once, each token's input row (x, or ln(x)) once,
    with its position, cache slot and cos/sin row; q, gelu(fc_in) and the token's k and v written once. A
    kernel that normalises x itself (LN_W among its arguments) also reads the LayerNorm's weight and bias."""
    c, m = v.shape.config, v.tokens
    d, f, n = c.n_embd, c.n_inner, 3 * c.n_embd + c.n_inner
    weights = (n * d + n + (2 * d if v.has("LN_W") else 0)) * v.elem
    inputs = m * d * v.elem + m * (2 * _POSITION + c.rotary_dim * _ROTARY)
    outputs = m * (d + f + 2 * d) * v.elem
    return Cost(weights + inputs + outputs + _split_k_bytes(v, m, n), 2 * m * n * d)


def out_proj_cost(v: LaunchView) -> Cost:
    """[attn | gelu_h] @ w_out^T + bias + residual (K = d + f): the weight and bias, both inputs, the residual
    and the output once. A split-K launch whose partials another kernel reduces (no COUNTERS) leaves the
    residual and the output to that kernel."""
    c, m = v.shape.config, v.tokens
    d, k = c.n_embd, c.n_embd + c.n_inner
    total = (d * k + d + m * k) * v.elem + _split_k_bytes(v, m, d)
    if v.values.get("SPLIT_K", 1) == 1 or v.has("COUNTERS"):
        total += 2 * m * d * v.elem
    return Cost(total, 2 * m * d * k)


def _kv_bytes(v: LaunchView, ctxs: list[int]) -> int:
    """Each sequence's K and V over its context, and the block-table entries that locate them."""
    kv = 2 * sum(ctxs) * v.shape.config.n_embd * v.elem
    return kv + sum(-(-c // v.shape.block_size) for c in ctxs) * _INDEX


def decode_split_cost(v: LaunchView) -> Cost:
    """Decode attention's first kernel: each sequence's q, its K and V over its context and its length once,
    and the per-split partial outputs and softmax statistics written; QK^T and PV over every context."""
    ctxs, d = v.contexts(), v.shape.config.n_embd
    total = len(ctxs) * (d * v.elem + _INDEX) + _kv_bytes(v, ctxs) + v.nbytes("PART_OUT", "PART_MAX", "PART_SUM")
    return Cost(total, 4 * d * sum(ctxs))


def decode_combine_cost(v: LaunchView) -> Cost:
    """Decode (and verify) attention's second kernel: the partials read, each token's output written."""
    return Cost(v.nbytes("PART_OUT", "PART_MAX", "PART_SUM") + v.tokens * v.shape.config.n_embd * v.elem, 0)


def verify_split_cost(v: LaunchView) -> Cost:
    """Verify attention's first kernel: the step's queries, each sequence's K and V over its context, its length
    and start once, and the per-split partials written; QK^T and PV of every query over its context."""
    ctxs, d = v.contexts(), v.shape.config.n_embd
    per_row = v.tokens // max(len(ctxs), 1)
    total = v.tokens * d * v.elem + len(ctxs) * 2 * _INDEX + _kv_bytes(v, ctxs)
    return Cost(total + v.nbytes("PART_OUT", "PART_MAX", "PART_SUM"), 4 * d * per_row * sum(ctxs))


def prefill_attention_cost(v: LaunchView) -> Cost:
    """Causal prefill attention: q and the output once, each prompt's K and V, length and start once; QK^T and
    PV over the causal half (query i of a prompt sees i + 1 keys)."""
    ctxs, d = v.contexts(), v.shape.config.n_embd
    total = 2 * v.tokens * d * v.elem + _kv_bytes(v, ctxs) + (2 * len(ctxs) + 1) * _INDEX
    return Cost(total, 4 * d * sum(c * (c + 1) // 2 for c in ctxs))


# Every kernel the engine may launch, by function name. A kernel missing here stops the report (ReportError).
COST_MODELS: Mapping[str, Callable[[LaunchView], Cost]] = MappingProxyType(
    {
        "_layer_norm_kernel": layer_norm_cost,
        "_in_proj_kernel": in_proj_cost,
        "_prefill_kernel": prefill_attention_cost,
        "_split_kernel": decode_split_cost,
        "_combine_kernel": decode_combine_cost,
        "_verify_split_kernel": verify_split_cost,
        "_out_proj_kernel": out_proj_cost,
    }
)


def missing_cost_models(kernels: Iterable[str]) -> list[str]:
    """The kernels among `kernels` that COST_MODELS has no model for."""
    return [k for k in kernels if k not in COST_MODELS]


def launch_cost(view: LaunchView) -> Cost:
    """The launch's cost by its kernel's model; a ReportError for a kernel without one."""
    model = COST_MODELS.get(view.kernel)
    if model is None:
        raise ReportError(
            f"no cost model for kernel {view.kernel}: add one to COST_MODELS in benchmarks/kernel_report.py"
        )
    return model(view)


def roofline(cost: Cost, device: Device = H200) -> float:
    """Seconds at the device's measured ceilings: the slower of moving the bytes and doing the FLOPs."""
    return max(cost.bytes / device.bandwidth, cost.flops / device.matmul_rate)


# ---------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One launch: where it comes from, what the compiler made of it, and what it is predicted to cost.

    Fields from the compiled kernel and the occupancy model are None when
    the launch did not compile (`error` says why).
    """

    kernel: str
    model: str
    dtype: str
    step: str
    kind: str  # "decode", "verify" or "prefill" (kernel_launches.Step.kind)
    rows: int
    tokens: int
    grid: list
    programs: int
    bytes: int
    flops: int
    roofline_s: float
    ok: bool
    error: Optional[str] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    registers: Optional[int] = None
    local: Optional[int] = None
    stack: Optional[int] = None
    shared: Optional[int] = None
    resident_per_sm: Optional[int] = None
    occupancy_limit: Optional[str] = None
    waves: Optional[float] = None
    last_wave_fill: Optional[float] = None
    wave_loss: Optional[float] = None
    cp_async: Optional[bool] = None
    tma: Optional[bool] = None
    wgmma: Optional[bool] = None
    mma_sync: Optional[bool] = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Row":
        """A row from its JSON form (`dataclasses.asdict`)."""
        return cls(**d)


@dataclass(frozen=True)
class ReportConfig:
    """What the report covers and the device it predicts for."""

    models: tuple[str, ...] = kl.REAL_MODELS
    dtypes: tuple[str, ...] = ("float16", "bfloat16")
    decode_rows: tuple[int, ...] = (1, 8, 32, 64)
    verify_rows: tuple[int, ...] = (1, 8, 32, 64)  # k + 1 = 5 tokens each (speculative decoding)
    prefill_tokens: tuple[int, ...] = (512, 2048)
    arch: int = 90
    device: Device = H200


# --quick: the smallest and largest decode and verify batch and one prefill: every kernel, fewer specialisations.
QUICK_DECODE_ROWS = (1, 64)
QUICK_PREFILL_TOKENS = (512,)


def make_row(launch: kl.Launch, shape: kl.EngineShape, step: kl.Step, compiled: Compiled | str, device: Device) -> Row:
    """The row of one launch; `compiled` is its specialisation's compile, or the error it failed with."""
    values, _ = kl.arguments(launch)
    name = launch.kernel.fn.__name__
    grid = [int(g) for g in launch.grid]
    cost = launch_cost(LaunchView(name, values, tuple(grid), shape, step))
    fields: dict[str, Any] = dict(
        kernel=name, model=shape.label, dtype=str(shape.dtype).removeprefix("torch."), step=str(step),
        kind=step.kind, rows=step.rows, tokens=step.tokens, grid=grid, programs=math.prod(grid),
        bytes=cost.bytes, flops=cost.flops, roofline_s=roofline(cost, device), ok=isinstance(compiled, Compiled),
    )  # fmt: skip
    if isinstance(compiled, str):
        return Row(**fields, error=compiled)
    occ = occupancy(compiled.registers, compiled.num_warps, compiled.shared, device)
    waves, fill = wave_fill(fields["programs"], device.sms * occ.resident, device.sms)
    used = {k: getattr(compiled, k) for k in ("num_warps", "num_stages", "registers", "local", "stack", "shared")}
    return Row(
        **fields, **used, **dataclasses.asdict(compiled.pipeline),
        resident_per_sm=occ.resident, occupancy_limit=occ.limiter, waves=waves, last_wave_fill=fill,
        wave_loss=wave_loss(waves, fill),
    )  # fmt: skip


def build_report(config: ReportConfig, progress: Callable[[str], None] = lambda line: None) -> list[Row]:
    """Every launch of every (model, dtype, step) of `config`, compiled (once per specialisation) and costed."""
    missing = missing_cost_models(name for _, name in kl.KERNELS)
    if missing:
        raise ReportError(
            f"no cost model for kernel {', '.join(missing)}: add one to COST_MODELS in benchmarks/kernel_report.py"
        )
    compiled: dict[str, Compiled | str] = {}
    rows = []
    for model in config.models:
        for dtype in config.dtypes:
            (shape,) = kl.engine_shapes([model], [getattr(torch, dtype)], test_shapes=False, num_sms=config.device.sms)
            for step in kl.engine_steps(shape, config.decode_rows, config.prefill_tokens, config.verify_rows):
                for launch in kl.record_launches(shape, [step]):
                    key = kl.specialization_key(launch)
                    if key not in compiled:
                        start = time.monotonic()
                        try:
                            compiled[key] = compile_launch(launch, config.arch)
                        except Exception as e:  # report every failure, not just the first
                            compiled[key] = f"{type(e).__name__}: {e}"[:2000]
                        progress(f"[{len(compiled):3d}] {time.monotonic() - start:5.1f}s {launch.name}")
                    rows.append(make_row(launch, shape, step, compiled[key], config.device))
    return rows


@dataclass(frozen=True)
class StepSummary:
    """One (model, dtype, step): its launches per layer and the predicted floor of the whole step."""

    model: str
    dtype: str
    step: str
    n_layer: int
    launches: int  # per layer
    bytes: int  # per layer
    flops: int  # per layer
    floor_s: float  # the step: n_layer x the layer's roofline times
    with_waves_s: float  # the same, each launch's time scaled by its wave factor (None waves: as the floor)


def _groups(rows: Sequence[Row]) -> dict[tuple[str, str, str], list[Row]]:
    """The rows by (model, dtype, step), in their order."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.model, r.dtype, r.step), []).append(r)
    return groups


def summarize(rows: Sequence[Row]) -> list[StepSummary]:
    """Per (model, dtype, step), in the rows' order: one layer's launches times the real model's n_layer."""
    out = []
    for (model, dtype, step), group in _groups(rows).items():
        n_layer = MODELS[model].n_layer
        floor = sum(r.roofline_s for r in group)
        waved = sum(
            r.roofline_s * (wave_factor(r.waves, r.last_wave_fill) if r.waves is not None else 1.0) for r in group
        )
        out.append(
            StepSummary(
                model, dtype, step, n_layer, len(group), sum(r.bytes for r in group), sum(r.flops for r in group),
                n_layer * floor, n_layer * waved,
            )  # fmt: skip
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Design rules
# ---------------------------------------------------------------------------------------------------------


GEMM_KERNELS = frozenset({"_in_proj_kernel", "_out_proj_kernel"})
DECODE_SPLIT_KERNELS = frozenset({"_in_proj_kernel", "_out_proj_kernel", "_split_kernel"})
MAIN_LOOP_KERNELS = frozenset(
    {"_in_proj_kernel", "_out_proj_kernel", "_prefill_kernel", "_split_kernel", "_verify_split_kernel"}
)
MAX_STACK = 64  # bytes: ptxas's own frame for calls; local memory (spills) must be 0
WGMMA_MIN_TOKENS = 512


@dataclass(frozen=True)
class Rule:
    """A design rule: it `applies` to some rows, and `holds` on each of them; `shows` gives a row's numbers."""

    name: str
    description: str
    applies: Callable[[Row], bool]
    holds: Callable[[Row], bool]
    shows: Callable[[Row], str]


def _flags(r: Row) -> str:
    return f"cp.async={r.cp_async} tma={r.tma} wgmma={r.wgmma} mma.sync={r.mma_sync} stages={r.num_stages}"


RULES: tuple[Rule, ...] = (
    Rule(
        "compiles", "every launch compiles for the target",
        applies=lambda r: True, holds=lambda r: r.ok, shows=lambda r: r.error or "",
    ),
    Rule(
        "no-spills", f"no local memory (spills) and at most {MAX_STACK} bytes of stack",
        applies=lambda r: r.ok, holds=lambda r: r.local == 0 and r.stack <= MAX_STACK,
        shows=lambda r: f"local={r.local} stack={r.stack} registers={r.registers}",
    ),
    Rule(
        "fits-on-sm", "at least one program fits on an SM (registers, shared memory)",
        applies=lambda r: r.ok, holds=lambda r: r.resident_per_sm >= 1,
        shows=lambda r: f"registers={r.registers} shared={r.shared} warps={r.num_warps}",
    ),
    Rule(
        "decode-fills-waves",
        f"decode GEMMs and the split kernels of decode and verify attention run at least {MIN_WAVES} waves or "
        f"fill at least {MIN_LAST_WAVE_FILL:.0%} of their last",
        applies=lambda r: r.ok and (
            (r.kind == "decode" and r.kernel in DECODE_SPLIT_KERNELS)
            or (r.kind == "verify" and r.kernel == "_verify_split_kernel")
        ),
        holds=lambda r: meets_wave_rule(r.waves, r.last_wave_fill),
        shows=lambda r: f"programs={r.programs} resident/SM={r.resident_per_sm} ({r.occupancy_limit}) "
        f"waves={r.waves:.2f} last wave {r.last_wave_fill:.0%} full",
    ),
    Rule(
        "pipelined-main-loop", "the GEMMs' and attention's main loops load through cp.async or TMA",
        applies=lambda r: r.ok and r.kernel in MAIN_LOOP_KERNELS, holds=lambda r: r.cp_async or r.tma, shows=_flags,
    ),
    Rule(
        "wgmma-prefill-gemm", f"the GEMMs of prefill steps of {WGMMA_MIN_TOKENS}+ tokens use wgmma",
        applies=lambda r: r.ok and r.kernel in GEMM_KERNELS and r.kind == "prefill" and r.tokens >= WGMMA_MIN_TOKENS,
        holds=lambda r: r.wgmma, shows=_flags,
    ),
    Rule(
        "wgmma-prefill-attention", "prefill attention uses wgmma",
        applies=lambda r: r.ok and r.kernel == "_prefill_kernel", holds=lambda r: r.wgmma, shows=_flags,
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Violation:
    """A row breaking a rule, or (row None) a rule that applied to no row at all."""

    rule: str
    row: Optional[Row]
    detail: str

    def __str__(self) -> str:
        if self.row is None:
            return f"{self.rule}: {self.detail}"
        r = self.row
        return f"{self.rule}: {r.kernel} {r.model} {r.dtype} {r.step}: {self.detail}"


def check(rows: Sequence[Row], rules: Sequence[Rule] = RULES) -> list[Violation]:
    """Every violation of `rules` among `rows`; a rule that applies to no row is one too (a renamed kernel)."""
    found = []
    for rule in rules:
        applicable = [r for r in rows if rule.applies(r)]
        if not applicable:
            found.append(Violation(rule.name, None, "applies to no launch: a kernel renamed or gone?"))
        found += [Violation(rule.name, r, rule.shows(r)) for r in applicable if not rule.holds(r)]
    return found


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def _yes(flag: Optional[bool]) -> str:
    return "-" if flag is None else ("y" if flag else ".")


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


_COLUMNS = (
    # (header, width, cell)
    ("kernel", 22, lambda r: r.kernel),
    ("grid", 14, lambda r: "x".join(map(str, r.grid))),
    ("progs", 6, lambda r: str(r.programs)),
    ("warps", 5, lambda r: _fmt(r.num_warps, "d")),
    ("stg", 3, lambda r: _fmt(r.num_stages, "d")),
    ("regs", 4, lambda r: _fmt(r.registers, "d")),
    ("smem_KB", 7, lambda r: _fmt(None if r.shared is None else r.shared / 1024, ".1f")),
    ("lcl/stk", 7, lambda r: "-" if r.local is None else f"{r.local}/{r.stack}"),
    ("res/SM", 6, lambda r: _fmt(r.resident_per_sm, "d")),
    ("waves", 6, lambda r: _fmt(r.waves, ".2f")),
    ("fill", 4, lambda r: _fmt(None if r.last_wave_fill is None else 100 * r.last_wave_fill, ".0f")),
    ("loss", 4, lambda r: _fmt(None if r.wave_loss is None else 100 * r.wave_loss, ".0f")),
    ("cpA", 3, lambda r: _yes(r.cp_async)),
    ("TMA", 3, lambda r: _yes(r.tma)),
    ("wgmma", 5, lambda r: _yes(r.wgmma)),
    ("mma", 3, lambda r: _yes(r.mma_sync)),
    ("MB", 8, lambda r: f"{r.bytes / 1e6:.2f}"),
    ("GFLOP", 8, lambda r: f"{r.flops / 1e9:.2f}"),
    ("floor_us", 8, lambda r: f"{r.roofline_s * 1e6:.2f}"),
)
_LEGEND = (
    "grid: programs per axis; stg: pipeline stages; smem: shared memory per program; lcl/stk: local (spill) "
    "and stack bytes; res/SM: programs resident per SM; fill: % of the last wave's slots busy; loss: % of the "
    "launch's time its idle wave slots take; cpA/TMA/wgmma/mma: cp.async, TMA, wgmma, mma.sync in the code "
    "(y/.); MB, GFLOP: bytes and matrix FLOPs the launch must move and do; floor: their roofline time."
)


def format_text(rows: Sequence[Row], summary: Sequence[StepSummary], device: Device = H200) -> str:
    """The report as plain text: launches grouped by model, dtype and step, then the step floors."""
    lines = []
    header = " ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w, _) in enumerate(_COLUMNS))
    for (model, dtype, step), group in _groups(rows).items():
        lines += ["", f"{model} {dtype} {step}", "  " + header]
        for r in group:
            if not r.ok:
                lines.append(f"  {r.kernel:<22} FAILED: {r.error}")
                continue
            lines.append("  " + " ".join(c(r).rjust(w) if i else c(r).ljust(w) for i, (_, w, c) in enumerate(_COLUMNS)))
    lines += ["", _LEGEND, "", f"Step floors on {device.name} (Triton launches of all layers):"]
    lines.append(f"  {'model':<18} {'dtype':<9} {'step':<20} {'layers':>6} {'launches':>8} {'floor_ms':>9} "
                 f"{'waves_ms':>9}")  # fmt: skip
    for s in summary:
        lines.append(f"  {s.model:<18} {s.dtype:<9} {s.step:<20} {s.n_layer:>6} {s.n_layer * s.launches:>8} "
                     f"{s.floor_s * 1e3:>9.3f} {s.with_waves_s * 1e3:>9.3f}")  # fmt: skip
    return "\n".join(lines).lstrip("\n")


def source_commit(root: Path = ROOT) -> str:
    """`git rev-parse --short HEAD`, and the files among SOURCES (kernels, package, report) that differ from it."""
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run([*git, "status", "--porcelain", "--", *SOURCES], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = [line[3:].split(" -> ")[-1] for line in status.stdout.splitlines() if line.strip()]
    if not changed:
        return head.stdout.strip()
    return f"{head.stdout.strip()} + uncommitted changes ({', '.join(changed)})"


def provenance(config: ReportConfig) -> dict[str, str]:
    """What a committed report was made from: date, commit, Triton, Python, and the device model."""
    import triton

    d = config.device
    return {
        "date": datetime.date.today().isoformat(),
        "commit": source_commit(),
        "triton": triton.__version__,
        "python": platform.python_version(),
        "target": f"sm_{config.arch} (cuda, warp 32)",
        "device": f"{d.name}: {d.sms} SMs, {d.bandwidth / 1e12:.2f} TB/s copy bandwidth, "
        f"{d.matmul_rate / 1e12:.0f} TFLOP/s bf16 matmul (both measured); per SM {d.registers_per_sm} registers "
        f"(granularity {d.register_granularity} per warp), {d.shared_per_sm // 1024} KB shared memory "
        f"({d.reserved_shared_per_block // 1024} KB reserved per program, at most {d.max_shared_per_block // 1024} "
        f"KB per program), {d.max_threads_per_sm} threads, {d.max_blocks_per_sm} programs",
    }


def format_markdown(
    rows: Sequence[Row],
    summary: Sequence[StepSummary],
    violations: Sequence[Violation],
    config: ReportConfig,
    command: str,
) -> str:
    """The report as a markdown document with a header saying what it is, what it was made from and how."""
    p = provenance(config)
    out = [
        f"# Static kernel report, sm_{config.arch}, {config.device.name}",
        "",
        "A prediction from compiled code, not a measurement: every Triton kernel launch the engine makes at the real "
        "shapes, compiled ahead of time with Triton's compiler and ptxas (no GPU), with what the compiler made of "
        "it, its occupancy and waves on the device, and the roofline time of the bytes and FLOPs it cannot avoid "
        "(`benchmarks/kernel_report.py` says how each is computed).",
        "",
        f"- date: {p['date']}",
        f"- commit: {p['commit']}",
        f"- Triton {p['triton']}, Python {p['python']}, target {p['target']}",
        f"- device model: {p['device']}",
        f"- launches: decode steps of {', '.join(map(str, config.decode_rows))} rows and verify steps of "
        f"{', '.join(map(str, config.verify_rows))} rows of {kl.VERIFY_TOKENS_PER_ROW} tokens (every sequence at a "
        f"context of max_model_len = 2048), prefill steps of {', '.join(map(str, config.prefill_tokens))} tokens (one "
        f"prompt each); {', '.join(config.dtypes)}; one layer's launches, times the model's layer count in the "
        "step floors",
        f"- made with: `{command}`",
        "",
        "## Step floors",
        "",
        "The Triton launches of every layer of one step at the device's ceilings; *with waves* scales each launch "
        "by 1 / fill for a grid of one wave (its busiest SM sets the time) and by ceil(waves) / waves up to 4 "
        "waves. Embedding, final LayerNorm and lm_head (library calls) are not included.",
        "",
        "| model | dtype | step | layers | launches | MB / layer | GFLOP / layer | floor ms | with waves ms |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for s in summary:
        out.append(
            f"| {s.model} | {s.dtype} | {s.step} | {s.n_layer} | {s.n_layer * s.launches} | {s.bytes / 1e6:.1f} | "
            f"{s.flops / 1e9:.1f} | {s.floor_s * 1e3:.3f} | {s.with_waves_s * 1e3:.3f} |"
        )
    out += ["", "## Design rules", ""]
    for rule in RULES:
        broken = [v for v in violations if v.rule == rule.name]
        out.append(f"- **{rule.name}** ({rule.description}): " + (f"{len(broken)} violations" if broken else "holds"))
    if violations:
        out += ["", "| rule | kernel | model | dtype | step | numbers |", "|---|---|---|---|---|---|"]
        for v in violations:
            r = v.row
            where = "| - | - | - | - " if r is None else f"| {r.kernel} | {r.model} | {r.dtype} | {r.step} "
            out.append(f"| {v.rule} {where}| {v.detail} |")
    out += ["", "## Launches", "", _LEGEND, ""]
    for (model, dtype, step), group in _groups(rows).items():
        out += [f"### {model} {dtype} {step}", ""]
        out.append("| " + " | ".join(h for h, _, _ in _COLUMNS) + " |")
        out.append("|---|" + "--:|" * (len(_COLUMNS) - 1))
        for r in group:
            if r.ok:
                cells = [c(r) for _, _, c in _COLUMNS]
            else:
                cells = [r.kernel, f"FAILED: {r.error}"] + [""] * (len(_COLUMNS) - 2)
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    """The command line: prints the report, writes it as markdown if asked; returns the exit status.

    0: every launch compiled (and, with --check, every rule holds); 1: a
    launch failed to compile or a rule is broken; 2: the report cannot be
    made (TRITON_INTERPRET set, a kernel without a cost model).
    """
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"])
    p.add_argument("--models", nargs="+", default=list(kl.REAL_MODELS), choices=list(kl.REAL_MODELS))
    p.add_argument("--device", default=H200.name, choices=list(DEVICES), help="the device model")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of a table")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as markdown to FILE")
    p.add_argument("--quick", action="store_true", help="decode 1 and 64 rows, prefill 512 tokens only")
    p.add_argument("--check", action="store_true", help="exit 1 if a design rule is broken, printing each")
    p.add_argument("--progress", action="store_true", help="a line on stderr per compiled specialisation")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: kernel_report.py compiles kernels: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    # Compile as Triton 3.6 does by default (fused multiply-adds); Triton 3.9 warns while it is unset and 3.10
    # turns it off. Set only in this script's own process: a process that fills or reads a kernel cache for a
    # GPU run must leave it unset, as the variable enters every cache key (tools/warm_triton_cache.py).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    config = ReportConfig(
        models=tuple(args.models), dtypes=tuple(args.dtypes), arch=args.arch, device=DEVICES[args.device]
    )
    if args.quick:
        config = dataclasses.replace(
            config, decode_rows=QUICK_DECODE_ROWS, verify_rows=QUICK_DECODE_ROWS, prefill_tokens=QUICK_PREFILL_TOKENS
        )

    def progress(line: str) -> None:
        if args.progress:
            print(line, file=sys.stderr, flush=True)

    start = time.monotonic()
    try:
        rows = build_report(config, progress)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(rows)
    violations = check(rows)
    print(f"{len(rows)} launches in {time.monotonic() - start:.0f} s", file=sys.stderr)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
    else:
        print(format_text(rows, summary, config.device))
    if args.markdown:
        command = shlex.join(["python", "benchmarks/kernel_report.py", *argv])
        Path(args.markdown).write_text(format_markdown(rows, summary, violations, config, command))
    if args.check:
        for v in violations:
            print(f"violation: {v}", file=sys.stderr)
        if violations:
            return 1
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
