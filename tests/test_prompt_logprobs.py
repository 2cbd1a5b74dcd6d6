"""Prompt log-probabilities (SamplingParams.prompt_logprobs) against transformers' log-softmax at every prompt
position: whole and chunked prompts, beside plain requests, after the prefix cache was warmed with the same prompt,
under preemption, with n samples, streamed; and the parameter's checks."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from conftest import EOS_ID, TOKENIZER_SIZE
from fastcodegen import SamplingParams
from fastcodegen.request import RequestState

# The engine computes fp32 logits with its own kernels and reductions; transformers' fp32 forward agrees with it
# to about 1e-5 on these tiny models, and a log-softmax adds no more than the logits' error.
ATOL = 1e-4
GREEDY = dict(temperature=0.0, ignore_eos=True)


def reference(hf, prompt: list[int], k: int) -> list[dict[int, float] | None]:
    """transformers' log-softmax over the tokenizer's ids at each position, as the engine reports it."""
    with torch.no_grad():
        lp = hf(torch.tensor([prompt])).logits[0, :, :TOKENIZER_SIZE].double().log_softmax(-1)
    out: list[dict[int, float] | None] = [None]
    for p in range(len(prompt) - 1):
        top = lp[p].topk(k).indices.tolist() if k else []
        out.append({t: lp[p, t].item() for t in set(top) | {prompt[p + 1]}})
    return out


def check(got, want) -> None:
    assert got is not None and len(got) == len(want)
    assert got[0] is None
    for p, (g, w) in enumerate(zip(got[1:], want[1:]), start=1):
        assert g is not None, f"position {p} not scored"
        assert set(g) == set(w), f"position {p}: tokens {sorted(g)} != {sorted(w)}"
        for t in w:
            assert g[t] == pytest.approx(w[t], abs=ATOL), (p, t)


def random_prompts(lengths, seed) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.choice([t for t in range(TOKENIZER_SIZE) if t != EOS_ID]) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_match_transformers(engine_factory, fresh_seed, k):
    engine, hf = engine_factory("hd64")
    prompts = random_prompts([1, 2, 7, 16, 17, 45], fresh_seed)
    params = SamplingParams(max_tokens=3, prompt_logprobs=k, logprobs=k, **GREEDY)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    for prompt, out in zip(prompts, outs):
        check(out.prompt_logprobs, reference(hf, prompt, k))
        # The first generated token's logprobs continue the prompt's: the last prompt position is sampled.
        ref_next = reference(hf, prompt + out.outputs[0].token_ids[:1], k)[-1]
        first = out.outputs[0].logprobs[0]
        assert set(first) == set(ref_next)
        assert all(first[t] == pytest.approx(ref_next[t], abs=ATOL) for t in ref_next)


def test_plain_requests_carry_no_prompt_logprobs(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    [prompt] = random_prompts([9], fresh_seed)
    plain, scored = engine.generate(
        prompt_token_ids=[prompt, prompt],
        sampling_params=[SamplingParams(max_tokens=4, **GREEDY), SamplingParams(max_tokens=4, prompt_logprobs=1, **GREEDY)],
    )
    assert plain.prompt_logprobs is None
    check(scored.prompt_logprobs, reference(hf, prompt, 1))
    assert plain.outputs[0].token_ids == scored.outputs[0].token_ids


def test_chunks_respect_the_logits_row_cap_and_score_each_position_once(engine_factory, fresh_seed, monkeypatch):
    # max_num_seqs=2: at most 4 logits rows per step, so a scored prompt runs a few positions a step, beside decodes.
    engine, hf = engine_factory("hd64", max_num_seqs=2, max_num_batched_tokens=24)
    cap = engine._scheduler._core.config.max_samples
    rows_per_step = []
    execute = engine._runner.execute

    def counting_execute(step, *rest):
        rows_per_step.append((step.num_samples, step.num_prompt_logits))
        return execute(step, *rest)

    scored = Counter()
    score_prompt = RequestState.score_prompt

    def counting_score(self, position, lp):
        scored[(self.request_id, position)] += 1
        score_prompt(self, position, lp)

    monkeypatch.setattr(engine._runner, "execute", counting_execute)
    monkeypatch.setattr(RequestState, "score_prompt", counting_score)
    prompts = random_prompts([30, 11, 40, 5], fresh_seed)
    params = [SamplingParams(max_tokens=6, prompt_logprobs=2 if i % 2 == 0 else None, **GREEDY) for i in range(4)]
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    assert all(s + p <= cap for s, p in rows_per_step)
    assert max(p for _, p in rows_per_step) > 0
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        if i % 2 == 0:
            check(out.prompt_logprobs, reference(hf, prompt, 2))
            assert all(scored[(out.request_id, p)] == 1 for p in range(len(prompt) - 1))
        else:
            assert out.prompt_logprobs is None
    assert sum(scored.values()) == sum(len(prompts[i]) - 1 for i in (0, 2))
    engine._scheduler.check()


def test_prefix_cache_warmed_by_the_same_prompt(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    [prompt] = random_prompts([50], fresh_seed)
    engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=2, **GREEDY))
    hits = engine.stats.prefix_hit_tokens
    [again] = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=2, **GREEDY))
    assert engine.stats.prefix_hit_tokens > hits  # the cache does hold the prompt
    hits = engine.stats.prefix_hit_tokens
    [out] = engine.generate(
        prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=2, prompt_logprobs=0, **GREEDY)
    )
    assert engine.stats.prefix_hit_tokens == hits  # a prompt to score is computed whole
    check(out.prompt_logprobs, reference(hf, prompt, 0))
    assert out.outputs[0].token_ids == again.outputs[0].token_ids


def test_preemption_keeps_every_position(engine_factory, fresh_seed):
    # 128 tokens of KV cache (one full-length sequence) for six prompts growing by 40 tokens: preemptions,
    # some in the middle of a prompt whose chunks are capped by the logits rows.
    engine, hf = engine_factory("hd64", kv_cache_tokens=128, max_num_seqs=4, max_num_batched_tokens=32)
    prompts = random_prompts([30, 25, 33, 20, 31, 28], fresh_seed)
    outs = engine.generate(
        prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=40, prompt_logprobs=1, **GREEDY)
    )
    assert engine.stats.preemptions > 0
    for prompt, out in zip(prompts, outs):
        check(out.prompt_logprobs, reference(hf, prompt, 1))
    engine._scheduler.check()
    assert engine.num_free_kv_blocks == engine.kv_cache_tokens // 16


def test_n_samples_share_one_scored_prompt(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    [prompt] = random_prompts([21], fresh_seed)
    [out] = engine.generate(
        prompt_token_ids=[prompt],
        sampling_params=SamplingParams(
            n=3, temperature=1.0, seed=fresh_seed % 1000, max_tokens=5, prompt_logprobs=2, ignore_eos=True
        ),  # a sample may draw end-of-text: every one runs its 5 tokens
    )
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 5 for c in out.outputs)
    check(out.prompt_logprobs, reference(hf, prompt, 2))


def test_streamed_outputs_carry_the_whole_prompt_from_the_first(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64", max_num_seqs=2)  # chunks of at most 4 positions: several steps
    [prompt] = random_prompts([26], fresh_seed)
    want = reference(hf, prompt, 1)
    outs = list(
        engine.generate(
            prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=4, prompt_logprobs=1, **GREEDY),
            stream=True,
        )  # fmt: skip
    )
    assert len(outs) == 4
    for out in outs:
        check(out.prompt_logprobs, want)


def test_abort_while_the_prompt_is_scored(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64", max_num_seqs=2)
    [prompt] = random_prompts([40], fresh_seed)
    rid = engine.add_request(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=4, prompt_logprobs=0))
    engine.step()  # scores the first few positions
    engine.abort(rid)
    assert not engine.has_unfinished_requests()
    engine._scheduler.check()
    [out] = engine.generate(
        prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=2, prompt_logprobs=0, **GREEDY)
    )
    check(out.prompt_logprobs, reference(hf, prompt, 0))


@pytest.mark.parametrize("value", [-1, 21, 1.5, True, "2"])
def test_bad_prompt_logprobs_are_refused_naming_it(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
