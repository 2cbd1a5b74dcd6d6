"""The GPU check: build, then every check in order of value, each within its own time limit, in one command.

    bash benchmarks/gpu_check.sh OUTDIR          # on a CUDA machine: at most --budget-s (525 s), the build included
    bash benchmarks/gpu_check.sh --cpu OUTDIR    # the same stages at tiny shapes on the CPU: a smoke test

Stages, in order of value:

    0 build         pip install --no-build-isolation --no-deps -e . (log: build.log), then imports
                    fastcodegen._C and fastcodegen.kernels; --cpu skips it when they already import
    1 environment   device, SM count, memory, driver (nvidia-smi), versions, commit; copy bandwidth and
                    matmul rates (suite.py --only ceilings)
    2 kernel-tests  the compiled kernels against their references at the real 350M/2B/6B/16B shapes in
                    float16 and bfloat16 (pytest -m gpu tests/test_kernels_gpu.py, in 8 pytest-xdist
                    processes where xdist is installed, so kernels compile in parallel; --cpu: two
                    interpreter kernel tests)
    3 engine-tests  the engine on CUDA (pytest -m gpu tests/test_backend_parity.py tests/test_cuda.py
                    tests/test_cuda_graphs.py; --cpu: tests/test_backend_parity.py -m "not gpu",
                    but its scheduler fuzz test)
    4 decode        batch-1 decode ms/token against the bandwidth floor, 350M to 16B; transformers where
                    time is left (suite.py --only decode)
    5 kernel-bench  the kernel microbenchmarks (suite.py --only kernels: bench_kernels.py per model size)
    6 suite-rest    time to first token and throughput (suite.py --only ttft throughput)
    7 speculative   speculative decoding's step costs: verify and decode steps of 6B and 16B, a 350M
                    draft's step, the projected 16B time per token (suite.py --only speculative), in
                    whatever time the earlier stages left

Each stage runs under coreutils' `timeout` (SIGINT at its limit, SIGKILL 10 s later; pytest's
per-test --timeout where pytest-timeout is installed). Its limit is the
least of its own cap and what the budget leaves once later stages' reserves are set aside, so a stage
that hangs costs its cap, never the stages after it. A stage that fails or runs out of time is recorded
as such and the next one runs. The suite's stages get the limit as --budget-s and start only work that
fits. Everything goes to OUTDIR as it happens (at most 8 files):

    summary.md        the summary table (stage, status, seconds, key numbers, Triton kernels compiled),
                      then each stage's details; rewritten before and after every stage
    summary.json      the same, machine-readable (test counts and failures, every measured row)
    build.log         the build's output
    stages.log        every stage's output, one after the other, under a header naming its command
    junit-kernels.xml, junit-engine.xml   pytest's reports of stages 2 and 3
    kernels.json      bench_kernels.py's own records (stage 5)

Triton's cache: the kernels may be compiled ahead of time for sm_90 into `.cache/triton-sm90/`
(a Triton cache directory, made by tools/warm_triton_cache.py). Its copy, or an empty directory, in a
fresh temporary place, is the run's TRITON_CACHE_DIR (never the user's); before the stages,
`tools/warm_triton_cache.py install` points the copy's entries at where they now lie and says whether
this machine's keys match. The summary counts the entries shipped and the new ones each stage compiled
on the machine (cache misses), by kernel name. --cpu uses an empty directory: the interpreter compiles
nothing.

A copy of the tree without its git history names its commit with FASTCODEGEN_COMMIT.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from common import commit, junit_summary

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CACHE = ROOT / ".cache" / "triton-sm90"
CACHE_TOOL = ROOT / "tools" / "warm_triton_cache.py"  # made the shipped cache; `install` relocates a copy of it
CACHE_INSTALL_S = 90.0  # install's key check imports Triton and the kernels
OUTPUTS = (
    "summary.md",
    "summary.json",
    "build.log",
    "stages.log",
    "junit-kernels.xml",
    "junit-engine.xml",
    "kernels.json",
)
ENGINE_TEST_FILES = ("tests/test_backend_parity.py", "tests/test_cuda.py", "tests/test_cuda_graphs.py")
# --cpu: the parity file's CPU tests but its scheduler fuzz test, minutes on two cores (the test run has it anyway).
CPU_ENGINE_TESTS = ("tests/test_backend_parity.py", "-m", "not gpu", "-k", "not fuzz")
# Two interpreter kernel tests for --cpu: prefill and split-K decode attention, head_dim 64, float16.
CPU_KERNEL_TESTS = (
    "tests/test_kernel_attention.py", "-k", "prefill and float16-64-single or decode_attention and float16-64-1"
)  # fmt: skip


@dataclass(frozen=True)
class StageSpec:
    """A stage's name and time: its cap on a GPU and with --cpu, and what is kept for it while earlier ones run."""

    key: str
    title: str
    gpu_cap_s: float
    cpu_cap_s: float
    gpu_reserve_s: float
    cpu_reserve_s: float


SPECS = (
    StageSpec("build", "build the extension", 180, 120, 0, 0),
    StageSpec("environment", "environment and ceilings", 60, 40, 30, 10),
    StageSpec("kernel-tests", "compiled kernels against references", 150, 60, 60, 15),
    StageSpec("engine-tests", "the engine on CUDA", 180, 90, 60, 15),
    StageSpec("decode", "batch-1 decode against the bandwidth floor", 120, 60, 45, 15),
    StageSpec("kernel-bench", "kernel microbenchmarks", 90, 30, 30, 10),
    StageSpec("suite-rest", "time to first token and throughput", 120, 60, 30, 15),
    StageSpec("speculative", "speculative decoding's step costs", 90, 30, 0, 15),
)


@dataclass
class CheckConfig:
    out_dir: Path
    cpu: bool
    budget_s: float
    python: str
    kernel_test_workers: int  # pytest-xdist workers for stage 2 (compiling kernels in parallel); 0: one process
    new_tokens: Optional[int]  # decode tokens per run (None: the suite's default)
    grace_s: float = 10.0  # from SIGINT to SIGKILL
    min_stage_s: float = 15.0  # a stage with less time than this is not started
    progress_s: float = 10.0  # how often a running stage's rows so far go into the summary
    specs: tuple[StageSpec, ...] = SPECS
    shipped_cache: Path = SHIPPED_CACHE
    cache_tool: Path = CACHE_TOOL


@dataclass
class StageResult:
    key: str
    title: str
    status: str = "pending"
    seconds: Optional[float] = None
    limit_s: Optional[float] = None
    returncode: Optional[int] = None
    command: Optional[str] = None
    summary: str = ""  # the key numbers, one line
    details: list[str] = field(default_factory=list)  # Markdown lines
    tests: Optional[dict] = None  # pytest stages: counts and failures
    rows: Optional[list[dict]] = None  # suite stages: the measured rows
    triton_new_kernels: Optional[int] = None
    triton_new_other: Optional[int] = None
    triton_new_by_kernel: dict = field(default_factory=dict)


@dataclass
class Step:
    """What a stage runs: a command, where its output goes, and how its result is read."""

    argv: list[str]
    read: Callable[[StageResult, int, bool], None]  # (result, returncode, timed_out)
    log: str = "stages.log"
    progress: Optional[Callable[[StageResult], None]] = None  # while it runs: what it has recorded so far


class TritonCache:
    """The run's Triton cache directory: a copy of the shipped one (or empty), and what each stage added.

    The interpreter of --cpu compiles nothing: it gets an empty directory, whatever was shipped.
    """

    def __init__(self, path: Path, shipped: Path, use_shipped: bool):
        self.path = path
        self.available = shipped.is_dir()
        self.source = shipped if self.available and use_shipped else None
        self.shipped = 0
        self.install = ""  # what tools/warm_triton_cache.py install said of the copy
        if self.source is not None:
            shutil.copytree(self.source, path)
            self.shipped = len(self.entries())
        else:
            path.mkdir(parents=True)
        self.seen = self.entries()

    def entries(self) -> set[str]:
        """Top-level subdirectories: one per compiled kernel, launcher or utility."""
        return {p.name for p in self.path.iterdir() if p.is_dir()}

    def new_since_last(self) -> tuple[int, int, dict[str, int]]:
        """(kernels, launchers and other entries, kernels by name) added since the last call."""
        now = self.entries()
        added, self.seen = now - self.seen, now
        kernels, other, names = 0, 0, Counter()
        for entry in added:
            files = [p.name for p in (self.path / entry).iterdir()]
            if any(f.endswith((".cubin", ".ptx", ".ttgir", ".ttir", ".llir", ".hsaco")) for f in files):
                kernels += 1
                meta = [f for f in files if f.endswith(".json") and not f.startswith("__grp__")]
                names[meta[0][: -len(".json")] if meta else "?"] += 1
            else:
                other += 1
        return kernels, other, dict(names)


class GpuCheck:
    """Runs the stages and keeps OUTDIR's summary current."""

    def __init__(self, config: CheckConfig):
        self.config = config
        self.out = config.out_dir
        self.start = time.monotonic()
        self.started = datetime.datetime.now().isoformat(timespec="seconds")
        self.specs = config.specs
        self.results = [StageResult(s.key, s.title) for s in self.specs]
        self.scratch = Path(tempfile.mkdtemp(prefix="fastcodegen-gpu-check-"))
        self.cache = TritonCache(self.scratch / "triton-cache", config.shipped_cache, use_shipped=not config.cpu)
        self.environment: dict = {"commit": commit(), "python": sys.version.split()[0]}
        self.copy_gbps: Optional[float] = None
        self.abort: Optional[str] = None  # why the remaining stages are not run
        self.output = ""  # the end of the last stage's output
        self.env = self._stage_env()

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        """Runs every stage; 0 when each one is ok (or skipped for a reason that is no failure), else 1."""
        try:
            self._install_cache()
            for index, result in enumerate(self.results):
                self._run_stage(index, result)
        except BaseException:
            for result in self.results:
                if result.status == "running":
                    result.status, result.summary = "timeout", "the check itself was stopped during this stage"
            raise
        finally:
            self.save()
            shutil.rmtree(self.scratch, ignore_errors=True)
        print(self.table(), flush=True)
        return 0 if all(r.status in ("ok", "skipped") for r in self.results) else 1

    def _install_cache(self) -> None:
        """Points the copied cache's entries at where they now lie (else every one misses), and checks its keys."""
        if self.cache.source is None:
            return
        tool = self.config.cache_tool
        if not tool.is_file():
            self.cache.install = f"not installed: {_shown(tool)} is missing, so its entries will miss"
            return
        step = Step([self.config.python, str(tool), "install", str(self.cache.path)], lambda *_: None)
        returncode = self._execute(step, CACHE_INSTALL_S, "triton cache: install", StageResult("cache", "install"))
        said = self.output.strip().splitlines()[-1:] or [""]
        self.cache.install = said[0] if returncode == 0 else f"install failed (exit status {returncode}): {said[0]}"
        self.cache.seen = self.cache.entries()
        self.save()
        print(f"[gpu_check] {self.cache.install}", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _limit(self, index: int) -> float:
        spec = self.specs[index]
        cap = spec.cpu_cap_s if self.config.cpu else spec.gpu_cap_s
        later = sum(s.cpu_reserve_s if self.config.cpu else s.gpu_reserve_s for s in self.specs[index + 1 :])
        return min(cap, self.config.budget_s - self.elapsed() - later - self.config.grace_s)

    def _run_stage(self, index: int, result: StageResult) -> None:
        spec = self.specs[index]
        limit = self._limit(index)
        if self.abort:
            return self._skip(index, result, self.abort)
        if limit < self.config.min_stage_s:
            return self._skip(index, result, f"not started: {max(limit, 0):.0f} s of the budget left for it")
        step = getattr(self, "_" + spec.key.replace("-", "_"))(result, limit)
        if step is None:  # the stage decided itself (skipped, or nothing to run)
            self.save()
            return self._report(index, result)
        result.status, result.limit_s, result.command = "running", round(limit), " ".join(step.argv)
        self.save()
        print(f"[gpu_check] {index} {spec.key}: running (limit {limit:.0f} s) ...", flush=True)
        t = time.monotonic()
        returncode = self._execute(step, limit, f"stage {index}: {spec.key}: {spec.title}", result)
        result.seconds = round(time.monotonic() - t, 1)
        result.returncode = returncode
        # 124: stopped by SIGINT; 137 or -9: killed after the grace period (`timeout` kills its whole group, itself too)
        timed_out = returncode in (124, 137, -9) and result.seconds >= limit - 1
        try:
            step.read(result, returncode, timed_out)
        except Exception as e:  # a result that cannot be read is the stage's failure, not the check's
            result.status, result.summary = "failed", f"its output could not be read: {type(e).__name__}: {e}"
        if timed_out:
            result.status = "timeout"
        elif returncode != 0 and result.status == "ok":
            result.status = "failed"
        kernels, other, names = self.cache.new_since_last()
        result.triton_new_kernels, result.triton_new_other, result.triton_new_by_kernel = kernels, other, names
        self.save()
        self._report(index, result)

    def _skip(self, index: int, result: StageResult, why: str) -> None:
        result.status, result.summary = "skipped", why
        self.save()
        self._report(index, result)

    def _report(self, index: int, result: StageResult) -> None:
        seconds = f" in {result.seconds:.1f} s" if result.seconds is not None else ""
        print(
            f"[gpu_check] {index} {result.key}: {result.status}{seconds} (elapsed {self.elapsed():.0f} s of "
            f"{self.config.budget_s:.0f}) {result.summary}",
            flush=True,
        )

    def _execute(self, step: Step, limit: float, header: str, result: StageResult) -> int:
        """Runs the step under `timeout` with its output appended to its log; self.output: the end of that output."""
        argv = ["timeout", "--signal=INT", f"--kill-after={self.config.grace_s:.0f}", f"{limit:.0f}", *step.argv]
        with open(self.out / step.log, "a") as log:
            log.write(f"\n===== {header} (limit {limit:.0f} s, at {self.elapsed():.0f} s)\n")
            log.write(f"===== $ {shlex.join(step.argv)}\n")
            log.flush()
            path = self.out / step.log
            start, t = path.stat().st_size, time.monotonic()
            # `timeout` leads a process group of its own: if the check is stopped, the whole group goes with it.
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            try:
                returncode = self._wait(proc, step, result)
            except BaseException:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
                raise
            with open(path, "rb") as written:
                written.seek(max(start, path.stat().st_size - 65536))
                self.output = written.read().decode(errors="replace")
            log.write(f"===== {header}: exit status {returncode} after {time.monotonic() - t:.1f} s\n")
        return returncode

    def _wait(self, proc: subprocess.Popen, step: Step, result: StageResult) -> int:
        """Waits for the stage; meanwhile the summary shows its rows so far, should the check be killed."""
        while True:
            try:
                return proc.wait(timeout=self.config.progress_s)
            except subprocess.TimeoutExpired:
                if step.progress is not None:
                    try:
                        step.progress(result)
                    except (OSError, ValueError, KeyError):
                        continue  # a record being replaced: next time
                    self.save()

    def _stage_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_HUB_CACHE=str(self.scratch / "hf-hub"),
            FASTCODEGEN_CACHE=str(self.scratch / "fastcodegen"),
            TOKENIZERS_PARALLELISM="false",
            TRITON_CACHE_DIR=str(self.cache.path),
        )
        env.pop("HF_HOME", None)
        if self.config.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU mode is the CPU mode, on a GPU machine too
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)  # the kernels must be compiled, never interpreted
        return env

    # ------------------------------------------------------------------ the stages

    def _build(self, result: StageResult, limit: float) -> Optional[Step]:
        check = [self.config.python, "-c", "import fastcodegen._C, fastcodegen.kernels"]
        if self.config.cpu and subprocess.run(check, cwd=ROOT, env=self.env, capture_output=True).returncode == 0:
            result.status, result.summary = "skipped", "fastcodegen._C already imports (--cpu)"
            return None
        pip = [self.config.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
        pip += ["--no-index", "--disable-pip-version-check"]  # offline: pip must not wait on a package index
        # One command line: pip, then the import check, so the log shows what a failed import said.
        script = f"{shlex.join(pip)} && {shlex.join(check)} && echo 'fastcodegen._C and fastcodegen.kernels import'"

        def read(result: StageResult, returncode: int, timed_out: bool) -> None:
            result.status = "ok" if returncode == 0 else "failed"
            result.summary = "built; fastcodegen._C and fastcodegen.kernels import" if returncode == 0 else "see below"
            if returncode != 0:
                result.details = self._output_tail(15)

        return Step(["bash", "-c", script], read, log="build.log")

    def _environment(self, result: StageResult, limit: float) -> Step:
        out = self.scratch / "environment"

        def read(result: StageResult, returncode: int, timed_out: bool) -> None:
            if returncode == 2 and not self.config.cpu and "needs a CUDA GPU" in self.output:
                self.abort = "no CUDA device (stage 1)"
                result.status, result.summary = "failed", "no CUDA device: torch.cuda.is_available() is False"
                return
            record = _suite_record(out)
            self.environment.update({k: v for k, v in record.items() if k not in ("rows", "mode", "minutes")})
            rows = record.get("rows", [])
            self._read_rows(result, rows)
            notes = result.summary
            copy = [r for r in rows if r["name"] == "device-to-device copy" and r["value"]]
            self.copy_gbps = copy[0]["value"] if copy else None
            env = self.environment
            parts = [env.get("device", "?")]
            if env.get("num_sms"):
                parts.append(
                    f"{env['num_sms']} SMs, {env.get('memory_gib')} GiB, sm_{env['capability'].replace('.', '')}"
                )
            if env.get("driver"):
                parts.append(f"driver {env['driver']}")
            parts += [
                f"{r['name'].replace('device-to-device ', '')} {_num(r['value'])} {r['unit']}"
                for r in rows
                if r["value"]
            ]
            result.summary = "; ".join(parts + ([notes] if notes else []))
            keys = (
                "device",
                "num_sms",
                "memory_gib",
                "capability",
                "driver",
                "cuda",
                "torch",
                "triton",
                "transformers",
                "python",
                "commit",
                "cpu_count",
            )
            result.details = [f"- {k}: {env.get(k)}" for k in keys] + [""] + _rows_table(rows)

        return Step(self._suite(["ceilings"], out, limit), read)

    def _kernel_tests(self, result: StageResult, limit: float) -> Step:
        report = self.out / "junit-kernels.xml"
        if self.config.cpu:
            args = [CPU_KERNEL_TESTS[0], "-m", "not gpu", *CPU_KERNEL_TESTS[1:]]
        else:
            args = ["tests/test_kernels_gpu.py", "-m", "gpu", *self._workers()]
        return Step(self._pytest(args, report, per_test_s=120), self._read_junit(report))

    def _engine_tests(self, result: StageResult, limit: float) -> Optional[Step]:
        report = self.out / "junit-engine.xml"
        wanted, options = (
            (CPU_ENGINE_TESTS[:1], CPU_ENGINE_TESTS[1:]) if self.config.cpu else (ENGINE_TEST_FILES, ["-m", "gpu"])
        )
        files = [f for f in wanted if (ROOT / f).is_file()]
        missing = [f for f in wanted if f not in files]
        if not files:
            result.status, result.summary = "skipped", f"no test file: {', '.join(missing)} missing"
            return None
        read = self._read_junit(report, missing)
        return Step(self._pytest([*files, *options], report, per_test_s=240), read)

    def _decode(self, result: StageResult, limit: float) -> Step:
        out = self.scratch / "decode"
        extra = ["--new-tokens", str(self.config.new_tokens)] if self.config.new_tokens else []
        return Step(
            self._suite(["decode"], out, limit, extra), self._read_suite(out, _decode_summary), progress=_progress(out)
        )

    def _kernel_bench(self, result: StageResult, limit: float) -> Step:
        out = self.scratch / "kernels"

        def read(result: StageResult, returncode: int, timed_out: bool) -> None:
            self._read_suite(out, _kernel_summary)(result, returncode, timed_out)
            raw = sorted(out.glob("*.bench_kernels.json"))
            if raw:
                shutil.copyfile(raw[0], self.out / "kernels.json")
                fractions = _kernel_fractions(json.loads(raw[0].read_text()))
                result.summary = "; ".join(p for p in (result.summary, fractions) if p)

        return Step(self._suite(["kernels"], out, limit), read, progress=_progress(out))

    def _suite_rest(self, result: StageResult, limit: float) -> Step:
        out = self.scratch / "rest"
        read = self._read_suite(out, _rest_summary)
        return Step(self._suite(["ttft", "throughput"], out, limit), read, progress=_progress(out))

    def _speculative(self, result: StageResult, limit: float) -> Step:
        out = self.scratch / "speculative"
        return Step(self._suite(["speculative"], out, limit), self._read_suite(out, _spec_summary), progress=_progress(out))

    # ------------------------------------------------------------------ commands and their results

    def _suite(self, sections: list[str], out: Path, limit: float, extra: Optional[list[str]] = None) -> list[str]:
        # The suite stops starting work this long before the limit: its imports, and the last piece's overrun.
        budget = max(1.0, limit - 15.0)
        argv = [self.config.python, "benchmarks/suite.py", "--only", *sections, "--out-dir", str(out)]
        argv += ["--budget-s", f"{budget:.0f}", *(extra or [])]
        if self.copy_gbps and "ceilings" not in sections:
            argv += ["--copy-gbps", f"{self.copy_gbps:.1f}"]
        return argv + (["--cpu"] if self.config.cpu else [])

    def _pytest(self, args: list[str], report: Path, per_test_s: int) -> list[str]:
        argv = [self.config.python, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", "--tb=short", "-rfE"]
        argv.append(f"--junitxml={report}")
        if _importable("pytest_timeout"):
            # signal, not thread: the thread method ends the whole process, and pytest's report with it
            argv += [f"--timeout={per_test_s}", "--timeout-method=signal"]
        return argv

    def _workers(self) -> list[str]:
        n = self.config.kernel_test_workers
        return ["-n", str(n)] if n > 0 and _importable("xdist") else []

    def _read_junit(
        self, report: Path, missing: Optional[list[str]] = None
    ) -> Callable[[StageResult, int, bool], None]:
        def read(result: StageResult, returncode: int, timed_out: bool) -> None:
            counts = junit_summary(report)
            result.tests = counts
            ran = counts["passed"] + counts["failed"] + counts["errors"]
            result.summary = (
                f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                f"{counts['skipped']} skipped" + ("" if counts["report"] == "ok" else "; pytest wrote no report")
            )
            # ok: pytest succeeded and something ran (all skipped on a GPU machine means nothing was checked)
            result.status = "ok" if returncode == 0 and counts["passed"] > 0 and ran == counts["passed"] else "failed"
            details = []
            if missing:
                details.append(f"Not run, missing: {', '.join(missing)}")
                result.summary += f"; missing: {', '.join(missing)}"
            if counts["failures"]:
                details += ["Failures (first lines of each error):", ""]
                details += [f"- `{f['test']}` ({f['kind']}): {f['message']}" for f in counts["failures"]]
            elif returncode not in (0, 124, 137, -9):
                details += self._output_tail(10)
            result.details = details

        return read

    def _read_suite(
        self, out: Path, summarize: Callable[[list[dict]], str]
    ) -> Callable[[StageResult, int, bool], None]:
        def read(result: StageResult, returncode: int, timed_out: bool) -> None:
            rows = _suite_record(out).get("rows", [])
            self._read_rows(result, [r for r in rows if r["section"] != "ceilings"])
            key = summarize(result.rows)
            result.summary = "; ".join(p for p in (key, result.summary) if p)
            if returncode not in (0, 124, 137, -9):
                result.details += ["", *self._output_tail(10)]

        return read

    def _output_tail(self, lines: int) -> list[str]:
        """The last lines of the stage's output, as Markdown."""
        tail = self.output.rstrip().splitlines()[-lines:]
        return ["The last lines of its output:", "", "```", *tail, "```"]

    def _read_rows(self, result: StageResult, rows: list[dict]) -> None:
        """Status and details from a suite's rows: a row with no value that was not deliberately skipped failed."""
        result.rows = rows
        failed = [r for r in rows if r["value"] is None and not r["note"].startswith("not run")]
        measured = [r for r in rows if r["value"] is not None]
        not_run = [r for r in rows if r["note"].startswith("not run")]
        result.status = "failed" if failed or not rows else ("ok" if measured else "skipped")
        notes = []
        if failed:
            notes.append(f"{len(failed)} failed")
        if not_run:
            notes.append(f"{len(not_run)} not run")
        if not rows:
            notes.append("no rows recorded")
        result.summary = ", ".join(notes)
        result.details = _rows_table(rows)

    # ------------------------------------------------------------------ the summary

    def save(self) -> None:
        _write(self.out / "summary.json", json.dumps(self.as_dict(), indent=1) + "\n")
        _write(self.out / "summary.md", self.markdown())

    def cache_line(self) -> str:
        kernels = sum(r.triton_new_kernels or 0 for r in self.results)
        other = sum(r.triton_new_other or 0 for r in self.results)
        if self.cache.source:
            shipped = f"shipped {self.cache.shipped} entries" + (
                f" ({self.cache.install})" if self.cache.install else ""
            )
        elif self.cache.available:
            shipped = f"{_shown(self.config.shipped_cache)} not used (--cpu: the interpreter compiles nothing)"
        else:
            shipped = f"none shipped (no {_shown(self.config.shipped_cache)})"
        return (
            f"triton cache: {shipped}; this run compiled {kernels} new kernels (+{other} launchers and other entries)"
        )

    def as_dict(self) -> dict:
        return {
            "mode": "cpu" if self.config.cpu else "gpu",
            "started": self.started,
            "budget_s": self.config.budget_s,
            "elapsed_s": round(self.elapsed(), 1),
            "complete": all(r.status not in ("pending", "running") for r in self.results),
            "environment": self.environment,
            "triton_cache": {
                "shipped": self.cache.shipped,
                "shipped_from": _shown(self.cache.source) if self.cache.source else None,
                "install": self.cache.install,
                "new_kernels": sum(r.triton_new_kernels or 0 for r in self.results),
                "new_other": sum(r.triton_new_other or 0 for r in self.results),
                "line": self.cache_line(),
            },
            "stages": [asdict(r) for r in self.results],
            "files": sorted({p.name for p in self.out.iterdir() if p.name in OUTPUTS} | {"summary.json", "summary.md"}),
        }

    def table(self) -> str:
        lines = [
            "| # | stage | status | seconds | key numbers | new Triton kernels |",
            "|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(self.results):
            seconds = f"{r.seconds:.1f}" if r.seconds is not None else ""
            compiled = "" if r.triton_new_kernels is None else str(r.triton_new_kernels)
            summary = r.summary.replace("|", "/").replace("\n", " ")
            lines.append(f"| {i} | {r.key} | {r.status} | {seconds} | {summary} | {compiled} |")
        lines += ["", self.cache_line()]
        return "\n".join(lines) + "\n"

    def markdown(self) -> str:
        env = self.environment
        mode = "--cpu smoke mode, tiny shapes" if self.config.cpu else "GPU"
        done = all(r.status not in ("pending", "running") for r in self.results)
        lines = [
            f"# fastcodegen GPU check: {env.get('device', 'device not known yet')} ({mode})",
            "",
            f"{self.started}, commit {env.get('commit')}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"CUDA {env.get('cuda')}, driver {env.get('driver')}; {self.elapsed():.0f} s of a {self.config.budget_s:.0f} s "
            f"budget; " + ("complete." if done else "INCOMPLETE: this file was written while the check ran."),
            "",
            self.table(),
            "Statuses: ok; failed (see its details); timeout (stopped at its limit; what it wrote before is kept); "
            "skipped (not started, or nothing to do, for the reason given).",
        ]
        for i, r in enumerate(self.results):
            lines += [
                "",
                f"## {i} {r.key}: {r.title}",
                "",
                f"- status: {r.status}" + (f" ({r.summary})" if r.summary else ""),
            ]
            if r.limit_s is not None:
                lines.append(f"- time: {r.seconds} s of a {r.limit_s} s limit; exit status {r.returncode}")
            if r.command:
                lines.append(f"- command: `{r.command}`")
            if r.triton_new_by_kernel:
                by_name = ", ".join(f"{name} x{n}" for name, n in sorted(r.triton_new_by_kernel.items()))
                lines.append(f"- Triton kernels compiled during this stage: {by_name}")
            if r.details:
                lines += ["", *r.details]
        files = ", ".join(p for p in OUTPUTS if (self.out / p).exists())
        lines += ["", f"Files: {files}. Each stage's full output is in stages.log (the build's in build.log)."]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- helpers


def _progress(out: Path) -> Callable[[StageResult], None]:
    """A running suite stage's rows so far, from the record it rewrites after each row."""

    def progress(result: StageResult) -> None:
        rows = [r for r in _suite_record(out).get("rows", []) if r["section"] != "ceilings"]
        result.rows, result.details = rows, _rows_table(rows)
        result.summary = f"running: {sum(r['value'] is not None for r in rows)} measurements so far"

    return progress


def _decode_summary(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["baseline"] == "bandwidth floor" and r["value"] is not None:
            size = r["name"].split()[-1].removeprefix("codegen-").removesuffix("-mono")
            eager = [x for x in rows if x["name"] == r["name"] and x["baseline"] == "transformers eager" and x["ratio"]]
            vs = f", {eager[0]['ratio']:.1f}x transformers" if eager else ""
            parts.append(f"{size} {_num(r['value'])} ms/token ({r['ratio']:.0%} of floor{vs})")
    return "; ".join(parts)


def _kernel_summary(rows: list[dict]) -> str:
    timed = [r for r in rows if r["value"] is not None]
    return f"{len(timed)} rows checked and timed" if timed else ""


def _kernel_fractions(records: list[dict]) -> str:
    """The median fraction of its ceiling each kernel reached, over the rows that were timed."""
    fractions: dict[str, list[float]] = {}
    for record in records:
        for r in record.get("rows", []):
            if r.get("fraction_of_ceiling") is not None:
                fractions.setdefault(r["kernel"], []).append(r["fraction_of_ceiling"])
    parts = [f"{k} {sorted(v)[len(v) // 2]:.0%}" for k, v in fractions.items()]
    return "median of ceiling: " + ", ".join(parts) if parts else "no kernel timed"


def _rest_summary(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["value"] is None:
            continue
        if r["section"] == "ttft":
            parts.append(f"{r['name'].split(',')[0].replace('... the same prompt', 'cached')} {_num(r['value'])} ms")
        elif r["section"] == "throughput" and r["baseline"] is None:
            parts.append(f"{r['name']} {_num(r['value'])} tokens/s")
        elif r["section"] == "throughput" and r["ratio"]:
            parts.append(f"({r['ratio']:.1f}x transformers)")
    return "; ".join(parts)


def _spec_summary(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["value"] is None:
            continue
        if r["name"].startswith("verify step") and ", batch " in r["name"]:
            name, batch = r["name"].split()[-3].rstrip(","), r["name"].split()[-1]
            parts.append(f"{name} batch {batch} verify/decode {r['value']:.2f}x")
        elif r["name"].startswith("verify step"):
            parts.append(f"{r['name'].split()[-1]} verify/decode {r['value']:.2f}x")
        elif r["name"].startswith("projected") and "acceptance 0.8" in r["name"]:
            parts.append(f"{r['name'].split()[2].rstrip(',')} at 0.8: {_num(r['value'])} ms/token ({r['ratio']:.2f}x the floor)")
    return "; ".join(parts)


def _rows_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "| measurement | fastcodegen | unit | compared with | its value | ratio | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        cells = [
            r["name"],
            _num(r["value"]),
            r["unit"],
            r["baseline"] or "",
            _num(r["baseline_value"]),
            ratio,
            r["note"],
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return lines


def _num(x: Optional[float]) -> str:
    if x is None:
        return ""
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def _suite_record(out: Path) -> dict:
    records = [p for p in out.glob("*.json") if not p.name.endswith(".bench_kernels.json")] if out.is_dir() else []
    return json.loads(records[0].read_text()) if records else {}


def _write(path: Path, text: str) -> None:
    """Replaces the file whole: a reader (or a kill) never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _shown(path: Path) -> str:
    """A path as the summary shows it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) + "/" if path.is_relative_to(ROOT) else str(path)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def parse_args(argv: Optional[list[str]] = None) -> CheckConfig:
    p = argparse.ArgumentParser(
        prog="gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out_dir", type=Path, metavar="OUTDIR", help="where the summary and logs go (new or empty)")
    p.add_argument("--cpu", action="store_true", help="the same stages at tiny shapes on the CPU (a smoke test)")
    p.add_argument("--budget-s", type=float, help="seconds the whole check may take (default: 525; --cpu: 170)")
    p.add_argument(
        "--kernel-test-workers",
        type=int,
        default=8,
        help="pytest-xdist processes for stage 2 when xdist is installed (default 8; 0: one process)",
    )
    p.add_argument("--new-tokens", type=int, default=128, help="decode: tokens per timed run (default 128)")
    args = p.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be at least 2, got {args.new_tokens}")
    if args.kernel_test_workers < 0:
        p.error(f"--kernel-test-workers must be 0 or more, got {args.kernel_test_workers}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        p.error(f"OUTDIR {args.out_dir} is a file, not a directory")
    if args.out_dir.is_dir():
        foreign = sorted(p.name for p in args.out_dir.iterdir() if p.name not in OUTPUTS)
        if foreign:
            p.error(f"OUTDIR {args.out_dir} holds files the check did not write ({', '.join(foreign[:3])}): "
                    "give a new or empty directory")  # fmt: skip
    if shutil.which("timeout") is None:
        p.error("coreutils' timeout is not on the PATH: the stages' time limits need it")
    return CheckConfig(
        out_dir=args.out_dir,
        cpu=args.cpu,
        budget_s=args.budget_s if args.budget_s is not None else (170.0 if args.cpu else 525.0),
        python=sys.executable,
        kernel_test_workers=args.kernel_test_workers,
        new_tokens=None if args.cpu else args.new_tokens,
    )


def main(argv: Optional[list[str]] = None) -> int:
    config = parse_args(argv)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a rerun into the same directory starts clean
        (config.out_dir / name).unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return GpuCheck(config).run()
    except KeyboardInterrupt:
        print("[gpu_check] stopped; the summary says how far it got", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    """A SIGTERM (a machine's own time limit) ends the check like Ctrl-C: the summary is written on the way out."""
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
