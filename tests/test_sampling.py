"""Sampling: the distributions temperature, top-k and top-p must produce, seeds, logprobs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import TOKENIZER_SIZE
from fastcodegen import SamplingParams
from fastcodegen.sampler import Sampler, SamplingInputs, filtered_probs

P = [0.5, 0.2, 0.15, 0.1, 0.05]


def _probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    return filtered_probs(
        torch.tensor([logits]), torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p])
    )[0]


# The expected distributions are written out by hand from P.
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, P),
        ({"top_k": 2}, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),
        ({"top_k": 1}, [1, 0, 0, 0, 0]),
        # mass before each token: 0, .5, .7, .85, .95 -> the first three stay under 0.8
        ({"top_p": 0.8}, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
        ({"top_p": 0.5}, [1, 0, 0, 0, 0]),
        ({"top_p": 0.51}, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),
        # top-k first, then top-p on what is left: .5/.85, .2/.85, .15/.85 -> masses before 0, .588, .824
        ({"top_k": 3, "top_p": 0.7}, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),
        # temperature 2 takes square roots
        ({"temperature": 2.0}, [math.sqrt(p) / sum(math.sqrt(q) for q in P) for p in P]),
    ],
)
def test_filtered_distribution(kwargs, expected):
    got = _probs([math.log(p) for p in P], **kwargs)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-5)


def test_filtering_is_order_independent(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    perm = torch.randperm(len(P), generator=g)
    logits = torch.tensor([math.log(p) for p in P])
    got = _probs(logits[perm].tolist(), top_k=3, top_p=0.8)
    assert torch.allclose(got, _probs(logits.tolist(), top_k=3, top_p=0.8)[perm], atol=1e-6)


def test_sampled_frequencies_match_the_distribution(fresh_seed):
    """20000 draws per setting; each token's frequency within 5 standard deviations of its probability."""
    draws = 20000
    vocab_limit = 5
    # The two ids past vocab_limit have the highest logits: they must never come out.
    logits = torch.tensor([math.log(p) for p in P] + [10.0, 10.0]).repeat(draws, 1)
    gen = torch.Generator().manual_seed(fresh_seed)
    sampler = Sampler(vocab_limit, gen)
    for kwargs, expected in [
        ({}, P),
        ({"top_k": 2}, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),
        ({"top_p": 0.8}, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
        ({"temperature": 2.0}, [math.sqrt(p) / sum(math.sqrt(q) for q in P) for p in P]),
    ]:
        inputs = _inputs(draws, **kwargs)
        tokens = torch.from_numpy(sampler(logits, inputs).tokens).long()
        assert tokens.max() < vocab_limit
        freq = torch.bincount(tokens, minlength=vocab_limit).double() / draws
        for f, p in zip(freq.tolist(), expected):
            sd = math.sqrt(p * (1 - p) / draws)
            assert abs(f - p) <= 5 * sd + 1e-12, (kwargs, freq.tolist(), expected)


def sampling_inputs(temperature, top_k, top_p, device, seeds=None, logprobs=None) -> SamplingInputs:
    """SamplingInputs of host tensors (on the CPU the logits' device too)."""
    assert device.type == "cpu"
    return SamplingInputs(
        temperature, top_k, top_p, temperature.numpy(), top_k.numpy(), top_p.numpy(), seeds or {}, logprobs or {}
    )


def _inputs(rows, temperature=1.0, top_k=0, top_p=1.0, **kwargs):
    full = lambda v, dt: torch.full((rows,), v, dtype=dt)  # noqa: E731
    return sampling_inputs(
        full(temperature, torch.float32),
        full(top_k, torch.int32),
        full(top_p, torch.float32),
        torch.device("cpu"),
        **kwargs,
    )


def test_greedy_never_picks_past_the_tokenizer():
    sampler = Sampler(3, torch.Generator())
    logits = torch.tensor([[0.0, 1.0, 0.5, 9.0]])
    assert sampler(logits, _inputs(1, temperature=0.0)).tokens.tolist() == [1]


def test_mixed_batch_greedy_rows_stay_greedy(fresh_seed):
    """Greedy and sampled rows in one batch: greedy rows take the argmax whatever the noise."""
    sampler = Sampler(5, torch.Generator().manual_seed(fresh_seed))
    logits = torch.tensor([[math.log(p) for p in P]]).repeat(64, 1)
    temperature = torch.tensor([0.0, 1.0] * 32)
    inputs = sampling_inputs(temperature, torch.zeros(64, dtype=torch.int32), torch.ones(64), torch.device("cpu"))
    tokens = sampler(logits, inputs).tokens
    assert (tokens[0::2] == 0).all()
    assert len(set(tokens[1::2].tolist())) > 1


def test_seeded_row_ignores_the_shared_generator(fresh_seed):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(fresh_seed))
    runs = []
    for shared_seed in (1, 2):
        sampler = Sampler(50, torch.Generator().manual_seed(shared_seed))
        runs.append(sampler(logits, _inputs(3, seeds={1: 7})).tokens)
    assert runs[0][1] == runs[1][1]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine_factory, fresh_seed):
    engine, _ = engine_factory("hd64")
    prompt = [[7, 8, 9, 10]]
    other = [[3, 1, 4, 1, 5, 9, 2, 6]]
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=fresh_seed % 1000, ignore_eos=True)
    alone = engine.generate(prompt_token_ids=prompt, sampling_params=params)[0].outputs[0].token_ids
    again = engine.generate(prompt_token_ids=prompt, sampling_params=params)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batched = engine.generate(prompt_token_ids=other + prompt, sampling_params=[unseeded, params])[1]
    assert alone == again == batched.outputs[0].token_ids
    # Completions of one request differ from each other (each draws from its own stream).
    outs = engine.generate(
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=1, ignore_eos=True),
    )
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1


def test_engine_seed_makes_unseeded_requests_reproducible(checkpoint):
    from fastcodegen import Engine

    path, _ = checkpoint("hd64")
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    runs = [
        Engine(str(path), device="cpu", seed=s, progress=False)
        .generate(prompt_token_ids=[[1, 2, 3]], sampling_params=params)[0]
        .outputs[0]
        .token_ids
        for s in (5, 5, 6)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_logprobs_match_transformers(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd80")
    g = torch.Generator().manual_seed(fresh_seed)
    prompt = torch.randint(0, TOKENIZER_SIZE, (9,), generator=g).tolist()
    out = engine.generate(
        prompt_token_ids=[prompt],
        sampling_params=SamplingParams(temperature=0.7, max_tokens=6, logprobs=3, seed=3, ignore_eos=True),
    )[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    with torch.no_grad():
        logits = copy.deepcopy(hf)(torch.tensor([prompt + out.token_ids])).logits[0].float()
    # The engine's distribution is over the tokenizer's ids only.
    ref = logits[len(prompt) - 1 : -1, :TOKENIZER_SIZE].log_softmax(dim=-1)
    total = 0.0
    for step, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        top = ref[step].topk(3)
        expected_ids = set(top.indices.tolist()) | {token}
        assert set(lp) == expected_ids
        for tid, value in lp.items():
            assert value == pytest.approx(ref[step, tid].item(), abs=1e-4)
        total += lp[token]
    assert out.cumulative_logprob == pytest.approx(total)
    plain = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=2))[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None
