"""The launches `tools/warm_triton_cache.py` compiles ahead of time are the ones the engine makes.

The tool itself runs with a GPU machine's Triton (3.6, Python 3.12); here
the enumeration it drives (`benchmarks/kernel_launches.py`) is checked against the
engine: its settings and buckets, what a real engine step launches, and the
tool's handling of a cache directory (relocation, pruning, the report of
what a run added).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SHAPES
from fastcodegen import SamplingParams
from fastcodegen.config import EngineConfig
from fastcodegen.cuda_graphs import default_buckets

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import kernel_launches as kc  # noqa: E402
import warm_triton_cache as wtc  # noqa: E402

# max_num_seqs of the engines the GPU tests and benchmarks build (test_cuda_graphs, suite's decode runs).
SMALLER_MAX_NUM_SEQS = (40, 8)


def test_test_shapes_are_the_conftest_shapes():
    assert kc.TEST_SHAPES == {name: (s.n_embd, s.n_head, s.rotary_dim) for name, s in SHAPES.items()}
    assert {s.n_positions for s in SHAPES.values()} == {kc.TEST_N_POSITIONS}


def test_engine_shape_defaults_are_the_engines():
    engine = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    shape = {f.name: f.default for f in dataclasses.fields(kc.EngineShape)}
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
        assert shape[name] == engine[name], name


def test_plan_covers_every_bucket_and_token_count():
    plan = kc.warm_plan()
    by_label = {}
    for shape, steps in plan:
        by_label.setdefault((shape.label, shape.dtype), []).append((shape, steps))
    sizes = {"codegen-350M-mono", "codegen-2B-mono", "codegen-6B-mono", "codegen-16B-mono"}
    expected = {(m, d) for m in sizes | {f"test-{n}" for n in SHAPES} for d in (torch.float16, torch.bfloat16)}
    assert set(by_label) == expected
    for (label, _), items in by_label.items():
        engine_shape, steps = items[0]
        assert engine_shape.max_model_len == engine_shape.config.n_positions  # the engine's default
        decode = {s.rows for s in steps if s.kind == "decode"}
        prefill = {s.tokens for s in steps if s.kind == "prefill"}
        assert decode == set(range(1, 257))
        for n in (256, *SMALLER_MAX_NUM_SEQS):
            assert set(default_buckets(n)) <= decode, n
        assert prefill == set(range(1, 8193))
        for shape, _ in items[1:]:  # attention over tables of the kernel tests' odd widths
            assert label in sizes and shape.table_width % 16 != 0


class _RecordingOps:
    """The torch backend's results, with the launches the triton backend makes for the same calls recorded."""

    def __init__(self, torch_ops, triton_ops):
        self.torch_ops, self.triton_ops = torch_ops, triton_ops

    def in_proj(self, *args):
        self.triton_ops.in_proj(*args)
        return self.torch_ops.in_proj(*args)

    def attention(self, *args):
        self.triton_ops.attention(*args)
        return self.torch_ops.attention(*args)

    def out_proj(self, *args):
        self.triton_ops.out_proj(*args)
        return self.torch_ops.out_proj(*args)

    def logits(self, *args):
        return self.torch_ops.logits(*args)


def test_steps_launch_what_the_engine_launches(engine_factory):
    """`run_step` on meta tensors specialises every kernel as a real engine step of the same size does.

    A real engine (on the CPU) prefills three prompts in one step, then
    decodes them; the triton backend's launches for its steps are recorded
    (the torch backend computes the values) and compared with the launches
    `run_step` makes for steps of the same sizes.
    """
    from fastcodegen.models.ops import Ops, triton_kernels

    dtype = torch.float16
    engine, _ = engine_factory("hd64", dtype=dtype, backend="torch")
    model = engine._runner.model
    device = engine.config.device
    # Planned as on a GPU, the only place the compiled kernels run (on the CPU they are planned for the interpreter).
    kernels = triton_kernels(
        model.model_config, device, engine.config.max_model_len, num_sms=kc.EngineShape.num_sms, interpreted=False
    )
    model.ops = _RecordingOps(model.ops, Ops(model.model_config, kernels, device))
    log: list[kc.Launch] = []
    restore = kc.patch_kernels(lambda kernel, name: kc.Recorder(kernel, name, log, [""]))
    try:
        engine.generate(
            prompt_token_ids=[[5, 17, 33, 100, 7], list(range(1, 21)), [42]],
            sampling_params=SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
        )
    finally:
        restore()
    engine_keys = {kc.specialization_key(launch) for launch in log}
    kernels = {launch.name.split()[0] for launch in log}
    assert {"_in_proj_kernel", "_prefill_kernel", "_split_kernel", "_combine_kernel", "_out_proj_kernel"} <= kernels
    shape = next(s for s in kc.engine_shapes(dtypes=[dtype]) if s.label == "test-hd64")
    # The prefill packs 26 tokens; each decode step has one token for each of the 3 prompts.
    steps = kc.engine_steps(shape, decode_rows=[3], prefill_tokens=[26])
    enumerated = {kc.specialization_key(launch) for launch in kc.record_launches(shape, steps)}
    assert engine_keys == enumerated


@pytest.mark.parametrize(
    "rows, m_type",
    [(1, "constexpr"), (15, "i32"), (16, "i32/16"), (17, "i32"), (48, "i32/16"), (65, "i32"), (80, "i32/16")],
)
def test_row_counts_specialise_on_one_and_on_16(rows, m_type):
    """The row count reaches in_proj as M: a constant when 1, else an i32 marked when divisible by 16."""
    shape = next(s for s in kc.engine_shapes(dtypes=[torch.float16], test_shapes=False))
    (launch,) = [x for x in kc.record_launches(shape, kc.engine_steps(shape, [rows], [])) if "_in_proj" in x.name]
    sig, consts, attrs, _ = kc.signature(launch)
    names = list(sig)
    m = names.index("M")
    got = sig["M"] + ("/16" if (m,) in attrs else "")
    assert got == m_type
    if rows == 1:
        assert consts[(m,)] == 1


def _fake_entry(cache: Path, name: str, kernel: str) -> Path:
    """A kernel entry as Triton 3.6 writes it: IRs, cubin, metadata, and a group file of absolute paths."""
    entry = cache / name
    entry.mkdir(parents=True)
    children = {}
    for ext in ("source", "ttir", "ttgir", "llir", "ptx", "cubin", "json"):
        f = entry / f"{kernel}.{ext}"
        f.write_text(json.dumps({"name": kernel, "num_warps": 4}) if ext == "json" else ext * 100)
        children[f.name] = str(f)
    (entry / f"__grp__{kernel}.json").write_text(json.dumps({"child_paths": children}))
    return entry


def test_prune_keeps_what_a_hit_reads_and_relocate_follows_a_move(tmp_path):
    cache = tmp_path / "a" / "cache"
    _fake_entry(cache, "ENTRYONE", "_in_proj_kernel")
    _fake_entry(cache, "ENTRYTWO", "_split_kernel")
    module = cache / "MODULE"
    module.mkdir()
    (module / "__triton_launcher.so").write_bytes(b"\x7fELF")
    ir_bytes = sum(len(ext) * 100 for ext in ("source", "ttir", "ttgir", "llir", "ptx"))
    assert wtc.prune(cache) == 2 * ir_bytes
    moved = tmp_path / "b" / "elsewhere"
    moved.parent.mkdir()
    cache.rename(moved)
    assert wtc.relocate(moved) == 2
    for entry, kernel in (("ENTRYONE", "_in_proj_kernel"), ("ENTRYTWO", "_split_kernel")):
        children = json.loads((moved / entry / f"__grp__{kernel}.json").read_text())["child_paths"]
        assert set(children) == {f"{kernel}.cubin", f"{kernel}.json"}
        assert all(Path(p).is_file() and Path(p).parent == (moved / entry).resolve() for p in children.values())
        assert sorted(p.name for p in (moved / entry).iterdir()) == sorted([*children, f"__grp__{kernel}.json"])
    assert (moved / "MODULE" / "__triton_launcher.so").read_bytes() == b"\x7fELF"


def test_report_lists_what_a_run_compiled(tmp_path):
    """Misses: a new entry, and a warmed entry recompiled in place (its files newer than the manifest)."""
    cache = tmp_path / "cache"
    _fake_entry(cache, "WARMED", "_in_proj_kernel")
    _fake_entry(cache, "STALE", "_split_kernel")
    (cache / "LAUNCHER").mkdir()
    (cache / "LAUNCHER" / "__triton_launcher.so").write_bytes(b"\x7fELF")
    manifest = {"entries": [{"dir": "WARMED"}, {"dir": "STALE"}], "modules": [{"dir": "LAUNCHER"}]}
    (cache / wtc.MANIFEST).write_text(json.dumps(manifest))
    made = (cache / wtc.MANIFEST).stat().st_mtime
    for f in cache.rglob("*"):
        if f.is_file() and f.name != wtc.MANIFEST:
            os.utime(f, (made - 60, made - 60))
    os.utime(cache / "STALE" / "_split_kernel.cubin", (made + 60, made + 60))
    _fake_entry(cache, "NEWONE", "_out_proj_kernel")
    tool = Path(wtc.__file__)
    p = subprocess.run([sys.executable, str(tool), "report", str(cache)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "1 cache entries added to 3 warmed ones, 1 warmed ones rewritten"
    assert lines[1].split()[:4] == ["added", "NEWONE", "kernel", "_out_proj_kernel"]
    assert lines[2].split()[:4] == ["rewritten", "STALE", "kernel", "_split_kernel"]
    assert len(lines) == 3


def test_install_names_a_missing_manifest(tmp_path):
    tool = Path(wtc.__file__)
    p = subprocess.run([sys.executable, str(tool), "install", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2
    assert (
        p.stderr.strip()
        == f"error: {tmp_path.resolve() / wtc.MANIFEST} does not exist: make the cache with `warm` first"
    )


@pytest.mark.parametrize("name", ["TRITON_DEFAULT_FP_FUSION", "PTXAS_OPTIONS", "TRITON_DEBUG"])
def test_variables_that_change_the_keys_are_named(monkeypatch, name):
    """Set to its default value or not, each one changes the key a default GPU run computes: `warm` refuses."""
    for other in wtc.KEY_ENV:
        monkeypatch.delenv(other, raising=False)
    assert wtc._key_env() == {}
    monkeypatch.setenv(name, "1")
    assert set(wtc._key_env()) == {name}
