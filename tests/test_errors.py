"""Bad input raises ValueError naming what is wrong, and the engine stays usable after it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import EOS_ID, SHAPES, hf_greedy
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
        # the native scheduler's 32-bit integers
        ({"top_k": 2**31}, "top_k"),
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"max_tokens": 2**64}, "max_tokens"),
        ({"stop_token_ids": [2**31]}, "stop_token_ids"),
        ({"n": 2**40}, "n"),
        # logits / temperature overflows float32: the softmax would be NaN
        ({"temperature": 1e-38}, "temperature"),
        ({"temperature": 1e-4}, "temperature"),
        # not text: a lone surrogate cannot be encoded
        ({"stop": ["ab\ud800"]}, "stop"),
        ({"stop_patterns": ["\udfff"]}, "stop_patterns"),
        ({"n": np.bool_(True)}, "n"),
        ({"stop_token_ids": 7}, "stop_token_ids"),
        ({"stop_token_ids": [3.0]}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_numpy_numbers_are_accepted_as_python_numbers():
    p = SamplingParams(
        n=np.int64(2), max_tokens=np.int32(7), top_k=np.uint16(5), temperature=np.float32(0.5), top_p=np.float64(0.9),
        seed=np.int64(3), logprobs=np.int8(2), stop_token_ids=np.array([4, 5]),
    )  # fmt: skip
    assert (p.n, p.max_tokens, p.top_k, p.temperature, p.top_p, p.seed, p.logprobs) == (2, 7, 5, 0.5, 0.9, 3, 2)
    assert p.stop_token_ids == (4, 5)
    assert all(type(v) is int for v in (p.n, p.max_tokens, p.top_k, p.seed, p.logprobs, *p.stop_token_ids))
    assert type(p.temperature) is float and type(p.top_p) is float
    assert SamplingParams(temperature=1e-3).temperature == 1e-3  # the smallest positive temperature


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
    engine._scheduler.check()
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
        # shapes of prompt_token_ids that would have to be guessed at
        (dict(prompt_token_ids=5), "prompt_token_ids"),
        (dict(prompt_token_ids=np.int64(5)), "prompt_token_ids"),
        (dict(prompt_token_ids=(t for t in [1, 2])), "prompt_token_ids"),
        (dict(prompt_token_ids={1, 2, 3}), "prompt_token_ids"),
        (dict(prompt_token_ids=[{1, 2}]), "prompt_token_ids"),
        (dict(prompt_token_ids={"a": 1}), "prompt_token_ids"),
        (dict(prompt_token_ids=[[1, 2**70]]), "outside the vocabulary"),
        (dict(prompt_token_ids=[[1, np.float32(2)]]), "integers"),
        (dict(prompt_token_ids=np.zeros((2, 2, 2), dtype=np.int64)), "prompt_token_ids"),
        (dict(prompts="def f():\ud800"), "surrogate"),
        (dict(prompts=("x" for _ in range(1))), "strings"),
    ],
)
def test_bad_prompts_raise_and_engine_stays_usable(engine, call, message):
    eng, hf = engine
    with pytest.raises(ValueError, match=message):
        eng.generate(**call)
    _assert_usable(eng, hf)


@pytest.mark.parametrize(
    "ids",
    [
        [5, 6, 7],
        (5, 6, 7),
        np.array([5, 6, 7], dtype=np.int32),
        np.array([[5, 6, 7]], dtype=np.uint16),
        torch.tensor([5, 6, 7]),
        [np.int64(5), np.int16(6), torch.tensor(7)],
    ],
    ids=["list", "tuple", "ndarray", "2d-ndarray", "tensor", "numpy-ints"],
)
def test_prompt_token_ids_of_every_integer_kind(engine, ids):
    eng, hf = engine
    out = eng.generate(prompt_token_ids=ids, sampling_params=SamplingParams(temperature=0, max_tokens=3))
    assert out[0].prompt_token_ids == [5, 6, 7] and all(type(t) is int for t in out[0].prompt_token_ids)
    assert out[0].outputs[0].token_ids == hf_greedy(hf, [5, 6, 7], 3, eos_token_id=EOS_ID)[:3]


def test_one_bad_prompt_rejects_the_whole_call(engine):
    eng, hf = engine
    with pytest.raises(ValueError, match="prompt 2"):
        eng.generate(prompt_token_ids=[[1, 2], [3], []])
    _assert_usable(eng, hf)


def test_error_inside_a_step_frees_everything(engine, monkeypatch):
    eng, hf = engine
    calls = {"n": 0}
    real = eng._runner.execute

    def failing(step, *rest):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return real(step, *rest)

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
        (dict(seed=2**70), "seed"),
        (dict(seed=2**63), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(max_num_seqs=8.0), "max_num_seqs"),
        (dict(gpu_memory_utilization="0.5"), "gpu_memory_utilization"),
        (dict(max_num_batched_tokens=np.bool_(True)), "max_num_batched_tokens"),
    ],
)
def test_bad_engine_arguments(checkpoint, kwargs, message):
    path, _ = checkpoint("hd64")
    kwargs.setdefault("device", "cpu")
    with pytest.raises(ValueError, match=message):
        Engine(str(path), progress=False, **kwargs)


def test_engine_takes_numpy_integers(checkpoint):
    path, hf = checkpoint("hd64")
    eng = Engine(
        str(path), device="cpu", progress=False, seed=np.int64(3), max_num_seqs=np.int32(4),
        max_num_batched_tokens=np.int64(64), kv_cache_tokens=np.int64(256), block_size=np.int64(16),
        max_model_len=np.int16(100), gpu_memory_utilization=np.float32(0.5),
    )  # fmt: skip
    assert (eng.config.max_num_seqs, eng.config.kv_cache_tokens, eng.config.max_model_len) == (4, 256, 100)
    _assert_usable(eng, hf)
