"""Launch settings shared by the kernels: tile plans, split counts, dot precision, the GPU's size.

Every kernel's host wrapper takes its block sizes, warps, pipeline depth and
grid from here, so one file says how the engine's launches are shaped and
`benchmarks/kernel_report.py` checks what the compiler made of them: the
projections' `GemmPlan` (`projection_plan`), prefill attention's
`PrefillTiles`, decode attention's `DecodeTiles` and split count
(`num_splits`).

The projections' plan (`gemm_plan`) is chosen by a small cost model rather
than a table: decode steps multiply a handful of rows by a large weight, so
their time is the time to stream the weight, and what matters is that every
SM streams the same share. A launch runs in waves of `sms x resident`
programs; a wave that is partly empty leaves SMs idle while it lasts. Split-K
turns one column tile into several programs over slices of K (reduced in
the same launch, see `split_k.py`), so the plan searches block width, K tile
and split count for the grid whose slowest SM streams the least. Prefill
GEMMs are matmul-bound: their plan picks the tile (128x128 or 64x128) and
split count that leave the busiest SM the least matmul work.

The constants below that price overheads and efficiencies are estimates,
written down as such; measurements on a GPU are what should replace them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

# H100 SXM and H200: the SM count plans assume when no device is at hand (tests, the static report).
DEFAULT_NUM_SMS = 132
# Planning the interpreter's launches for 132 SMs would only multiply its programs, each run in Python.
INTERPRETER_SMS = 4
SHARED_MEMORY_PER_SM = 228 * 1024  # bytes, 1 KiB of it reserved per resident program
MAX_PROGRAMS_PER_SM = 32
# A program's fixed cost (launch, prologue, the pipeline's first loads, the epilogue) as bytes of weight it
# could have streamed meanwhile: about one memory latency (~1 us) at one SM's share of 4.3 TB/s / 132.
PROGRAM_OVERHEAD_BYTES = 16 * 1024
# A main-loop iteration's fixed cost (waiting on its stage, a barrier, address arithmetic: ~150 cycles) the
# same way: an SM streams ~16 bytes per cycle. Long K tiles amortise it; tiny ones drown in it.
ITERATION_OVERHEAD_BYTES = 2 * 1024
# FLOPs an H100/H200 does in the time it moves a byte (788 TFLOP/s bf16 matmul over 4.3 TB/s, both measured on
# an H200): prices the float32 partial sums a prefill split-K writes and reads against the matmul work it saves.
MACHINE_BALANCE = 183
# A prefill GEMM splits K only while its programs fit in this many waves of one per SM: split-K serves grids
# too small for the SMs, and it bounds the partial sums' scratch (`split_k_scratch_bytes`).
PREFILL_SPLIT_MAX_WAVES = 4
# The fewest waves, and the least filled last wave, a decode launch may have (benchmarks/kernel_report.py).
MIN_WAVES = 4
MIN_LAST_WAVE_FILL = 0.9


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision: exact float32 products for float32 tensors, tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreted_on(device: torch.device) -> bool:
    """Whether the kernels on `device` run in Triton's interpreter (the CPU): plans then have the fewest programs."""
    return device.type == "cpu"


def device_sms(device: torch.device) -> int:
    """The SM count to plan for: a CUDA device's own; INTERPRETER_SMS on the CPU, where Triton's interpreter runs
    the programs one after another; `DEFAULT_NUM_SMS` elsewhere (meta tensors: plans made for an H100/H200)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "cpu":
        return INTERPRETER_SMS
    return DEFAULT_NUM_SMS


def resident_per_sm(shared_bytes: int, num_warps: int, registers: int = 0) -> int:
    """Programs one SM holds at once, by shared memory, threads and (when known) registers per thread.

    Registers are allocated per warp in units of 256 from 64 Ki per SM.
    """
    by_shared = SHARED_MEMORY_PER_SM // (shared_bytes + 1024)
    by_threads = 2048 // (32 * num_warps)
    by_registers = MAX_PROGRAMS_PER_SM
    if registers:
        per_warp = -(-registers * 32 // 256) * 256
        by_registers = (65536 // per_warp) // num_warps
    return max(1, min(MAX_PROGRAMS_PER_SM, by_shared, by_threads, by_registers))


def wave_fill(programs: int, slots: int, sms: int | None = None) -> tuple[float, float]:
    """(waves, how full the last wave is) of `programs` over `slots` resident programs at once.

    The fill is the share of the last wave's slots that are busy. With `sms`
    given, a grid that fits in one wave is judged by its SMs instead: the
    block scheduler spreads it over them, every program resident at once, and
    the SM with the most programs sets the time, so the fill is programs over
    sms x that most (512 programs on 132 SMs: 4 on some, 512 / 528 = 97%).
    """
    if slots <= 0:
        return math.inf, 0.0  # nothing fits: no wave ever ends
    waves = programs / slots
    if sms and programs <= slots:
        return waves, programs / (math.ceil(programs / sms) * sms)
    last = programs - (math.ceil(waves) - 1) * slots
    return waves, last / slots


def meets_wave_rule(waves: float, fill: float) -> bool:
    """The decode rule on `wave_fill`'s (waves, fill): at least MIN_WAVES waves, or a last wave at least
    MIN_LAST_WAVE_FILL full."""
    return waves >= MIN_WAVES or fill >= MIN_LAST_WAVE_FILL


def fills_waves(programs: int, slots: int, sms: int | None = None) -> bool:
    """Whether `programs` over `slots` resident programs on `sms` SMs keep the decode rule (`meets_wave_rule`)."""
    return meets_wave_rule(*wave_fill(programs, slots, sms))


def split_k_scratch_bytes(n: int, sms: int = DEFAULT_NUM_SMS) -> int:
    """An upper bound of a projection's split-K partials (float32) over n output columns."""
    decode = _MAX_SPLIT_K * _DECODE_SHAPES[-1][0] * (n + max(_DECODE_BLOCK_N)) * 4
    prefill = PREFILL_SPLIT_MAX_WAVES * sms * max(t[0] * t[1] for t in _PREFILL) * 4
    return max(decode, prefill)


def split_k_tiles(n: int, sms: int = DEFAULT_NUM_SMS) -> int:
    """The most output tiles a split launch has over n columns: the size of its arrival counters."""
    return max(-(-n // (min(_DECODE_BLOCK_N) // 2)), PREFILL_SPLIT_MAX_WAVES * sms)


@dataclass(frozen=True)
class GemmPlan:
    """How a projection is launched: tiles, K splits, warps, pipeline depth."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int

    def shared_bytes(self, elem: int) -> int:
        """Shared memory of the operand pipeline: buffers of an A and a B tile.

        Triton keeps num_stages of them where wgmma (64+ rows) reads shared
        memory asynchronously, num_stages - 1 for mma.sync.
        """
        buffers = self.num_stages if self.block_m >= 64 else max(1, self.num_stages - 1)
        return buffers * (self.block_m + self.block_n) * self.block_k * elem


# Tile shapes by the number of rows (M). Up to 16 rows a 16-row tile is the smallest `tl.dot` takes; the
# weight is streamed through long K tiles, 4 deep. 17-64 rows: one 64-row tile, the smallest wgmma runs.
# Above: 128x128 tiles over 64-wide K, 3 deep, eight warps (two warpgroups), Hopper's matmul shape, or
# 64x128 tiles with one warpgroup where the larger ones would leave SMs with less work than others.
_DECODE_SHAPES = ((16, 4, 4), (64, 4, 3))  # (largest M, warps, stages)
_DECODE_BLOCK_N = (64, 32, 128)
_DECODE_BLOCK_K = (256, 128)
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, assumed matmul efficiency relative to the first): a 64-row tile
# reuses each B tile half as often; 0.9 is an assumption for the plan, to be replaced by a measured value.
_PREFILL = ((128, 128, 64, 8, 3, 1.0), (64, 128, 64, 4, 3, 0.9))
_MAX_SPLIT_K = 16


def interpreter_plan(m: int) -> GemmPlan:
    """The fewest programs: Triton's interpreter runs them one after another in Python, where a tile's size costs
    little and each program much (the engine on the CPU; the kernel tests check `gemm_plan`'s own plans)."""
    return GemmPlan(16 if m <= 16 else 64, 128, 128, 1, 4, 3)


def column_tiles(block_n: int, rotary_columns: int, plain_columns: int) -> int:
    """A projection's column tiles: a rotary tile holds block_n / 2 columns and their partners, a plain one block_n."""
    return -(-rotary_columns // (block_n // 2)) + -(-plain_columns // block_n)


@functools.lru_cache(maxsize=None)  # launches ask again every layer and step: plan each shape once
def gemm_plan(
    m: int, k: int, rotary_columns: int, plain_columns: int, elem: int, sms: int = DEFAULT_NUM_SMS
) -> GemmPlan:
    """The plan for an [m, k] x [k, n] projection whose n columns are `rotary_columns` in rotary pairs (in_proj's
    Q1|K1, `column_tiles`) and `plain_columns` others.

    Prefill-sized M gets the matmul tile and split count whose busiest SM
    has the least work (a compute-bound grid: ceil(programs / sms) tiles of
    it), the partial sums' traffic priced at MACHINE_BALANCE. Decode-sized M
    gets the
    (block_n, block_k, split_k) whose slowest SM streams the fewest bytes,
    with PROGRAM_OVERHEAD_BYTES per program and ITERATION_OVERHEAD_BYTES per
    main-loop iteration, among the plans that fill their
    waves (`fills_waves`) when any does.
    """
    if m > _DECODE_SHAPES[-1][0]:
        best, best_cost = None, None
        for bm, bn, bk, warps, stages, efficiency in _PREFILL:
            tiles, k_tiles = -(-m // bm) * column_tiles(bn, rotary_columns, plain_columns), -(-k // bk)
            for split in (1, 2, 3, 4):
                programs = tiles * split
                if split > 1 and (k_tiles < 8 * split or programs > PREFILL_SPLIT_MAX_WAVES * sms):
                    break
                busiest = -(-programs // sms) * 2 * bm * bn * bk * -(-k_tiles // split) / efficiency
                partials = 0 if split == 1 else 2 * programs * bm * bn * 4 * MACHINE_BALANCE / sms
                if best_cost is None or busiest + partials < best_cost:
                    best, best_cost = GemmPlan(bm, bn, bk, split, warps, stages), busiest + partials
        return best
    bm, warps, stages = next((max(16, s[0]), s[1], s[2]) for s in _DECODE_SHAPES if m <= s[0])
    best, best_key = None, None
    for bn in _DECODE_BLOCK_N:
        for bk in _DECODE_BLOCK_K:
            k_tiles = -(-k // bk)
            tiles = column_tiles(bn, rotary_columns, plain_columns)
            plan0 = GemmPlan(bm, bn, bk, 1, warps, stages)
            slots = sms * resident_per_sm(plan0.shared_bytes(elem), warps)
            for split in range(1, min(_MAX_SPLIT_K, k_tiles) + 1):
                programs = tiles * split
                iters = -(-k_tiles // split)
                per_program = iters * (bk * bn * elem + ITERATION_OVERHEAD_BYTES) + PROGRAM_OVERHEAD_BYTES
                slowest = -(-programs // slots) * per_program
                key = (not fills_waves(programs, slots, sms), slowest, split)
                if best_key is None or key < best_key:
                    best, best_key = GemmPlan(bm, bn, bk, split, warps, stages), key
    return best


def projection_plan(
    m: int,
    k: int,
    rotary_columns: int,
    plain_columns: int,
    elem: int,
    num_sms: int = DEFAULT_NUM_SMS,
    interpreted: bool = False,
    split_k: int | None = None,
) -> GemmPlan:
    """The plan a projection launch runs: `interpreter_plan` in Triton's interpreter, else `gemm_plan` for
    `num_sms` SMs; `split_k`, when given, overrides its number of K splits."""
    if interpreted:
        plan = interpreter_plan(m)
    else:
        plan = gemm_plan(m, k, rotary_columns, plain_columns, elem, num_sms)
    return plan if split_k is None else dataclasses.replace(plan, split_k=split_k)


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def head_dim_parts(head_dim: int) -> tuple[int, int]:
    """Prefill attention's (HD_A, HD_B): head_dim as a power of two plus a smaller power of two (or 0); else
    padded up.

    80 = 64 + 16 costs 80 columns of MMA work where padding to 128 would cost 128.
    """
    whole = _next_power_of_2(head_dim)
    if whole == head_dim or head_dim < 16:
        return max(16, whole), 0
    rest = head_dim - whole // 2
    if rest == _next_power_of_2(rest) or rest < 16:  # under 16 the second part pads to 16
        return whole // 2, rest
    return whole, 0


@dataclass(frozen=True)
class PrefillTiles:
    """Prefill attention's query rows and keys per tile, warps and pipeline depth, by head size."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @staticmethod
    def of(head_dim: int) -> "PrefillTiles":
        # 64-row query tiles, the size wgmma takes (one warpgroup per 64 rows): larger ones leave a
        # 512-token prompt too few programs for 132 SMs. A 256-wide head takes 32 keys a tile and eight
        # warps, so the float32 accumulator and three stages of K and V fit without spilling.
        if head_dim > 128:
            return PrefillTiles(64, 32, 8, 3)
        return PrefillTiles(64, 64, 4, 3)


def decode_head_dim_pad(head_dim: int) -> int:
    """Decode attention's head size in registers: the next power of two, at least 16."""
    return max(16, _next_power_of_2(head_dim))


@dataclass(frozen=True)
class DecodeTiles:
    """Keys per tile, warps, pipeline depth and registers of decode attention's split kernel, by padded head size."""

    block_n: int
    num_warps: int
    num_stages: int
    registers: int  # per thread, as ptxas allocates them for sm_90 (benchmarks/kernel_report.py shows them)

    @staticmethod
    def of(head_dim_pad: int) -> "DecodeTiles":
        # 64 keys of a head up to 128 wide or 32 of a 256-wide one: 16-32 KiB of K and V per tile.
        if head_dim_pad <= 64:
            return DecodeTiles(64, 4, 3, 64)
        if head_dim_pad <= 128:
            return DecodeTiles(64, 4, 3, 96)
        return DecodeTiles(32, 4, 3, 120)

    def shared_bytes(self, head_dim_pad: int, elem: int) -> int:
        # num_stages - 1 buffers of a K and a V tile, and the query.
        return ((self.num_stages - 1) * 2 * self.block_n + 16) * head_dim_pad * elem

    def resident_per_sm(self, head_dim_pad: int, elem: int) -> int:
        return resident_per_sm(self.shared_bytes(head_dim_pad, elem), self.num_warps, self.registers)


@functools.lru_cache(maxsize=None)  # asked every layer and step: plan each batch size once
def num_splits(
    batch: int, heads: int, max_context: int, head_dim: int = 128, elem: int = 2, num_sms: int = DEFAULT_NUM_SMS
) -> int:
    """Decode attention's splits per (sequence, head): enough programs to occupy every resident slot, in whole waves.

    Depends on the batch size, the geometry and the engine's context limit
    (`max_model_len`: never more splits than tiles of it), not on any
    sequence's length, so a captured CUDA graph stays valid. The fewest
    splits whose programs fill at least MIN_LAST_WAVE_FILL of the SMs'
    resident slots and keep `fills_waves`: attention streams the cache, and
    a program in every slot keeps the most loads in flight. When the context
    limit allows too few, the most that keep the rule.
    """
    hd_pad = decode_head_dim_pad(head_dim)
    tiles = DecodeTiles.of(hd_pad)
    slots = num_sms * tiles.resident_per_sm(hd_pad, elem)
    most = max(1, min(-(-max_context // tiles.block_n), 64))
    keeping_rule = [s for s in range(1, most + 1) if fills_waves(batch * heads * s, slots, num_sms)]
    for splits in keeping_rule:
        if batch * heads * splits >= MIN_LAST_WAVE_FILL * slots:
            return splits
    if keeping_rule:
        return keeping_rule[-1]
    return max(range(1, most + 1), key=lambda s: wave_fill(batch * heads * s, slots, num_sms)[1])
