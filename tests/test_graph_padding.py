"""The steps CUDA graphs replay, run on the CPU: padded to their buckets, they give transformers' greedy tokens.

On CUDA a graph replays its bucket's kernels on persistent buffers with the shapes fixed at capture: the model
runner's buffers for decode and verify steps, the draft model's own for its decode passes. Here `EagerGraphs`
stands in for the graphs: at capture it keeps each bucket's padding step (views of the same buffers), and at
replay it runs the forward on it eagerly. So the buffers, their padding, the bucket chosen and the rows read
back are those of a CUDA run; only the replay mechanism differs (tests/test_cuda_graphs.py replays real graphs
on a GPU). A padding token or row that leaked into a real one, or a real one left out, changes the tokens.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import INTERPRETED, assert_greedy_equal, repetitive_prompts
from fastcodegen import Engine, SamplingParams, draft, model_runner
from fastcodegen.config import EngineConfig
from fastcodegen.cuda_graphs import CudaGraphs
from fastcodegen.step import StepInputs

GREEDY = dict(temperature=0.0, ignore_eos=True)


class EagerGraphs(CudaGraphs):
    """CudaGraphs' buckets and buffers, with each replay run eagerly on the bucket's padding step."""

    def capture(self, model, kv_cache, padding_step, pool) -> None:
        self._model, self._kv_cache = model, kv_cache
        self._steps = {}
        for b in reversed(self.buckets):
            step = padding_step(b)
            self._steps[b] = StepInputs(step.shape(), dict(step.tensors))  # shapes fixed as a capture fixes them
        self.replayed = Counter()

    @staticmethod
    def new_pool() -> None:
        return None

    def replay(self, bucket: int) -> torch.Tensor:
        self.replayed[bucket] += 1
        return self._model.compute_logits(self._model.forward(self._steps[bucket], self._kv_cache))


@pytest.fixture
def graphed(monkeypatch):
    """Engines built inside the test capture `EagerGraphs` wherever they would capture CUDA graphs."""
    monkeypatch.setattr(model_runner, "CudaGraphs", EagerGraphs)
    monkeypatch.setattr(draft, "CudaGraphs", EagerGraphs)
    monkeypatch.setattr(EngineConfig, "uses_cuda_graphs", property(lambda self: not self.enforce_eager))


def _check(engine, hf, prompts, max_tokens):
    """Greedy output equals transformers' (up to float32 near-ties); the sequences end one by one (max_tokens, max_tokens - 4, ...), so the
    steps' row counts step down through the buckets."""
    lengths = [max(2, max_tokens - 4 * i) for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in lengths]
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    for prompt, out, n in zip(prompts, outs, lengths):
        assert_greedy_equal(hf, prompt, out.outputs[0].token_ids, n)
    engine._scheduler.check()
    assert engine.num_free_kv_blocks == engine.stats.num_blocks


def test_decode_and_verify_steps_padded_to_their_buckets(graphed, engine_factory, fresh_seed):
    engine, hf = engine_factory("hd80", speculative_model="[ngram]", num_speculative_tokens=3, max_num_seqs=6)
    runner = engine._runner
    assert runner.graphs.buckets == [1, 2, 4, 6] and runner.verify_graphs.buckets == [1, 2, 4, 6]
    _check(engine, hf, repetitive_prompts([3, 9, 17, 26, 31], fresh_seed), 24)
    assert engine.stats.spec_accepted > 0
    # 5 sequences ending one by one (two may end in one step): 5 rows padded to bucket 6, then fewer, in decode
    # steps or in verify steps where prompt lookup found a proposal.
    assert runner.verify_graphs.replayed and runner.graphs.replayed
    buckets = set(runner.verify_graphs.replayed) | set(runner.graphs.replayed)
    assert 6 in buckets and len(buckets) >= 3


def test_draft_passes_padded_to_their_buckets(graphed, engine_factory, drafts, fresh_seed):
    engine, hf = engine_factory("hd64", speculative_model=str(drafts["perturbed"]), num_speculative_tokens=3, max_num_seqs=5)
    runner = engine._runner
    _check(engine, hf, repetitive_prompts([4, 11, 23], fresh_seed), 20)
    s = engine.stats
    assert s.spec_proposed > s.spec_accepted > 0
    # 3 sequences ending one by one (two may end in one step): 3 rows padded to bucket 4, then fewer.
    for graphs in (runner.verify_graphs, runner.draft.graphs):
        assert 4 in graphs.replayed and len(graphs.replayed) >= 2


def test_the_draft_cache_holds_the_drafts_own_kv(engine_factory, drafts, fresh_seed):
    """After speculative runs, the draft's cache holds over each finished sequence's cached blocks the K/V the draft
    computes for those tokens by itself (its passes skip no token the target computed)."""
    spec, _ = engine_factory("hd64", speculative_model=str(drafts["perturbed"]), num_speculative_tokens=3)
    reference = Engine(str(drafts["perturbed"]), device="cpu", progress=False)
    prompts = repetitive_prompts([9, 26], fresh_seed)
    outs = spec.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=40, **GREEDY))
    assert spec.stats.spec_accepted > 0
    for p, o in zip(prompts, outs):
        tokens = p + o.outputs[0].token_ids
        found = []
        for engine, cache in ((spec, spec._runner.draft.kv_cache), (reference, reference._runner.kv_cache)):
            hits = engine.stats.prefix_hit_tokens
            rid = engine.add_request(prompt_token_ids=tokens, sampling_params=SamplingParams(max_tokens=2, **GREEDY))
            engine.step()  # the spec engine: admitted over its cached blocks; the reference: the prompt computed
            [seq] = engine._scheduler._core.request_seqs(engine._outputs.by_user_id[rid])
            found.append((engine.stats.prefix_hit_tokens - hits, engine._scheduler.seq_info(seq)["blocks"], cache))
            engine.abort(rid)
        (hit, spec_blocks, spec_cache), (_, ref_blocks, ref_cache) = found
        n = hit // 16
        assert n > 0
        # float32; the draft's decode passes against its prefill: summation order only
        torch.testing.assert_close(
            spec_cache.data[:, :, spec_blocks[:n]], ref_cache.data[:, :, ref_blocks[:n]], atol=1e-4, rtol=1e-4
        )
    reference.close()


@pytest.mark.skipif(not INTERPRETED, reason="the Triton kernels on the CPU need the interpreter")
def test_triton_kernels_on_padded_verify_and_draft_steps(graphed, engine_factory, drafts, fresh_seed):
    """The Triton decode and prefill kernels (interpreted, float32) on padded buckets: padding rows with no tokens
    and an empty context, padding tokens that belong to no row and store nothing."""
    engine, hf = engine_factory(
        "hd64", backend="triton", speculative_model=str(drafts["perturbed"]), num_speculative_tokens=2,
        max_num_seqs=3, kv_cache_tokens=256,
    )  # fmt: skip
    _check(engine, hf, repetitive_prompts([5, 14], fresh_seed), 8)
    s = engine.stats
    assert s.spec_proposed > s.spec_accepted > 0
    assert engine._runner.verify_graphs.replayed and engine._runner.draft.graphs.replayed
    engine.close()
