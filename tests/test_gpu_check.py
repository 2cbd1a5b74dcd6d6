"""The GPU check (benchmarks/gpu_check.sh) and the suite it drives, without a GPU.

The check's --cpu mode runs every stage at tiny shapes, so the script, the suite's sections and the
summary's format are exercised on every test run. Its mechanisms are checked on their own with stand-in
stages: a stage stopped at its time limit, the next stage still running, Triton cache entries counted,
pytest reports counted against tests whose outcomes are known, and the suite freeing a failed model's
engine before it builds the next one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
STATUSES = {"ok", "failed", "timeout", "skipped"}
STAGES = [
    "build", "environment", "kernel-tests", "engine-tests", "decode", "kernel-bench", "suite-rest", "speculative"
]  # fmt: skip


@pytest.fixture(scope="module")
def benchmarks():
    """benchmarks/ importable, as its scripts see it when run: `import gpu_check`, `import suite`."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def gpu_check_module(benchmarks):
    import gpu_check

    return gpu_check


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """`bash benchmarks/gpu_check.sh --cpu OUT` once: (the process, OUT, summary.json)."""
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--cpu", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return p, out, summary


def _stage(summary: dict, key: str) -> dict:
    return next(s for s in summary["stages"] if s["key"] == key)


def test_cpu_mode_writes_a_complete_summary(cpu_run):
    p, out, summary = cpu_run
    assert summary is not None, p.stdout[-3000:] + p.stderr[-3000:]
    assert summary["mode"] == "cpu" and summary["complete"]
    assert [s["key"] for s in summary["stages"]] == STAGES
    for stage in summary["stages"]:
        assert stage["status"] in STATUSES, stage
        if stage["status"] != "skipped":
            assert stage["seconds"] is not None and stage["seconds"] <= stage["limit_s"] + 15, stage
    # What the device machine sends back: at most 8 plain files, named with letters, digits, '.', '_', '-'.
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in out.iterdir())
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert {"summary.md", "summary.json", "stages.log"} <= set(files)
    assert sorted(summary["files"]) == files
    assert summary["elapsed_s"] <= summary["budget_s"]
    # summary.md opens with the table, one row per stage, and says what the Triton cache did.
    md = (out / "summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| # | stage | status | seconds | key numbers")
    for i, (key, stage) in enumerate(zip(STAGES, summary["stages"])):
        assert table[i + 1].startswith(f"| {i} | {key} | {stage['status']} |")
    assert "triton cache: " in md and summary["triton_cache"]["line"] in md
    # The console gets a line per stage with the time so far, and the table last.
    for i, key in enumerate(STAGES):
        assert re.search(rf"\[gpu_check\] {i} {key}: \w+.*\(elapsed \d+ s of \d+\)", p.stdout), p.stdout
    assert p.stdout.rstrip().endswith(summary["triton_cache"]["line"])


def test_cpu_mode_runs_each_stage(cpu_run):
    p, out, summary = cpu_run
    assert p.returncode in (0, 1), p.stderr[-3000:]
    env = summary["environment"]
    for key in ("date", "commit", "device", "torch", "triton", "transformers", "python"):
        assert env.get(key), key
    environment = _stage(summary, "environment")
    assert environment["status"] == "ok", environment
    copy = next(r for r in environment["rows"] if r["name"] == "device-to-device copy")
    assert copy["value"] > 0 and f"copy {copy['value']:.3g} GB/s" in environment["summary"]
    # The two interpreter kernel tests the --cpu mode selects, both passing; their report is kept.
    kernel_tests = _stage(summary, "kernel-tests")
    assert kernel_tests["status"] == "ok", kernel_tests
    assert kernel_tests["tests"]["passed"] == 2 and kernel_tests["tests"]["failed"] == 0
    assert (out / "junit-kernels.xml").is_file()
    assert _stage(summary, "engine-tests")["status"] in STATUSES
    # bench_kernels.py needs CUDA: the stage says so and is no failure.
    kernel_bench = _stage(summary, "kernel-bench")
    assert kernel_bench["status"] == "skipped" and kernel_bench["rows"][0]["note"] == "not run: needs CUDA"


def test_cpu_mode_runs_the_suite_sections(cpu_run):
    """What tests/test_suite_smoke.py checked: each section's rows, peers' values and ratios, the prefix cache."""
    _, _, summary = cpu_run
    decode, rest = _stage(summary, "decode"), _stage(summary, "suite-rest")
    assert decode["status"] == "ok" and rest["status"] == "ok", (decode, rest)
    rows = decode["rows"] + rest["rows"]
    assert not [r for r in rows if r["note"].startswith("error")]
    by_name = {(r["name"], r["baseline"]): r for r in rows}
    # Every measured row has a value; rows compared with a peer carry its value and the ratio.
    eager = by_name[("batch-1 decode codegen-tiny-py", "transformers eager")]
    assert eager["value"] > 0 and eager["baseline_value"] > 0
    assert eager["ratio"] == pytest.approx(eager["baseline_value"] / eager["value"])
    floor = by_name[("batch-1 decode codegen-tiny-py", "bandwidth floor")]
    assert floor["baseline_value"] > 0 and floor["ratio"] == pytest.approx(floor["baseline_value"] / floor["value"])
    assert floor["value"] == eager["value"]  # one measurement of fastcodegen, compared twice
    cached = [r for r in rows if r["section"] == "ttft" and r["baseline"] == "uncached"]
    assert cached and cached[0]["value"] > 0 and "prompt tokens from the cache" in cached[0]["note"]
    assert int(cached[0]["note"].split()[0]) > 0  # the second run did hit the prefix cache
    ours = [r for r in rest["rows"] if r["section"] == "throughput" and r["value"]]
    assert ours and all(r["value"] > 0 for r in ours)
    peer = [r for r in ours if r["baseline"]]
    assert peer and peer[0]["ratio"] == pytest.approx(peer[0]["value"] / peer[0]["baseline_value"])
    # The last stage, in the time left: speculative decoding's step costs, summarised at acceptance 0.8.
    spec = _stage(summary, "speculative")
    assert spec["status"] in STATUSES, spec
    if spec["status"] == "ok":
        assert "verify/decode" in spec["summary"] and "at 0.8:" in spec["summary"]


def test_suite_only_writes_its_record_and_keeps_to_its_budget(benchmarks, tmp_path, capsys):
    """suite.py --only: the sections asked for, in a record named after them; no work past --budget-s."""
    import suite

    assert suite.main(["--cpu", "--only", "ceilings", "decode", "--budget-s", "0", "--out-dir", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    [record_file] = tmp_path.glob("*-ceilings-decode.json")
    [table_file] = tmp_path.glob("*-ceilings-decode.md")
    record = json.loads(record_file.read_text())
    assert [r["section"] for r in record["rows"]] == ["ceilings", "ceilings", "decode"]
    assert all(r["value"] > 0 for r in record["rows"][:2])
    assert record["rows"][2]["value"] is None and record["rows"][2]["note"].startswith("not run: out of time")
    # The table is printed last, and is the file's content.
    assert table_file.read_text().startswith("# fastcodegen benchmark suite")
    assert stdout.strip().endswith(table_file.read_text().strip().splitlines()[-1])


def test_a_failing_model_frees_its_engine_before_the_next_is_built(benchmarks, monkeypatch):
    """A model whose measurement raises gets an error row and its engine closed; the next model is measured."""
    import suite

    built, closed_when_next_built = [], []
    real_engine_for = suite.engine_for

    def engine_for(name, plan, **kwargs):
        if built:
            closed_when_next_built.append(built[-1].closed)
        engine = real_engine_for(name, plan, **kwargs)
        if not built:

            def broken(*args, **kwargs):
                raise RuntimeError("CUDA out of memory (stand-in)")

            engine.generate = broken
        built.append(engine)
        return engine

    monkeypatch.setattr(suite, "engine_for", engine_for)
    # Two models, transformers never (its estimated time exceeds any budget).
    plan = suite.replace(suite.cpu_plan(), decode_models=["codegen-tiny-py"] * 2, new_tokens=4, hf_step_s=1e9)
    rows = list(suite.decode_latency(plan, 1.0, suite.Budget.of(600)))
    assert closed_when_next_built == [True] and built[1].closed
    first, second = [r for r in rows if r.baseline != "transformers eager"][:2]
    assert first.value is None and first.note == "error: RuntimeError: CUDA out of memory (stand-in)"
    assert second.value is not None and second.baseline == "bandwidth floor" and not second.note.startswith("error")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--new-tokens", "1"], "--new-tokens: must be at least 2, got 1"),
        (["--budget-s", "soon"], "--budget-s: not a number: 'soon'"),
        (["--models", "codegen-7B-mono"], "--models: unknown model 'codegen-7B-mono'"),
    ],
)
def test_suite_rejects_bad_arguments(benchmarks, capsys, args, message):
    import suite

    with pytest.raises(SystemExit) as exit:
        suite.parse_args(["--cpu", *args])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_stage_past_its_limit_is_stopped_and_the_next_one_runs(gpu_check_module, tmp_path):
    """Stand-in stages: one that hangs is interrupted at its limit, one that ignores SIGINT is killed after the
    grace period, their output kept and the summary current while they run; the next stage runs, and the
    Triton kernels it compiles are counted apart from the shipped ones."""
    gc = gpu_check_module
    shipped = tmp_path / "shipped"
    for entry in ("a1", "b2"):
        (shipped / entry).mkdir(parents=True)
        (shipped / entry / "_shipped_kernel.cubin").write_bytes(b"")
    # Stands in for tools/warm_triton_cache.py: `install DIR` is run on the copy the stages will use.
    tool = tmp_path / "tool.py"
    tool.write_text(
        "import os, sys\n"
        "assert sys.argv[1] == 'install' and sys.argv[2] == os.environ['TRITON_CACHE_DIR'], sys.argv\n"
        "assert sorted(os.listdir(sys.argv[2])) == ['a1', 'b2']\n"
        "print('2 kernels; keys match')\n"
    )
    compile_one = textwrap.dedent("""
        import os, pathlib
        entry = pathlib.Path(os.environ["TRITON_CACHE_DIR"], "c3")
        entry.mkdir()
        for name in ("_new_kernel.cubin", "_new_kernel.json", "__grp___new_kernel.json"):
            (entry / name).write_text("{}")
        pathlib.Path(os.environ["TRITON_CACHE_DIR"], "d4").mkdir()  # a launcher: no kernel files
        (pathlib.Path(os.environ["TRITON_CACHE_DIR"], "d4") / "__triton_launcher.so").write_text("")
        print("compiled")
        """)

    seen = []  # the summary on disk while the hanging stage runs

    class Check(gc.GpuCheck):
        def _hang(self, result, limit):
            script = "import time; print('started', flush=True); time.sleep(120)"
            return gc.Step([sys.executable, "-c", script], self._mark_ok, progress=self._look)

        def _stubborn(self, result, limit):
            script = (
                "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('stubborn', flush=True); "
            )
            return gc.Step([sys.executable, "-c", script + "time.sleep(120)"], self._mark_ok)

        def _look(self, result):
            seen.append(json.loads((self.out / "summary.json").read_text()))

        def _compile(self, result, limit):
            return gc.Step([sys.executable, "-c", compile_one], self._mark_ok)

        @staticmethod
        def _mark_ok(result, returncode, timed_out):
            result.status, result.summary = "ok", "ran"

    specs = (
        gc.StageSpec("hang", "hangs", 2, 2, 0, 0),
        gc.StageSpec("stubborn", "ignores SIGINT", 2, 2, 0, 0),
        gc.StageSpec("compile", "compiles", 60, 60, 0, 0),
    )
    config = gc.CheckConfig(
        out_dir=tmp_path / "out", cpu=False, budget_s=90, python=sys.executable, kernel_test_workers=0,
        new_tokens=None, grace_s=2, min_stage_s=1, progress_s=0.5, specs=specs, shipped_cache=shipped, cache_tool=tool,
    )  # fmt: skip
    config.out_dir.mkdir()
    assert Check(config).run() == 1
    summary = json.loads((config.out_dir / "summary.json").read_text())
    hang, stubborn, compiled = summary["stages"]
    assert hang["status"] == "timeout" and hang["returncode"] == 124 and 1.5 <= hang["seconds"] < 10
    assert stubborn["status"] == "timeout" and stubborn["returncode"] in (137, -9) and 3.5 <= stubborn["seconds"] < 12
    assert compiled["status"] == "ok" and compiled["returncode"] == 0
    assert seen and all([s["status"] for s in x["stages"]] == ["running", "pending", "pending"] for x in seen)
    assert not seen[-1]["complete"]
    log = (config.out_dir / "stages.log").read_text()
    assert log.index("started") < log.index("stubborn") < log.index("compiled")
    assert summary["triton_cache"]["shipped"] == 2 and summary["triton_cache"]["new_kernels"] == 1
    assert compiled["triton_new_kernels"] == 1 and compiled["triton_new_other"] == 1
    assert compiled["triton_new_by_kernel"] == {"_new_kernel": 1} and hang["triton_new_kernels"] == 0
    line = (
        "triton cache: shipped 2 entries (2 kernels; keys match); this run compiled 1 new kernels (+1 launchers and "
        "other entries)"
    )
    assert summary["triton_cache"]["line"] == line and line in (config.out_dir / "summary.md").read_text()
    assert "| 0 | hang | timeout |" in (config.out_dir / "summary.md").read_text()


def test_stages_without_time_left_are_skipped(gpu_check_module, tmp_path):
    gc = gpu_check_module

    class Check(gc.GpuCheck):
        def _never(self, result, limit):
            raise AssertionError("a stage with no time left must not start")

    specs = (gc.StageSpec("never", "never starts", 60, 60, 0, 0),)
    config = gc.CheckConfig(
        out_dir=tmp_path, cpu=True, budget_s=5, python=sys.executable, kernel_test_workers=0, new_tokens=None,
        grace_s=2, min_stage_s=10, specs=specs, shipped_cache=tmp_path / "none",
    )  # fmt: skip
    assert Check(config).run() == 0
    [stage] = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert stage["status"] == "skipped" and stage["summary"].startswith("not started")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU mode on a machine without a GPU")
def test_gpu_mode_without_a_gpu_says_so_and_runs_nothing_more(gpu_check_module, tmp_path):
    gc = gpu_check_module
    specs = tuple(s for s in gc.SPECS if s.key in ("environment", "kernel-tests"))
    config = gc.CheckConfig(
        out_dir=tmp_path, cpu=False, budget_s=200, python=sys.executable, kernel_test_workers=0, new_tokens=None,
        specs=specs, shipped_cache=tmp_path / "none",
    )  # fmt: skip
    assert gc.GpuCheck(config).run() == 1
    environment, kernel_tests = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert environment["status"] == "failed" and "no CUDA device" in environment["summary"]
    assert kernel_tests["status"] == "skipped" and kernel_tests["summary"] == "no CUDA device (stage 1)"
    assert "error: suite.py needs a CUDA GPU" in (tmp_path / "stages.log").read_text()


def test_junit_report_is_counted(gpu_check_module, tmp_path):
    """junit_summary against a test file whose outcomes are known: 2 pass, 1 fails, 1 errors, 1 is skipped."""
    from common import junit_summary

    (tmp_path / "test_known.py").write_text(textwrap.dedent("""
            import pytest

            @pytest.fixture
            def broken():
                raise RuntimeError("fixture broke")

            def test_one(): pass
            def test_two(): pass
            def test_fails(): assert 1 + 1 == 3, "arithmetic"
            def test_errors(broken): pass
            @pytest.mark.skip(reason="not today")
            def test_skipped(): pass
            """))
    report = tmp_path / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-c", os.devnull]
        + [str(tmp_path / "test_known.py"), f"--junitxml={report}"],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    counts = junit_summary(report)
    assert {k: counts[k] for k in ("passed", "failed", "errors", "skipped")} == dict(
        passed=2, failed=1, errors=1, skipped=1
    )
    failures = {f["test"].split("::")[-1]: f for f in counts["failures"]}
    assert failures["test_fails"]["kind"] == "failed" and "arithmetic" in failures["test_fails"]["message"]
    assert failures["test_errors"]["kind"] == "error" and "fixture broke" in failures["test_errors"]["message"]
    assert junit_summary(tmp_path / "absent.xml")["report"] == "missing"
    # A session stopped mid-test leaves a testcase with no name: no test's outcome.
    (tmp_path / "stopped.xml").write_text(
        '<testsuite><testcase classname="m" name="t" /><testcase time="5" /></testsuite>'
    )
    assert junit_summary(tmp_path / "stopped.xml")["passed"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget-s", "0"], "--budget-s must be positive"),
        (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    ],
)
def test_gpu_check_rejects_bad_arguments(tmp_path, args, message):
    p = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), *args, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert p.returncode == 2 and message in p.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_refuses_a_directory_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    p = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--cpu", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert p.returncode == 2 and "notes.txt" in p.stderr and "new or empty directory" in p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["notes.txt"]


def test_suite_speculative_section_on_the_cpu(benchmarks, tmp_path):
    """suite.py --only speculative at tiny shapes: the draft's step, the verify/decode ratio and the projection,
    each projected time per token computed from the measured steps as the docstring states."""
    import suite

    argv = ["--cpu", "--only", "speculative", "--copy-gbps", "10", "--out-dir", str(tmp_path)]
    assert suite.main(argv) == 0
    [record_file] = tmp_path.glob("*-speculative.json")
    rows = json.loads(record_file.read_text())["rows"]
    assert not [r for r in rows if r["note"].startswith(("error", "not run"))], rows
    draft = next(r for r in rows if r["name"].startswith("draft decode step"))
    ratio = next(r for r in rows if r["name"].startswith("verify step"))
    projected = [r for r in rows if r["name"].startswith("projected")]
    assert draft["value"] > 0 and ratio["value"] > 0 and ratio["baseline_value"] > 0
    assert len(projected) == len(suite.SPEC_ACCEPTANCE)
    per_token = [r["value"] for r in projected]
    assert per_token == sorted(per_token, reverse=True)  # more accepted, less time per token
    verify_ms = ratio["value"] * ratio["baseline_value"]
    for r, a in zip(projected, suite.SPEC_ACCEPTANCE):
        tokens = (1 - a ** (suite.SPEC_K + 1)) / (1 - a)
        assert f"{tokens:.2f} tokens per verify step" in r["note"]
        # one verify step and k + 1 draft steps (k proposals, then the draft's pass over the last) per verify step
        assert r["value"] == pytest.approx((verify_ms + (suite.SPEC_K + 1) * draft["value"]) / tokens, rel=1e-3)
        assert r["ratio"] == pytest.approx(r["baseline_value"] / r["value"])
    # The policy at a larger batch, with the acceptance from which prompt lookup pays.
    [batch] = [r for r in rows if r["name"].endswith(f"batch {suite.cpu_plan().spec_batches[0]}")]
    assert batch["value"] > 0 and "prompt lookup pays from acceptance" in batch["note"]
    # tokens(a) = 1 + a + ... + a^k against the verify/decode ratio
    assert suite._break_even(sum(0.5**j for j in range(suite.SPEC_K + 1))) == "0.50"
    assert suite._break_even(0.9).startswith("0 ") and suite._break_even(suite.SPEC_K + 1.5).startswith("none")
