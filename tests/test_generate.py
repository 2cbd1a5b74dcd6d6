"""Engine.generate end to end against transformers' generate: greedy tokens, batching, preemption, finish reasons."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from conftest import SHAPES, hf_greedy
from fastcodegen import Engine, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _random_prompts(engine, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, engine.vocab_limit, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_ragged_batch_matches_transformers(engine_factory, shape, fresh_seed):
    engine, hf = engine_factory(shape)
    prompts = _random_prompts(engine, [3, 16, 17, 40], fresh_seed)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=24, **GREEDY))
    assert [o.prompt_token_ids for o in outs] == prompts
    for prompt, out in zip(prompts, outs):
        assert out.finished
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 24)
        assert out.outputs[0].finish_reason == "length"


def test_preemption_gives_the_same_tokens(engine_factory, fresh_seed):
    # The cache holds exactly one full-length sequence (128 tokens = 8 blocks),
    # far less than six 30-token prompts growing by 60 tokens each.
    engine, hf = engine_factory("hd64", kv_cache_tokens=128)
    prompts = _random_prompts(engine, [30, 25, 33, 20, 31, 28], fresh_seed)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=60, **GREEDY))
    assert engine.stats.preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 60)
    assert engine.num_free_kv_blocks == engine.kv_cache_tokens // 16


def test_sequence_limit_runs_in_waves(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64", max_num_seqs=2)
    prompts = _random_prompts(engine, [4, 9, 14, 2, 7], fresh_seed)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=10, **GREEDY))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 10)


def test_text_prompt_and_text_output(engine_factory, tokenizer_dir):
    engine, hf = engine_factory("hd80")
    hf_tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prompt = "def fibonacci(n):\n\tif n < 2:\n        return n\n"
    out = engine.generate(prompt, SamplingParams(max_tokens=16, **GREEDY))[0]
    ids = hf_tok(prompt)["input_ids"]
    assert out.prompt == prompt
    assert out.prompt_token_ids == ids
    expected = hf_greedy(hf, ids, 16)
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].text == hf_tok.decode(expected, skip_special_tokens=True)


def test_generation_stops_at_the_context_end(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    n_positions = SHAPES["hd64"].n_positions
    prompt = _random_prompts(engine, [n_positions - 5], fresh_seed)[0]
    out = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=100, **GREEDY))[0]
    c = out.outputs[0]
    assert c.finish_reason == "length"
    assert len(prompt) + len(c.token_ids) == n_positions
    assert c.token_ids == hf_greedy(hf, prompt, 5)


def test_end_of_text_stops_unless_ignored(checkpoint, tmp_path, fresh_seed):
    src, hf = checkpoint("hd64")
    prompt = torch.randint(0, 400, (7,), generator=torch.Generator().manual_seed(fresh_seed)).tolist()
    ref = hf_greedy(hf, prompt, 12)
    # Make the token greedy decoding emits at step 4 the model's end-of-text token.
    eos = ref[4]
    first = ref.index(eos)
    ckpt = tmp_path / "eos"
    shutil.copytree(src, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["eos_token_id"] = eos
    (ckpt / "config.json").write_text(json.dumps(config))
    engine = Engine(str(ckpt), device="cpu", progress=False)
    c = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=12))[0]
    assert c.outputs[0].finish_reason == "stop"
    assert c.outputs[0].stop_reason is None
    assert c.outputs[0].token_ids == ref[: first + 1]
    c = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=12, **GREEDY))[0]
    assert c.outputs[0].token_ids == ref
    assert c.outputs[0].finish_reason == "length"


def test_n_completions_in_order(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    prompts = _random_prompts(engine, [6, 11], fresh_seed)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(n=3, max_tokens=8, **GREEDY))
    for prompt, out in zip(prompts, outs):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        ref = hf_greedy(hf, prompt, 8)
        assert all(c.token_ids == ref for c in out.outputs)


def test_per_prompt_sampling_params(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    prompts = _random_prompts(engine, [5, 9], fresh_seed)
    params = [SamplingParams(max_tokens=3, **GREEDY), SamplingParams(max_tokens=11, **GREEDY)]
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 11]
    assert outs[1].outputs[0].token_ids == hf_greedy(hf, prompts[1], 11)


def test_stream_yields_growing_text_and_ends_finished(engine_factory, tokenizer_dir):
    engine, hf = engine_factory("hd64")
    hf_tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prompt = "import os\nclass A:\n    def"
    snapshots = list(engine.generate(prompt, SamplingParams(max_tokens=20, **GREEDY), stream=True))
    assert 1 < len(snapshots) <= 20  # one per step that grew the text, and the last
    texts = [s.outputs[0].text for s in snapshots]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert [s.finished for s in snapshots] == [False] * (len(snapshots) - 1) + [True]
    expected = hf_greedy(hf, hf_tok(prompt)["input_ids"], 20)
    assert snapshots[-1].outputs[0].token_ids == expected
    assert texts[-1] == hf_tok.decode(expected, skip_special_tokens=True)


def test_abandoned_stream_frees_its_blocks(engine_factory):
    engine, _ = engine_factory("hd64")
    total = engine.num_free_kv_blocks
    stream = engine.generate(
        prompt_token_ids=[[1, 2, 3], [4, 5]], sampling_params=SamplingParams(max_tokens=50), stream=True
    )
    next(stream)
    assert engine.num_free_kv_blocks < total
    stream.close()
    assert engine.num_free_kv_blocks == total
    assert not engine.has_unfinished_requests()
