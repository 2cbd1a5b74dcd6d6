"""Decode, verify and draft steps replayed from CUDA graphs against the same steps run eagerly (`pytest -m gpu`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TOKENIZER_SIZE, hf_greedy, repetitive_prompts
from fastcodegen import Engine, SamplingParams
from fastcodegen.request import Reader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def engines(checkpoint):
    path, hf = checkpoint("hd80")
    kw = dict(device="cuda", dtype="float16", backend="triton", max_num_seqs=40, kv_cache_tokens=4096, progress=False)
    graphed, eager = Engine(str(path), **kw), Engine(str(path), enforce_eager=True, **kw)
    yield graphed, eager, hf
    graphed.close()
    eager.close()


def test_every_bucket_replays_like_eager(engines, fresh_seed):
    graphed, _, _ = engines
    runner, sched = graphed._runner, graphed._scheduler
    assert runner.graphs is not None
    g = torch.Generator().manual_seed(fresh_seed)
    for bucket in runner.graphs.buckets:
        for rows in sorted({bucket, max(1, bucket - 1)}):  # a full bucket and one with a padding row
            if rows > graphed.config.max_num_seqs:
                continue
            prompts = [
                torch.randint(0, TOKENIZER_SIZE, (int(n),), generator=g).tolist()
                for n in torch.randint(3, 40, (rows,), generator=g)
            ]
            for p in prompts:
                graphed._outputs.add(None, p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), Reader())
            while True:  # prefill (eager), until the step about to run is a decode step of all rows
                step = sched.schedule()
                if step.is_decode and step.num_rows == rows:
                    break
                logits = runner.execute(step)
                tokens = runner.sampler(logits, _greedy_inputs(step)).tokens
                sched.update(tokens, np.ones(len(tokens), dtype=bool))
            replayed = runner.execute(step).clone()  # a decode step that fits a bucket replays its graph
            dev = runner._upload(step)
            eager = runner.model.compute_logits(runner.model.forward(dev, runner.kv_cache)[dev.logits_indices])
            torch.testing.assert_close(replayed, eager, atol=2e-2, rtol=2e-2)
            tokens = runner.sampler(replayed, _greedy_inputs(step)).tokens
            sched.update(tokens, np.ones(len(tokens), dtype=bool))
            graphed._outputs.forget_all(list(graphed._outputs.requests.values()))
            sched.check()
            assert graphed.num_free_kv_blocks == graphed.kv_cache_tokens // graphed.config.block_size


def _greedy_inputs(step):
    from fastcodegen.sampler import SamplingInputs

    cuda = {k: getattr(step, k).cuda() for k in ("temperature", "top_k", "top_p")}
    return SamplingInputs(
        **cuda,
        host_temperature=step.temperature.numpy(),
        host_top_k=step.top_k.numpy(),
        host_top_p=step.top_p.numpy(),
        seeds={},
        logprobs={},
    )


def test_graphed_engine_generates_like_eager_and_transformers(engines, fresh_seed):
    graphed, eager, hf = engines
    g = torch.Generator().manual_seed(fresh_seed)
    prompts = [torch.randint(0, TOKENIZER_SIZE, (n,), generator=g).tolist() for n in (3, 17, 30, 5, 9)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    a = graphed.generate(prompt_token_ids=prompts, sampling_params=params)
    b = eager.generate(prompt_token_ids=prompts, sampling_params=params)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly, t in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, x.outputs[0].token_ids):
            assert abs(lx[t] - ly[t]) < 5e-2
    # float16 near-ties aside, the greedy path is transformers' (checked in float32 by the CPU suite)
    assert sum(x.outputs[0].token_ids == hf_greedy(hf, p, 12) for x, p in zip(a, prompts)) >= len(prompts) - 1


@pytest.mark.parametrize("proposer", ["[ngram]", "perturbed"])
def test_speculative_steps_replay_like_eager(checkpoint, drafts, fresh_seed, proposer):
    """Verify steps and the draft's passes replayed from graphs give the eager engine's tokens and logprobs."""
    path, hf = checkpoint("hd64")
    spec = proposer if proposer == "[ngram]" else str(drafts[proposer])
    kw = dict(
        device="cuda", dtype="float16", backend="triton", max_num_seqs=8, kv_cache_tokens=4096, progress=False,
        speculative_model=spec, num_speculative_tokens=3,
    )  # fmt: skip
    graphed, eager = Engine(str(path), **kw), Engine(str(path), enforce_eager=True, **kw)
    runner = graphed._runner
    assert runner.verify_graphs is not None and runner.verify_graphs.buckets == [1, 2, 4, 8]
    assert (runner.draft is None) == (proposer == "[ngram]")
    assert runner.draft is None or runner.draft.graphs is not None
    prompts = repetitive_prompts([3, 9, 17, 26, 31, 40], fresh_seed)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    a = graphed.generate(prompt_token_ids=prompts, sampling_params=params)
    b = eager.generate(prompt_token_ids=prompts, sampling_params=params)
    assert graphed.stats.spec_proposed > 0
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly, t in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, x.outputs[0].token_ids):
            assert abs(lx[t] - ly[t]) < 5e-2
    assert sum(x.outputs[0].token_ids == hf_greedy(hf, p, 24) for x, p in zip(a, prompts)) >= len(prompts) - 1
    for e in (graphed, eager):
        e._scheduler.check()
        assert e.num_free_kv_blocks == e.stats.num_blocks
        e.close()


def test_the_drafts_passes_wait_for_the_device_once_a_step(checkpoint, drafts, fresh_seed):
    """A draft's k proposal passes and its pass after the target's queue their work without waiting for the device,
    but for the one copy of the step's indices: host work overlaps the passes (torch's sync debug mode counts)."""
    import warnings

    path, _ = checkpoint("hd64")
    engine = Engine(
        str(path), device="cuda", dtype="float16", backend="triton", max_num_seqs=8, kv_cache_tokens=4096,
        progress=False, speculative_model=str(drafts["perturbed"]), num_speculative_tokens=3,
    )  # fmt: skip
    draft = engine._runner.draft
    waits = {"propose": [], "follow": []}

    def counted(name, fn):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    out = fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            waits[name].append(sum("synchroniz" in str(w.message) for w in seen))
            return out

        return run

    draft.propose, draft.follow = counted("propose", draft.propose), counted("follow", draft.follow)
    prompts = repetitive_prompts([5, 12, 20], fresh_seed)
    engine.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert engine.stats.spec_proposed > 0
    assert max(waits["propose"]) <= 1 and max(waits["follow"][1:]) == 0  # the first follows a prefill step
    engine.close()
