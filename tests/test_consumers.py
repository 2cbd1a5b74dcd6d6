"""Every reader of the engine sees every step's news, whoever ran the step.

A stream, a `generate` call, `step()` and other threads share one engine; a
step run by any of them advances every request, and each request's outputs
must reach the reader that owns it. Each test compares the outputs with
transformers' greedy tokens (`hf_greedy`), an independent reference.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from conftest import hf_greedy
from fastcodegen import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _prompts(engine, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, engine.vocab_limit, (n,), generator=g).tolist() for n in lengths]


def _greedy(engine, prompt, max_tokens, stream=False):
    """engine.generate of one prompt, greedy, `max_tokens` tokens: its outputs, or its stream."""
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    return engine.generate(prompt_token_ids=[prompt], sampling_params=params, stream=stream)


def _assert_whole(engine):
    assert not engine.has_unfinished_requests()
    assert engine.num_free_kv_blocks == engine.kv_cache_tokens // engine.config.block_size
    engine._scheduler.check()


def _drain_alternately(streams):
    """Reads one output from each live stream in turn (as an async server would); the outputs per stream."""
    outs = [[] for _ in streams]
    live = dict(enumerate(streams))
    while live:
        for i in list(live):
            try:
                outs[i].append(next(live[i]))
            except StopIteration:
                del live[i]
    return outs


@pytest.mark.parametrize("lengths", [(2, 6), (6, 2), (4, 4), (1, 5)], ids=lambda x: f"{x[0]}-{x[1]}")
def test_streams_read_alternately_each_end_with_their_final_output(engine_factory, fresh_seed, lengths):
    engine, hf = engine_factory("hd64")
    prompts = _prompts(engine, [7, 12], fresh_seed)
    streams = [_greedy(engine, p, n, stream=True) for p, n in zip(prompts, lengths)]
    for p, n, outs in zip(prompts, lengths, _drain_alternately(streams)):
        assert outs and outs[-1].finished and sum(o.finished for o in outs) == 1
        assert outs[-1].outputs[0].token_ids == hf_greedy(hf, p, n)
        assert outs[-1].outputs[0].finish_reason == "length"
    _assert_whole(engine)


def test_stream_whose_request_finishes_in_another_callers_steps(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    short, long = _prompts(engine, [5, 9], fresh_seed)
    stream = _greedy(engine, short, 3, stream=True)
    first = next(stream)
    assert not first.finished
    # step() runs the steps that finish the stream's request; a generate after them must not disturb it.
    while engine.has_unfinished_requests():
        assert engine.step() == []  # nothing of add_request's: the stream's news is not step()'s
    other = _greedy(engine, long, 4)
    assert other[0].outputs[0].token_ids == hf_greedy(hf, long, 4)
    rest = list(stream)
    assert [o.finished for o in rest] == [False] * (len(rest) - 1) + [True]
    assert rest[-1].outputs[0].token_ids == hf_greedy(hf, short, 3)
    _assert_whole(engine)


def test_nested_generate_finishes_a_stream_that_then_yields_its_last_output(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    short, long = _prompts(engine, [6, 8], fresh_seed)
    stream = _greedy(engine, short, 2, stream=True)
    next(stream)
    other = _greedy(engine, long, 6)
    assert other[0].outputs[0].token_ids == hf_greedy(hf, long, 6)
    last = list(stream)[-1]
    assert last.finished and last.outputs[0].token_ids == hf_greedy(hf, short, 2)
    _assert_whole(engine)


def test_abort_of_a_streamed_request_ends_its_stream(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    kept, cut = _prompts(engine, [7, 11], fresh_seed)
    stream = engine.generate(
        prompt_token_ids=[kept, cut], sampling_params=SamplingParams(max_tokens=6, **GREEDY), stream=True
    )
    seen = next(stream)
    ids = {}
    while len(ids) < 2:  # learn both requests' ids from their first outputs
        ids[seen.prompt_token_ids == cut] = seen.request_id
        seen = next(stream)
    engine.abort(ids[True])
    finals = {o.request_id: o for o in itertools.chain([seen], stream) if o.finished}
    aborted = finals[ids[True]]
    assert aborted.outputs[0].finish_reason == "abort" and aborted.error is None
    assert aborted.outputs[0].token_ids == hf_greedy(hf, cut, len(aborted.outputs[0].token_ids))
    assert finals[ids[False]].outputs[0].token_ids == hf_greedy(hf, kept, 6)
    _assert_whole(engine)


def test_two_threads_generating_at_once_both_get_their_outputs(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64", max_num_seqs=4)
    prompts = _prompts(engine, [5, 9, 3, 12, 7, 4], fresh_seed)
    groups = [prompts[:3], prompts[3:]]
    results, errors = [None, None], []
    start = threading.Barrier(2)

    def work(i):
        try:
            start.wait()
            results[i] = engine.generate(
                prompt_token_ids=groups[i], sampling_params=SamplingParams(max_tokens=5, **GREEDY)
            )
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for group, outs in zip(groups, results):
        assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 5) for p in group]
    _assert_whole(engine)


def test_a_stream_and_a_thread_calling_step_share_the_engine(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64")
    a, b = _prompts(engine, [6, 10], fresh_seed)
    served = engine.add_request(prompt_token_ids=b, sampling_params=SamplingParams(max_tokens=8, **GREEDY))
    finals, errors = {}, []

    def serve():
        try:
            while served not in finals:
                for out in engine.step():
                    if out.finished:
                        finals[out.request_id] = out
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    outs = list(_greedy(engine, a, 8, stream=True))
    t.join(timeout=120)
    assert not errors, errors
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == hf_greedy(hf, a, 8)
    assert finals[served].outputs[0].token_ids == hf_greedy(hf, b, 8)
    _assert_whole(engine)
