"""Bad input raises ValueError naming what is wrong, and the engine stays usable after it."""

from __future__ import annotations

import pytest

from conftest import SHAPES, hf_greedy
from fastcodegen import Engine, SamplingParams


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": [1, 2]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": "ab"}, "stop_token_ids"),
        ({"stop_patterns": ["("]}, "stop_patterns"),
        ({"stop_patterns": ["a*"]}, "stop_patterns"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_bad_sampling_params(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams(stop="x", top_k=-1)
    assert p.stop == ("x",) and p.top_k == 0 and p.n == 1 and p.max_tokens == 128
    with pytest.raises(Exception):
        p.temperature = 0.5  # frozen: a checked value cannot be changed afterwards


@pytest.fixture(scope="module")
def engine(checkpoint):
    path, hf = checkpoint("hd64")
    return Engine(str(path), device="cpu", progress=False), hf


def _assert_usable(engine, hf):
    assert engine.num_free_kv_blocks == engine.kv_cache_tokens // 16
    assert not engine.has_unfinished_requests()
    engine._scheduler.core.check()
    out = engine.generate(
        prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    )
    assert out[0].outputs[0].token_ids == hf_greedy(hf, [5, 6, 7], 4)


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(prompts=""), "prompt 0 is empty"),
        (dict(prompt_token_ids=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompt_token_ids=[[1] * SHAPES["hd64"].n_positions]), "leaves no room"),
        (dict(prompt_token_ids=[[1] * (SHAPES["hd64"].n_positions + 50)]), "context holds"),
        (dict(prompt_token_ids=[[1, -1]]), "outside the vocabulary"),
        (dict(prompt_token_ids=[[1, 439]]), "outside the vocabulary"),
        (dict(prompt_token_ids=[[1, 2.5]]), "integers"),
        (dict(prompt_token_ids=[[1, True]]), "integers"),
        (dict(prompt_token_ids=["abc"]), "lists of integers"),
        (dict(), "exactly one"),
        (dict(prompts="x", prompt_token_ids=[[1]]), "exactly one"),
        (dict(prompt_token_ids=[]), "no prompts"),
        (dict(prompts=["a", "b"], sampling_params=[SamplingParams()]), "one per prompt"),
        (dict(prompts=[1, 2]), "strings"),
        (dict(prompts="x", sampling_params=SamplingParams(stop_token_ids=[10**6])), "stop_token_ids"),
    ],
)
def test_bad_prompts_raise_and_engine_stays_usable(engine, call, message):
    eng, hf = engine
    with pytest.raises(ValueError, match=message):
        eng.generate(**call)
    _assert_usable(eng, hf)


def test_one_bad_prompt_rejects_the_whole_call(engine):
    eng, hf = engine
    with pytest.raises(ValueError, match="prompt 2"):
        eng.generate(prompt_token_ids=[[1, 2], [3], []])
    _assert_usable(eng, hf)


def test_error_inside_a_step_frees_everything(engine, monkeypatch):
    eng, hf = engine
    calls = {"n": 0}
    real = eng._runner.execute

    def failing(step):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return real(step)

    monkeypatch.setattr(eng._runner, "execute", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        eng.generate(prompt_token_ids=[[1, 2, 3], [4, 5]], sampling_params=SamplingParams(max_tokens=10))
    monkeypatch.undo()
    _assert_usable(eng, hf)


def test_prompt_at_the_longest_allowed_length(engine):
    eng, hf = engine
    n = SHAPES["hd64"].n_positions
    prompt = [3] * (n - 1)
    out = eng.generate(
        prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    )
    assert out[0].outputs[0].token_ids == hf_greedy(hf, prompt, 1)
    assert out[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="float8"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(backend="jax"), "backend"),
        (dict(load_format="gguf"), "load_format"),
        (dict(max_model_len=10**6), "max_model_len"),
        (dict(kv_cache_tokens=16), "kv_cache_tokens"),
        (dict(block_size=12), "block_size"),
        (dict(max_num_seqs=0), "max_num_seqs"),
    ],
)
def test_bad_engine_arguments(checkpoint, kwargs, message):
    path, _ = checkpoint("hd64")
    kwargs.setdefault("device", "cpu")
    with pytest.raises(ValueError, match=message):
        Engine(str(path), progress=False, **kwargs)
