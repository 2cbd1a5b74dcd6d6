"""`fastcodegen eval` end to end: drawing samples with the engine, resuming, scoring, the summary and the CLI.

The references: `Engine.generate` for what a sample must be (greedy), the
MTPB protocol's `turn_prompt` for how turns chain, HumanEval's canonical
solutions for what passes, and pass@k recomputed by hand from the per-sample
verdicts.
"""

from __future__ import annotations

import json
from dataclasses import replace
from math import comb

import pytest

from fastcodegen import Engine, SamplingParams
from fastcodegen.cli import main
from fastcodegen.eval import harness, humaneval, mtpb
from fastcodegen.eval.generation import generate_samples
from fastcodegen.eval.harness import EvalConfig, evaluate

HUMANEVAL_TASKS = ("HumanEval/0", "HumanEval/2", "HumanEval/7")


@pytest.fixture(scope="module")
def tiny_engine():
    engine = Engine("codegen-tiny-py", device="cpu", dtype="float32", backend="torch", progress=False)
    yield engine
    engine.close()


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_samples_equal_engine_generate(tiny_engine):
    config = EvalConfig("humaneval", model="codegen-tiny-py", n=2, temperature=0, max_tokens=48, tasks=HUMANEVAL_TASKS)
    problems = humaneval.load_problems(tasks=HUMANEVAL_TASKS)
    samples = []
    stats = generate_samples(
        tiny_engine, harness.tasks_for("humaneval", problems, 48), 2, harness.sampling_params(config),
        on_sample=samples.append,
    )  # fmt: skip
    assert sorted((s.task.key, s.sample_index) for s in samples) == sorted(
        (t, i) for t in HUMANEVAL_TASKS for i in range(2)
    )
    params = SamplingParams(
        temperature=0, max_tokens=48, stop=list(harness.HUMANEVAL_STOP),
        stop_patterns=list(harness.CODEGEN_STOP_PATTERNS),
    )  # fmt: skip
    expect = {
        p.task_id: o.outputs[0] for p, o in zip(problems, tiny_engine.generate([p.prompt for p in problems], params))
    }
    for s in samples:
        assert s.completions == [expect[s.task.key].text]
        assert s.tokens == len(expect[s.task.key].token_ids)
    assert stats.samples == 6
    # Three prompts with nothing in common and nothing cached before: the cache serves none of the prefill,
    # and the model computes each prompt once (its n completions share it).
    assert stats.prefix_hit_tokens == 0 and stats.preemptions == 0
    assert stats.prefill_tokens == sum(len(tiny_engine.tokenizer.encode(p.prompt)) for p in problems)
    assert stats.generated_tokens == sum(s.tokens for s in samples)
    assert not tiny_engine.has_unfinished_requests()


def test_mtpb_turns_chain_and_hit_the_prefix_cache(tiny_engine):
    [problem] = mtpb.load_problems(ids=["3"])
    config = EvalConfig("mtpb", model="codegen-tiny-py", n=2, temperature=0.8, max_tokens=12)
    tasks = harness.tasks_for("mtpb", [problem], 12)[:2]  # test cases 0 and 1
    samples = []
    stats = generate_samples(tiny_engine, tasks, 2, harness.sampling_params(config), on_sample=samples.append)
    assert len(samples) == 4
    for s in samples:
        tc = s.task.fields["test_case"]
        assert len(s.completions) == len(s.prompts) == problem.n_turns
        for turn, prompt in enumerate(s.prompts):
            assert prompt == mtpb.turn_prompt(problem, tc, turn, s.completions[:turn])
    # Every turn after the first starts with the previous turn's prompt: most of it is served from the cache.
    assert 0.3 < stats.prefix_hit_fraction < 1
    assert stats.prefix_hit_tokens + stats.prefill_tokens >= stats.prompt_tokens


def test_interrupted_run_resumes(tmp_path, tiny_engine, monkeypatch):
    out = tmp_path / "run"
    config = EvalConfig(
        "humaneval", model="codegen-tiny-py", n=3, temperature=0.8, max_tokens=24, tasks=HUMANEVAL_TASKS, out=out,
        k=(1, 2, 3), workers=2,
    )  # fmt: skip
    real_step, calls = Engine.step, []

    def step(self):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Engine, "step", step)
    with pytest.raises(KeyboardInterrupt):
        evaluate(config, tiny_engine, progress=False)
    monkeypatch.setattr(Engine, "step", real_step)
    assert not tiny_engine.has_unfinished_requests()  # the interrupted run's requests were aborted
    first = _lines(out / "samples.jsonl")
    assert 0 < len(first) < 9

    summary = evaluate(config, tiny_engine, progress=False)
    records = _lines(out / "samples.jsonl")
    assert records[: len(first)] == first  # kept, not drawn again
    assert sorted((r["task_id"], r["sample_index"]) for r in records) == sorted(
        (t, i) for t in HUMANEVAL_TASKS for i in range(3)
    )
    results = _lines(out / "results.jsonl")
    assert len(results) == 9 and summary["samples"] == 9
    # pass@k by hand: 1 - C(n - c, k) / C(n, k) per task, averaged
    for k in (1, 2, 3):
        by_hand = 0.0
        for t in HUMANEVAL_TASKS:
            c = sum(r["passed"] for r in results if r["task_id"] == t)
            by_hand += 1 - comb(3 - c, k) / comb(3, k)
        assert summary["pass_at_k"][f"pass@{k}"] == pytest.approx(by_hand / 3)
    assert json.loads((out / "summary.json").read_text())["pass_at_k"] == summary["pass_at_k"]

    with pytest.raises(ValueError, match="other settings"):
        evaluate(replace(config, temperature=0.2), tiny_engine, progress=False)


def test_canonical_samples_score_one(tmp_path, capsys):
    problems = humaneval.load_problems(tasks=HUMANEVAL_TASKS)
    path = tmp_path / "samples.jsonl"
    path.write_text(
        "".join(json.dumps({"task_id": p.task_id, "completion": p.canonical_solution}) + "\n" for p in problems)
    )
    assert main(["eval", "humaneval", "--samples", str(path), "--tasks", ",".join(HUMANEVAL_TASKS), "--k", "1",
                 "--out", str(tmp_path / "out"), "--workers", "2"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pass_at_k"] == {"pass@1": 1.0}
    assert summary["samples"] == 3
    assert "pass@1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k", "0"], "k"),
        (["--k", "one"], "--k"),
        (["--tasks", "HumanEval/999"], "HumanEval/999"),
        (["--n", "0"], "n must be"),
        (["--limit", "0"], "limit"),
    ],
)
def test_bad_options_exit_2(argv, message, tmp_path, capsys):
    assert main(["eval", "humaneval", "--offline", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_paper_protocol_runs_each_temperature(tmp_path, tiny_engine):
    config = EvalConfig(
        "humaneval", model="codegen-tiny-py", n=2, max_tokens=8, tasks=HUMANEVAL_TASKS[:1], out=tmp_path, paper=True,
        workers=1,
    )  # fmt: skip
    summary = evaluate(config, tiny_engine, progress=False)
    assert set(summary["runs"]) == {"t0.2", "t0.6", "t0.8"}
    for name, t in (("t0.2", 0.2), ("t0.6", 0.6), ("t0.8", 0.8)):
        run = json.loads((tmp_path / name / "summary.json").read_text())
        assert run["temperature"] == t and run["top_p"] == 0.95 and run["samples"] == 2
    # pass@1 from the 0.2 run; pass@10 and pass@100 need 10 and 100 samples, so n=2 reports neither
    assert set(summary["pass_at_k"]) == {"pass@1"}
    assert summary["pass_at_k"]["pass@1"] == summary["runs"]["t0.2"]["pass_at_k"]["pass@1"]
    assert summary["samples"] == 6


def test_a_conversation_past_the_context_ends_instead_of_failing_the_run(tiny_engine):
    # A context that holds MTPB problem 3's first turn and 8 new tokens, not its second turn's longer prompt.
    [problem] = mtpb.load_problems(ids=["3"])
    first = len(tiny_engine.tokenizer.encode(mtpb.turn_prompt(problem, 0, 0, [])))
    limit = first + 8
    engine = Engine(
        "codegen-tiny-py", device="cpu", dtype="float32", backend="torch", progress=False, max_model_len=limit
    )
    try:
        config = EvalConfig("mtpb", model="codegen-tiny-py", n=2, temperature=0.8, max_tokens=8)
        samples = []
        generate_samples(
            engine, harness.tasks_for("mtpb", [problem], 8)[:1], 2, harness.sampling_params(config),
            on_sample=samples.append,
        )  # fmt: skip
        assert len(samples) == 2
        for s in samples:
            assert len(s.completions) == problem.n_turns
            assert s.finish_reasons[0] != "context" and s.finish_reasons[1:] == ["context"] * (problem.n_turns - 1)
            assert s.completions[1:] == [""] * (problem.n_turns - 1)
            assert len(engine.tokenizer.encode(s.prompts[1])) >= limit
        assert not engine.has_unfinished_requests()
    finally:
        engine.close()
