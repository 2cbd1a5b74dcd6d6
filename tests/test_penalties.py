"""Presence and frequency penalties and logit_bias (OpenAI's semantics): the sampler against distributions computed
by hand, the engine against a greedy loop over transformers' logits, and the parameters' checks."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import EOS_ID, TOKENIZER_SIZE, hf_greedy
from fastcodegen import SamplingParams
from fastcodegen.request import Reader, RequestState
from fastcodegen.sampler import Sampler, SamplingInputs

# ---------------------------------------------------------------------------- references


def adjusted_logits(logits, counts: Counter, presence: float, frequency: float, bias: dict) -> np.ndarray:
    """OpenAI's formula, in float64: logits[t] - presence * (c[t] > 0) - frequency * c[t] + bias[t]."""
    a = np.array(logits, dtype=np.float64)
    for t, c in counts.items():
        a[t] -= presence * (c > 0) + frequency * c
    for t, b in bias.items():
        a[t] += b
    return a


def expected_probs(scores: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature, then the top_k highest, then the most likely tokens whose mass before each is below top_p."""
    x = scores / temperature
    order = np.argsort(-x, kind="stable")[: top_k or len(x)]
    p = np.exp(x[order] - x[order].max())
    p /= p.sum()
    if top_p < 1.0:
        before = np.cumsum(p) - p
        keep = (before < top_p) | (np.arange(len(p)) == 0)
        order, p = order[keep], p[keep] / p[keep].sum()
    out = np.zeros(len(x))
    out[order] = p
    return out


def hf_adjusted_greedy(model, prompt, steps, presence=0.0, frequency=0.0, bias=None, eos=None) -> list[int]:
    """A greedy loop over transformers' logits (the whole sequence run again each step), the formula applied by hand."""
    ids, counts = list(prompt), Counter()
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1, :TOKENIZER_SIZE].double().numpy()
            token = int(adjusted_logits(logits, counts, presence, frequency, bias or {}).argmax())
            ids.append(token)
            counts[token] += 1
            if token == eos:
                break
    return ids[len(prompt) :]


# ---------------------------------------------------------------------------- the sampler


def _request(core_id: int, params: SamplingParams) -> RequestState:
    return RequestState(str(core_id), core_id, None, [1], params, Reader())


def _inputs(rows: list[tuple[RequestState, int]], adjusted: list[int], temperature, top_k=0, top_p=1.0):
    """SamplingInputs.of a step whose row r samples completion rows[r][1] of request rows[r][0];
    `adjusted`: the rows sampled on their request's terms (host_sampled_rows)."""
    n = len(rows)
    arrays = {
        "host_sampled_rows": np.array(adjusted, dtype=np.int32),
        "sample_request": np.array([r.core_id for r, _ in rows], dtype=np.int64),
        "sample_index": np.array([i for _, i in rows], dtype=np.int32),
        "temperature": np.broadcast_to(np.float32(temperature), (n,)).copy(),
        "top_k": np.full(n, top_k, dtype=np.int32),
        "top_p": np.full(n, top_p, dtype=np.float32),
    }
    on_device = SimpleNamespace(**{k: torch.from_numpy(arrays[k]) for k in ("temperature", "top_k", "top_p")})
    requests = {r.core_id: r for r, _ in rows}
    return SamplingInputs.of(SimpleNamespace(arrays=arrays), on_device, requests, torch.device("cpu"))


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.85), (0.9, 6, 0.9)])
def test_sampled_frequencies_match_the_adjusted_distribution(fresh_seed, temperature, top_k, top_p):
    """20000 penalised and biased draws, and 20000 plain ones in the same batch: each token's frequency within
    5 standard deviations of its probability, computed by hand from the formula (plain rows: from the raw logits)."""
    draws, vocab = 20000, 8
    rng = np.random.default_rng(fresh_seed)
    logits = rng.normal(0.0, 1.5, vocab)
    prior = Counter({int(t): int(rng.integers(1, 4)) for t in rng.choice(vocab, 4, replace=False)})
    bias = {int(t): float(rng.uniform(-3, 3)) for t in rng.choice(vocab, 3, replace=False)}
    bias[next(iter(prior))] = float(rng.uniform(-3, 3))  # a token both penalised and biased gets both
    presence, frequency = (float(v) for v in rng.uniform(-2, 2, 2))
    adjusted = _request(
        1, SamplingParams(n=draws, presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias)
    )
    plain = _request(2, SamplingParams(n=draws))
    for i in range(draws):
        adjusted.completion(i).counts.update(prior)
    rows = [(adjusted, i) for i in range(draws)] + [(plain, i) for i in range(draws)]
    inputs = _inputs(rows, list(range(draws)), temperature, top_k, top_p)
    # Two ids past the sampler's vocabulary have the highest logits: they must never come out.
    batch = torch.tensor(np.concatenate([logits, [20.0, 20.0]]), dtype=torch.float32).repeat(2 * draws, 1)
    tokens = Sampler(vocab, torch.Generator().manual_seed(fresh_seed))(batch, inputs).tokens
    assert tokens.max() < vocab
    scores = adjusted_logits(logits, prior, presence, frequency, bias)
    for part, probs in (
        (tokens[:draws], expected_probs(scores, temperature, top_k, top_p)),
        (tokens[draws:], expected_probs(logits, temperature, top_k, top_p)),
    ):
        freq = np.bincount(part, minlength=vocab) / draws
        for f, p in zip(freq, probs):
            assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / draws) + 1e-12, (freq.tolist(), probs.tolist())


def test_greedy_rows_take_the_argmax_of_the_adjusted_logits(fresh_seed):
    """Each adjusted row its own request (own penalties, bias and counts); the plain rows of the same batch give
    bitwise the tokens of a batch without any adjusted row."""
    rows_n, vocab = 48, 50
    rng = np.random.default_rng(fresh_seed)
    logits = torch.from_numpy(rng.normal(0.0, 2.0, (rows_n, vocab)).astype(np.float32))
    adjusted_rows = sorted(rng.choice(rows_n, rows_n // 2, replace=False).tolist())
    rows, expected = [], {}
    for r in range(rows_n):
        if r not in adjusted_rows:
            rows.append((_request(r, SamplingParams(temperature=0.0)), 0))
            continue
        counts = Counter({int(t): int(rng.integers(1, 5)) for t in rng.choice(vocab, 10, replace=False)})
        bias = {int(t): float(rng.uniform(-5, 5)) for t in rng.choice(vocab, 5, replace=False)}
        presence, frequency = (float(v) for v in rng.uniform(-2, 2, 2))
        params = SamplingParams(
            temperature=0.0, presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias
        )
        req = _request(r, params)
        req.completion(0).counts.update(counts)
        rows.append((req, 0))
        expected[r] = int(adjusted_logits(logits[r].tolist(), counts, presence, frequency, bias).argmax())
    sampler = Sampler(vocab, torch.Generator().manual_seed(fresh_seed))
    tokens = sampler(logits, _inputs(rows, adjusted_rows, 0.0)).tokens
    assert {r: int(tokens[r]) for r in adjusted_rows} == expected
    plain_rows = [r for r in range(rows_n) if r not in adjusted_rows]
    alone = sampler(logits[plain_rows], _inputs([rows[r] for r in plain_rows], [], 0.0)).tokens
    assert tokens[plain_rows].tolist() == alone.tolist() == logits[plain_rows].argmax(dim=-1).tolist()


def test_plus_and_minus_100_force_and_ban_a_token_when_sampling(fresh_seed):
    draws, vocab = 4000, 30
    rng = np.random.default_rng(fresh_seed)
    logits = torch.from_numpy(rng.normal(0.0, 2.0, vocab).astype(np.float32)).repeat(draws, 1)
    top, forced = int(logits[0].argmax()), int(logits[0].argmin())
    ban = _request(1, SamplingParams(n=draws // 2, logit_bias={top: -100}))
    force = _request(2, SamplingParams(n=draws // 2, logit_bias={str(forced): 100}))
    rows = [(ban, i) for i in range(draws // 2)] + [(force, i) for i in range(draws // 2)]
    tokens = Sampler(vocab, torch.Generator().manual_seed(fresh_seed))(logits, _inputs(rows, range(draws), 1.0)).tokens
    assert top not in tokens[: draws // 2].tolist()
    assert (tokens[draws // 2 :] == forced).all()


def test_counts_grow_with_each_drawn_token_and_logprobs_stay_the_models(fresh_seed):
    """The completion counts what was drawn for it; the logprobs are those of the unadjusted logits."""
    vocab = 20
    rng = np.random.default_rng(fresh_seed)
    logits = torch.from_numpy(rng.normal(0.0, 2.0, (2, vocab)).astype(np.float32))
    forced = int(logits[0].argmin())
    params = SamplingParams(n=2, temperature=0.0, logprobs=3, frequency_penalty=0.5, logit_bias={forced: 100})
    req = _request(1, params)
    sampler = Sampler(vocab, torch.Generator())
    for step in range(1, 4):
        inputs = _inputs([(req, 0), (req, 1)], [0, 1], 0.0)
        sampled = sampler(logits, inputs)
        inputs.count(sampled)
        assert sampled.tokens.tolist() == [forced, forced]
        assert req.completion(0).counts == req.completion(1).counts == Counter({forced: step})
    raw = logits[0].double().numpy()
    ref = raw - (raw.max() + np.log(np.exp(raw - raw.max()).sum()))
    assert set(sampled.logprobs[0]) == set(np.argsort(-ref)[:3].tolist()) | {forced}
    for token, lp in sampled.logprobs[0].items():
        assert lp == pytest.approx(ref[token], abs=1e-5)


# ---------------------------------------------------------------------------- the engine

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _prompt(seed: int, length: int = 7) -> list[int]:
    return torch.randint(0, TOKENIZER_SIZE, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompt_it_changes(hf, seed: int, steps: int, **adjust) -> tuple[list[int], list[int]]:
    """A random prompt whose greedy continuation the penalties and bias `adjust` change, and that continuation."""
    for attempt in range(50):
        prompt = _prompt(seed + attempt)
        expected = hf_adjusted_greedy(hf, prompt, steps, **adjust)
        if expected != hf_greedy(hf, prompt, steps):
            return prompt, expected
    pytest.fail(f"no prompt found whose greedy continuation {adjust} changes")


def test_plus_100_bias_makes_every_greedy_token_that_one(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    prompt = _prompt(fresh_seed)
    x = int(torch.randint(0, TOKENIZER_SIZE - 1, (1,), generator=torch.Generator().manual_seed(fresh_seed)))
    x += x >= EOS_ID  # anything but end-of-text
    out = engine.generate(
        prompt_token_ids=[prompt],
        sampling_params=SamplingParams(max_tokens=6, logit_bias={x: 100}, logprobs=2, **GREEDY),
    )[0].outputs[0]
    assert out.token_ids == [x] * 6
    # The logprobs are the model's own: transformers' log-softmax over the tokenizer's ids.
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0].float()
    ref = logits[len(prompt) - 1 : -1, :TOKENIZER_SIZE].log_softmax(dim=-1)
    for step, lp in enumerate(out.logprobs):
        assert set(lp) == set(ref[step].topk(2).indices.tolist()) | {x}
        for token, value in lp.items():
            assert value == pytest.approx(ref[step, token].item(), abs=1e-4)


def test_minus_100_bias_changes_the_greedy_token(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    prompt = _prompt(fresh_seed)
    banned = hf_greedy(hf, prompt, 1)[0]
    params = SamplingParams(max_tokens=8, logit_bias={banned: -100}, **GREEDY)
    out = engine.generate(prompt_token_ids=[prompt], sampling_params=params)[0].outputs[0]
    assert out.token_ids[0] != banned and banned not in out.token_ids
    assert out.token_ids == hf_adjusted_greedy(hf, prompt, 8, bias={banned: -100})


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 0.8), (-0.4, 1.2)])
def test_greedy_penalties_match_a_loop_over_transformers(engine_factory, fresh_seed, presence, frequency):
    engine, hf = engine_factory("hd64")
    steps = 16
    prompt, expected = _prompt_it_changes(hf, fresh_seed, steps, presence=presence, frequency=frequency)
    params = SamplingParams(max_tokens=steps, presence_penalty=presence, frequency_penalty=frequency, **GREEDY)
    plain = SamplingParams(max_tokens=steps, **GREEDY)
    other = _prompt(fresh_seed + 1000, 11)
    # Batched with a plain request, which must not be affected.
    outs = engine.generate(prompt_token_ids=[prompt, other], sampling_params=[params, plain])
    assert outs[0].outputs[0].token_ids == expected
    assert outs[1].outputs[0].token_ids == hf_greedy(hf, other, steps)


def test_each_completion_counts_its_own_tokens(engine_factory, fresh_seed):
    """n=3 greedy forks of one prompt: each is penalised for its own tokens only, so each equals the reference."""
    engine, hf = engine_factory("hd64")
    steps = 16
    prompt, expected = _prompt_it_changes(hf, fresh_seed, steps, frequency=0.6, bias={EOS_ID: -100})
    params = SamplingParams(n=3, max_tokens=steps, frequency_penalty=0.6, logit_bias={str(EOS_ID): -100}, **GREEDY)
    out = engine.generate(prompt_token_ids=[prompt], sampling_params=params)[0]
    assert [c.token_ids for c in out.outputs] == [expected] * 3


def test_penalties_survive_preemption(engine_factory, fresh_seed):
    # The cache holds one full-length sequence (128 tokens), far less than five prompts growing by 40 tokens each.
    engine, hf = engine_factory("hd64", kv_cache_tokens=128)
    prompts = [_prompt(fresh_seed + i, 25 + 3 * i) for i in range(5)]
    params = SamplingParams(max_tokens=40, presence_penalty=0.7, frequency_penalty=0.3, **GREEDY)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    assert engine.stats.preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_adjusted_greedy(hf, prompt, 40, 0.7, 0.3)


def test_seeded_sampling_with_penalties_is_reproducible(engine_factory, fresh_seed):
    engine, _ = engine_factory("hd64")
    prompt, other = _prompt(fresh_seed), _prompt(fresh_seed + 1, 12)
    params = SamplingParams(
        n=3, temperature=1.0, max_tokens=16, seed=fresh_seed % 1000, presence_penalty=1.0, frequency_penalty=0.5,
        logit_bias={5: 3.0, 7: -2.0}, ignore_eos=True,
    )  # fmt: skip
    tokens = lambda out: [c.token_ids for c in out.outputs]  # noqa: E731
    alone = tokens(engine.generate(prompt_token_ids=[prompt], sampling_params=params)[0])
    again = tokens(engine.generate(prompt_token_ids=[prompt], sampling_params=params)[0])
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batched = engine.generate(prompt_token_ids=[other, prompt], sampling_params=[unseeded, params])[1]
    assert alone == again == tokens(batched)
    assert len({tuple(t) for t in alone}) > 1


# ---------------------------------------------------------------------------- the parameters


def test_parameters_are_normalised_and_hashable():
    bias = {"50": -100, np.int64(7): 2, torch.tensor(3): 0.5}
    p = SamplingParams(presence_penalty=1, frequency_penalty=np.float32(-0.5), logit_bias=bias)
    assert p.presence_penalty == 1.0 and isinstance(p.presence_penalty, float)
    assert p.logit_bias == ((3, 0.5), (7, 2.0), (50, -100.0))
    assert p.adjusts_logits
    same = SamplingParams(presence_penalty=1.0, frequency_penalty=-0.5, logit_bias={3: 0.5, 7: 2, 50: -100})
    assert p == same and hash(p) == hash(same)
    assert dataclasses.replace(p, n=2).logit_bias == p.logit_bias  # the stored pairs are accepted again
    assert SamplingParams().logit_bias == () and not SamplingParams().adjusts_logits
    assert not SamplingParams(logit_bias={}).adjusts_logits
    assert SamplingParams(presence_penalty=-2, frequency_penalty=2).adjusts_logits


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(presence_penalty=2.01), "presence_penalty"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(presence_penalty="1"), "presence_penalty"),
        (dict(frequency_penalty=-2.5), "frequency_penalty"),
        (dict(frequency_penalty=True), "frequency_penalty"),
        (dict(frequency_penalty=float("inf")), "frequency_penalty"),
        (dict(logit_bias={5: 100.5}), "logit_bias"),
        (dict(logit_bias={5: -101}), "logit_bias"),
        (dict(logit_bias={5: float("nan")}), "logit_bias"),
        (dict(logit_bias={5: "1"}), "logit_bias"),
        (dict(logit_bias={i: 1.0 for i in range(301)}), "logit_bias"),
        (dict(logit_bias={"abc": 1.0}), "logit_bias"),
        (dict(logit_bias={"1.0": 1.0}), "logit_bias"),
        (dict(logit_bias={1.0: 1.0}), "logit_bias"),
        (dict(logit_bias={True: 1.0}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={"-1": 1.0}), "logit_bias"),
        (dict(logit_bias={2**31: 1.0}), "logit_bias"),
        (dict(logit_bias={5: 1.0, "5": 2.0}), "logit_bias"),
        (dict(logit_bias=[1, 2, 3]), "logit_bias"),
        (dict(logit_bias="50256"), "logit_bias"),
    ],
)
def test_bad_parameters_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_at_most_300_biases_are_accepted():
    assert len(SamplingParams(logit_bias={i: 1.0 for i in range(300)}).logit_bias) == 300


def test_bias_ids_outside_the_vocabulary_are_refused_and_the_engine_stays_usable(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    prompt = _prompt(fresh_seed)
    # 439 is past the tokenizer; 500 is a row of the weights that is never sampled.
    for bad in (engine.vocab_limit, hf.config.vocab_size - 1, 10**6):
        with pytest.raises(ValueError, match=f"logit_bias: token id {bad} is outside the vocabulary"):
            engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(logit_bias={bad: 1}))
    out = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=5, **GREEDY))
    assert out[0].outputs[0].token_ids == hf_greedy(hf, prompt, 5)
    assert not engine.has_unfinished_requests()
