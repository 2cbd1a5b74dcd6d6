"""The static kernel report: every launch compiles for sm_90 and keeps the design rules; its arithmetic is right.

The report (`benchmarks/kernel_report.py`) runs Triton's real compiler and
ptxas in its own process (the kernels must be compiled functions, not the
interpreter's) over the engine's launches at the real 350M-16B shapes. Here
its rows are checked against `RULES`, the same rules its `--check` applies:
no spills, decode launches that fill their waves, pipelined main loops,
wgmma in the prefill GEMMs and attention. The pure parts (occupancy, waves,
the PTX/TTGIR flags, the cost model) are checked against values worked out
by hand from the CUDA occupancy rules and the launches' shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import kernel_launches as kl  # noqa: E402
import kernel_report as kr  # noqa: E402

KB = 1024


# ---------------------------------------------------------------------------------------------------------
# The report over the real launches (one compile run, in a subprocess, shared by the tests below)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report() -> tuple[subprocess.CompletedProcess, list[kr.Row]]:
    """`kernel_report.py --quick --json` in its own process: about 100 s on two cores with an empty Triton
    cache (~/.triton/cache), seconds with a warm one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = subprocess.run(
        [sys.executable, str(BENCHMARKS / "kernel_report.py"), "--arch", "90", "--quick", "--json"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert p.stdout.strip(), p.stderr[-3000:]
    rows = [kr.Row.from_dict(d) for d in json.loads(p.stdout.strip().splitlines()[-1])]
    return p, rows


def test_every_launch_compiles_for_sm90(report):
    p, rows = report
    failed = [r for r in rows if not r.ok]
    assert not failed, "\n".join(f"{r.kernel} {r.model} {r.dtype} {r.step}: {r.error}" for r in failed)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {r.kernel for r in rows} == {name for _, name in kl.KERNELS}
    for dtype in ("float16", "bfloat16"):
        for model in kl.REAL_MODELS:
            steps = {r.step for r in rows if r.model == model and r.dtype == dtype}
            assert steps == {
                "decode rows=1", "decode rows=64", "verify rows=1 tokens=5", "verify rows=64 tokens=320",
                "prefill tokens=512",
            }, (model, dtype)  # fmt: skip


@pytest.mark.parametrize("rule", kr.RULES, ids=lambda rule: rule.name)
def test_design_rule(report, rule):
    _, rows = report
    violations = kr.check(rows, [rule])
    assert not violations, f"{len(violations)} violations of {rule.name} ({rule.description}):\n" + "\n".join(
        map(str, violations[:40])
    )


# ---------------------------------------------------------------------------------------------------------
# Occupancy and waves, against the CUDA occupancy calculator's rules worked by hand (H200: 65536 registers in
# four quarters, 256-register granularity per warp; 228 KB shared, 1 KB reserved per block; 64 warps; 32 blocks)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "registers, warps, shared, resident, limiter",
    [
        # 128 x 32 = 4096 per warp; a quarter (16384) holds 4 warps, the SM 16; blocks of 8 warps: 2
        (128, 8, 0, 2, "registers"),
        # 100 KB + 1 KB = 103424 bytes (a multiple of 128); 233472 // 103424 = 2
        (32, 4, 100 * KB, 2, "shared"),
        # 100 x 32 = 3200, rounded up to 3328; 16384 // 3328 = 4 warps a quarter, 16 an SM: 4 blocks of 4
        (100, 4, 0, 4, "registers"),
        # 80 x 32 = 2560; 16384 // 2560 = 6 warps a quarter: 24 one-warp blocks, not 65536 // 2560 = 25
        (80, 1, 0, 24, "registers"),
        # 255 x 32 = 8160 -> 8192; 2 warps a quarter, 8 an SM: 4 blocks of 2 warps
        (255, 2, 0, 4, "registers"),
        # 32 x 32 = 1024: 64 warps by registers, 64 by threads: 16 blocks of 4
        (32, 4, 0, 16, "registers+warps"),
        # one-warp blocks of 16 registers: 128 by registers, 64 by threads, 228 by shared: the 32-block cap
        (16, 1, 0, 32, "blocks"),
        # 227 KB + 1 KB = the whole 228 KB: one block; a byte more does not fit
        (32, 4, 227 * KB, 1, "shared"),
        (32, 4, 227 * KB + 1, 0, "shared"),
        # 256 registers a thread: over the 255 limit
        (256, 4, 0, 0, "registers"),
    ],
)
def test_occupancy_follows_the_cuda_occupancy_rules(registers, warps, shared, resident, limiter):
    occ = kr.occupancy(registers, warps, shared, kr.H200)
    assert (occ.resident, occ.limiter) == (resident, limiter)


@pytest.mark.parametrize(
    "programs, slots, waves, fill",
    [
        (132, 132, 1.0, 1.0),
        (66, 132, 0.5, 0.5),
        (133, 132, 133 / 132, 1 / 132),
        (264, 264, 1.0, 1.0),
        (1000, 264, 1000 / 264, (1000 - 3 * 264) / 264),
    ],
)
def test_waves_and_last_wave_fill(programs, slots, waves, fill):
    assert kr.wave_fill(programs, slots) == pytest.approx((waves, fill))


@pytest.mark.parametrize(
    "programs, slots, waves, fill",
    [
        (512, 792, 512 / 792, 512 / (4 * 132)),  # one wave: 4 programs on the busiest SMs, 3 on the rest
        (66, 792, 66 / 792, 0.5),  # half the SMs idle
        (528, 792, 528 / 792, 1.0),  # 4 on every SM
        (1000, 264, 1000 / 264, (1000 - 3 * 264) / 264),  # several waves: the last one's slots
    ],
)
def test_a_single_wave_is_judged_by_its_sms(programs, slots, waves, fill):
    assert kr.wave_fill(programs, slots, 132) == pytest.approx((waves, fill))


def test_wave_quantization_model():
    assert kr.wave_factor(0.5, 0.5) == 2.0 and kr.wave_loss(0.5, 0.5) == 0.5
    assert kr.wave_factor(0.65, 0.97) == pytest.approx(1 / 0.97)  # one wave: the busiest SM sets the time
    assert kr.wave_factor(2.5, 0.5) == pytest.approx(3 / 2.5) and kr.wave_loss(2.5, 0.5) == pytest.approx(1 - 2.5 / 3)
    assert kr.wave_factor(3.0, 1.0) == 1.0 and kr.wave_loss(3.0, 1.0) == 0.0
    assert kr.wave_factor(4.5, 0.5) == 1.0 and kr.wave_loss(4.5, 0.5) == 0.0  # later waves hide a partial one
    assert kr.wave_fill(10, 0) == (float("inf"), 0.0)  # nothing fits: no wave ever ends


# ---------------------------------------------------------------------------------------------------------
# Flags from PTX and TTGIR
# ---------------------------------------------------------------------------------------------------------

_AMPERE_PTX = """
    cp.async.cg.shared.global [ %r12 + 0 ], [ %rd7 + 0 ], 0x10, %r13;
    cp.async.commit_group;
    cp.async.wait_group 1;
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 { %f1, %f2, %f3, %f4 }, { %r1, %r2, %r3, %r4 }, { %r5, %r6 },
        { %f1, %f2, %f3, %f4 };
"""
_HOPPER_PTX = """
    cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r20], [%rd4, {%r21, %r22}], [%r23];
    wgmma.fence.sync.aligned;
    wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%f1, %f2}, %rd10, %rd11, 1, 1, 1, 0, 1;
    wgmma.commit_group.sync.aligned;
"""


def test_pipeline_flags_from_ptx():
    assert kr.pipeline_flags(_AMPERE_PTX, "") == kr.Pipeline(cp_async=True, tma=False, wgmma=False, mma_sync=True)
    assert kr.pipeline_flags(_HOPPER_PTX, "") == kr.Pipeline(cp_async=False, tma=True, wgmma=True, mma_sync=False)
    waits_only = "    cp.async.wait_group 0;\n    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
    assert kr.pipeline_flags(waits_only, "") == kr.Pipeline(False, False, False, False)


def test_pipeline_flags_from_ttgir():
    ttgir = "%42 = ttg.async_copy_global_to_local %40, %41 mask %39 : tensor<64x64x!tt.ptr<f16>, #blocked>"
    assert kr.pipeline_flags("", ttgir).cp_async
    tma = "ttng.async_tma_copy_global_to_local %desc[%c0, %c1] %buf, %bar, %true : !tt.tensordesc<tensor<64x64xf16>>"
    assert kr.pipeline_flags("", tma).tma


# ---------------------------------------------------------------------------------------------------------
# The cost model, on launches worked out by hand
# ---------------------------------------------------------------------------------------------------------


def _shape(model: str) -> kl.EngineShape:
    (shape,) = kl.engine_shapes([model], [torch.float16], test_shapes=False)
    return shape


def _meta(*size: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.empty(size, device="meta", dtype=dtype)


def test_contexts_of_a_step():
    shape = _shape("codegen-350M-mono")
    assert kr.contexts(shape, kl.Step("decode", 3, 3)) == [2048, 2048, 2048]
    assert kr.contexts(shape, kl.Step("prefill", 3, 5000)) == [2048, 2048, 904]
    assert kr.contexts(shape, kl.Step("prefill", 1, 512)) == [512]


def test_cost_of_causal_prefill_attention():
    """codegen-350M (d = 1024: 16 heads of 64), one prompt of 512 tokens, float16."""
    view = kr.LaunchView("_prefill_kernel", {}, (1, 16, 8), _shape("codegen-350M-mono"), kl.Step("prefill", 1, 512))
    cost = kr.launch_cost(view)
    # q and out 2 x 512 x 1024 x 2 B; K and V as much; 32 block-table entries; one length, two query starts
    assert cost.bytes == 2 * 1_048_576 + 2_097_152 + 32 * 4 + 4 + 8 == 4_194_444
    # QK^T and PV, 2 FLOPs a multiply-add, over 512 x 513 / 2 visible (query, key) pairs of each of 16 heads
    assert cost.flops == 2 * 2 * 16 * 64 * (512 * 513 // 2) == 537_919_488
    assert kr.roofline(cost) == pytest.approx(4_194_444 / 4.3e12)  # memory-bound


def test_cost_of_decode_attention_counts_every_context_and_the_partials():
    """codegen-2B (d = 2560: 32 heads of 80), 8 sequences at 2048 tokens, 3 splits, partials padded to 128."""
    values = dict(
        PART_OUT=_meta(8, 32, 3, 128, dtype=torch.float32),
        PART_MAX=_meta(8, 32, 3, dtype=torch.float32),
        PART_SUM=_meta(8, 32, 3, dtype=torch.float32),
    )
    view = kr.LaunchView("_split_kernel", values, (8, 32, 3), _shape("codegen-2B-mono"), kl.Step("decode", 8, 8))
    cost = kr.launch_cost(view)
    kv = 2 * 8 * 2048 * 2560 * 2
    assert cost.bytes == 8 * 2560 * 2 + kv + 8 * 128 * 4 + 8 * 4 + 8 * 32 * 3 * (128 + 2) * 4 == 168_216_608
    assert cost.flops == 4 * 32 * 80 * 8 * 2048


def test_cost_of_in_proj():
    """codegen-350M decode, one token, no split: w_in is [7168, 1024] (3d + 4d rows), rotary_dim 32."""
    view = kr.LaunchView(
        "_in_proj_kernel", {"SPLIT_K": 1}, (1, 224, 1), _shape("codegen-350M-mono"), kl.Step("decode", 1, 1)
    )
    cost = kr.launch_cost(view)
    weights = (7168 * 1024 + 7168) * 2
    inputs = 1024 * 2 + 2 * 8 + 32 * 4  # ln(x), position and slot, 16 cos and 16 sin
    outputs = (1024 + 4096 + 2 * 1024) * 2  # q, gelu(fc_in), k and v
    assert cost.bytes == weights + inputs + outputs == 14_710_928
    assert cost.flops == 2 * 7168 * 1024


@pytest.mark.parametrize("in_launch", [True, False])
def test_cost_of_a_split_k_out_proj(in_launch):
    """codegen-16B decode, one row, K split 4 ways: the weight dominates; the partials count as written once,
    and read back once when the launch reduces them itself (COUNTERS); otherwise another kernel reads them
    and does the epilogue (residual in, output out)."""
    d = 6144
    values = dict(PARTIAL=_meta(4, 1, d, dtype=torch.float32), SPLIT_K=4)
    if in_launch:
        values["COUNTERS"] = _meta(192, dtype=torch.int32)
    view = kr.LaunchView("_out_proj_kernel", values, (1, 96, 4), _shape("codegen-16B-mono"), kl.Step("decode", 1, 1))
    cost = kr.launch_cost(view)
    weight, bias, inputs, res_out, partials = d * 5 * d * 2, d * 2, 5 * d * 2, 2 * d * 2, 4 * d * 4
    if in_launch:
        assert cost.bytes == weight + bias + inputs + res_out + 2 * partials + 2 * 192 * 4 == 377_783_808
    else:
        assert cost.bytes == weight + bias + inputs + partials == 377_659_392
    assert cost.flops == 2 * d * 5 * d


def test_every_kernel_has_a_cost_model():
    assert kr.missing_cost_models(name for _, name in kl.KERNELS) == []


def test_an_unknown_kernel_or_argument_is_a_clear_error():
    view = kr.LaunchView("_new_kernel", {}, (1,), _shape("codegen-350M-mono"), kl.Step("decode", 1, 1))
    with pytest.raises(kr.ReportError, match="no cost model for kernel _new_kernel: add one to COST_MODELS"):
        kr.launch_cost(view)
    view = kr.LaunchView("_split_kernel", {"Q": _meta(1, 8)}, (1,), view.shape, view.step)
    with pytest.raises(kr.ReportError, match=r"_split_kernel needs its argument 'PART_OUT'.*parameters: Q"):
        kr.launch_cost(view)


# ---------------------------------------------------------------------------------------------------------
# Step floors and rules, on rows made up for the purpose
# ---------------------------------------------------------------------------------------------------------


def _row(**fields) -> kr.Row:
    base = dict(
        kernel="_in_proj_kernel", model="codegen-350M-mono", dtype="float16", step="decode rows=1", kind="decode",
        rows=1, tokens=1, grid=[1, 1, 1], programs=1, bytes=0, flops=0, roofline_s=1e-6, ok=True, num_warps=4,
        num_stages=3, registers=64, local=0, stack=0, shared=0, resident_per_sm=1, occupancy_limit="shared",
        waves=4.0, last_wave_fill=1.0, wave_loss=0.0, cp_async=True, tma=False, wgmma=True, mma_sync=False,
    )  # fmt: skip
    return kr.Row(**{**base, **fields})


def test_step_floor_is_one_layer_times_the_models_layers():
    rows = [
        _row(kernel="_in_proj_kernel", roofline_s=1e-6, waves=0.5, last_wave_fill=0.5),  # half the SMs: twice
        _row(kernel="_out_proj_kernel", roofline_s=2e-6, waves=5.0),
        _row(kernel="_in_proj_kernel", step="decode rows=8", roofline_s=4e-6),
        _row(kernel="_in_proj_kernel", model="codegen-16B-mono", roofline_s=1e-6, ok=False, waves=None),
    ]
    s350, s350_8, s16 = kr.summarize(rows)
    assert (s350.model, s350.step, s350.n_layer, s350.launches) == ("codegen-350M-mono", "decode rows=1", 20, 2)
    assert s350.floor_s == pytest.approx(20 * 3e-6)
    assert s350.with_waves_s == pytest.approx(20 * (2e-6 + 2e-6))
    assert s350_8.floor_s == pytest.approx(20 * 4e-6)
    assert (s16.n_layer, s16.floor_s) == (34, pytest.approx(34e-6))


def test_rules_flag_what_they_should():
    def broken(row: kr.Row) -> set[str]:
        return {v.rule for v in kr.check([row]) if v.row is not None}

    assert broken(_row()) == set()
    assert broken(_row(stack=64)) == set() and broken(_row(stack=72)) == {"no-spills"}
    assert broken(_row(local=8)) == {"no-spills"}
    assert broken(_row(ok=False, error="CompilationError")) == {"compiles"}
    split = dict(kernel="_split_kernel", wgmma=False)
    assert broken(_row(**split, waves=0.8, last_wave_fill=0.8)) == {"decode-fills-waves"}
    assert broken(_row(**split, waves=1.95, last_wave_fill=0.95)) == set()
    assert broken(_row(**split, waves=4.2, last_wave_fill=0.2)) == set()
    assert broken(_row(kernel="_combine_kernel", waves=0.01, last_wave_fill=0.01, cp_async=False)) == set()
    assert broken(_row(kernel="_out_proj_kernel", cp_async=False)) == {"pipelined-main-loop"}
    assert broken(_row(kernel="_out_proj_kernel", cp_async=False, tma=True)) == set()
    prefill = dict(kind="prefill", step="prefill tokens=512", rows=1, tokens=512, wgmma=False)
    assert broken(_row(**prefill)) == {"wgmma-prefill-gemm"}
    assert broken(_row(**{**prefill, "tokens": 256})) == set()
    assert broken(_row(**prefill, kernel="_prefill_kernel")) == {"wgmma-prefill-attention"}
    assert broken(_row(resident_per_sm=0, waves=float("inf"), last_wave_fill=0.0)) == {"fits-on-sm"}


def test_a_rule_that_applies_to_nothing_is_reported():
    (violation,) = kr.check(
        [_row(kernel="_combine_kernel")], [r for r in kr.RULES if r.name == "wgmma-prefill-attention"]
    )
    assert violation.row is None and "applies to no launch" in str(violation)
