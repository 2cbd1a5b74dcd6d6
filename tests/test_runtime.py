"""The serving runtime on the CPU: continuous batching, chunked prefill, prefix cache, n-sample forks, aborts, leaks.

Every check compares with an independent reference: transformers' greedy
tokens (`hf_greedy`), an engine run without the feature under test, or a count
worked out by hand from the scheduler's policy (csrc/scheduler.h):
  - a step computes a sequence's new tokens; the last sampled token of a
    completion is never computed, so a completion of k tokens after a prompt of
    L costs L + k - 1 computed tokens (L once for an n-sample request, whose
    samples fork off the prompt's last step: L + sum(k_i - 1));
  - the prefix cache hands out whole blocks of a prompt, never the block that
    holds its last token (that token must be computed for its logits);
  - a fork's first write into the prompt's shared, partly filled last block
    copies that block first, except for the sample that holds it alone by then.
"""

from __future__ import annotations

import pytest
import torch

from conftest import SHAPES, TOKENIZER_SIZE, hf_greedy
from fastcodegen import Engine, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
BLOCK = 16


def _random_prompts(engine, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, engine.vocab_limit, (n,), generator=g).tolist() for n in lengths]


def _seeded_engine(checkpoint, seed: int, **kwargs) -> Engine:
    """An engine on the hd64 checkpoint whose own draws (requests without a seed) use `seed`.

    (engine_factory's `seed` picks the checkpoint's weights, not the engine's seed.)
    """
    path, _ = checkpoint("hd64")
    return Engine(str(path), device="cpu", progress=False, seed=seed, **kwargs)


def _stats(engine) -> dict:
    """The scheduler's counters, from a snapshot."""
    s = engine.stats
    return dict(computed=s.computed_tokens, hits=s.prefix_hit_tokens, preemptions=s.preemptions, copies=s.block_copies)


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def _total_blocks(engine) -> int:
    return engine.kv_cache_tokens // engine.config.block_size


def _assert_idle_and_whole(engine):
    assert not engine.has_unfinished_requests()
    assert engine.num_free_kv_blocks == _total_blocks(engine)
    engine._scheduler.check()


def _run_to_end(engine, prompts_by_id: dict, finals: dict, max_steps: int = 1000) -> list[list]:
    """Steps until nothing is unfinished; checks every output's id and records each request's final one.

    Returns the outputs of each step.
    """
    steps = []
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return steps
        outs = engine.step()
        steps.append(outs)
        _record(outs, prompts_by_id, finals)
    pytest.fail("the engine did not finish")


def _record(outs, prompts_by_id: dict, finals: dict) -> None:
    ids = [o.request_id for o in outs]
    assert len(ids) == len(set(ids)), "a request reported twice in one step"
    for o in outs:
        assert o.request_id in prompts_by_id, f"unknown request id {o.request_id!r}"
        assert o.request_id not in finals, f"{o.request_id!r} reported after its final output"
        assert o.prompt_token_ids == prompts_by_id[o.request_id], "an output carries another request's id"
        assert o.finished == all(c.finished for c in o.outputs)
        if o.finished:
            finals[o.request_id] = o


# ---------------------------------------------------------------------------- continuous batching


def test_requests_arriving_mid_run_get_greedy_tokens(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64", max_num_seqs=4)
    p0, p1, p2 = _random_prompts(engine, [7, 20, 33], fresh_seed)
    max_tokens = {"first": 12, "third": 9}
    prompts = {}
    finals = {}

    rid0 = engine.add_request(
        prompt_token_ids=p0, sampling_params=SamplingParams(max_tokens=12, **GREEDY), request_id="first"
    )
    assert rid0 == "first"
    prompts[rid0] = p0
    for _ in range(3):
        _record(engine.step(), prompts, finals)
    assert engine.has_unfinished_requests() and not finals

    rid1 = engine.add_request(prompt_token_ids=p1, sampling_params=SamplingParams(max_tokens=15, **GREEDY))
    prompts[rid1] = p1
    max_tokens[rid1] = 15
    rid2 = engine.add_request(
        prompt_token_ids=p2, sampling_params=SamplingParams(max_tokens=9, **GREEDY), request_id="third"
    )
    assert rid2 == "third"
    prompts[rid2] = p2
    assert len({rid0, rid1, rid2}) == 3

    # A live id cannot be reused (custom or generated), and a failed add changes nothing.
    free = engine.num_free_kv_blocks
    for dup in (rid0, rid1, rid2):
        with pytest.raises(ValueError, match="request_id"):
            engine.add_request(prompt_token_ids=[1, 2, 3], request_id=dup)
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request(prompt_token_ids=[1, 2, 3], request_id=7)
    assert engine.num_free_kv_blocks == free
    assert engine._scheduler.num_running + engine._scheduler.num_waiting == 3

    _run_to_end(engine, prompts, finals)
    assert set(finals) == {rid0, rid1, rid2}
    for rid, prompt in prompts.items():
        out = finals[rid]
        assert out.finished and len(out.outputs) == 1
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, max_tokens[rid])
    assert engine.step() == []
    _assert_idle_and_whole(engine)

    # A finished request's id is free again.
    assert engine.add_request(prompt_token_ids=p0, request_id="first") == "first"
    engine.abort("first")
    _assert_idle_and_whole(engine)


def test_generated_request_id_never_collides_with_a_custom_one(engine_factory):
    # The engine numbers requests "0", "1", ...; a caller may have taken one of those names already.
    engine, _ = engine_factory("hd64")
    params = SamplingParams(max_tokens=5, **GREEDY)
    custom = [
        engine.add_request(prompt_token_ids=[1, 2, 3], sampling_params=params, request_id=str(i)) for i in range(3)
    ]
    generated = engine.add_request(prompt_token_ids=[4, 5, 6], sampling_params=params)
    assert generated not in custom
    # Aborting the generated request leaves the custom ones running.
    engine.abort(generated)
    assert engine._scheduler.num_running + engine._scheduler.num_waiting == 3
    generated = engine.add_request(prompt_token_ids=[4, 5, 6], sampling_params=params)
    assert generated not in custom
    prompts = {rid: [1, 2, 3] for rid in custom}
    prompts[generated] = [4, 5, 6]
    finals = {}
    _run_to_end(engine, prompts, finals)
    assert set(finals) == set(prompts)
    _assert_idle_and_whole(engine)


# ---------------------------------------------------------------------------- preemption


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_a_one_sequence_budget(engine_factory, fresh_seed, prefix_caching):
    n_positions = SHAPES["hd64"].n_positions
    # The KV cache holds one full-length sequence: 8 blocks for 7 requests (one of 2 samples) that grow to 60 tokens.
    tight, hf = engine_factory("hd64", kv_cache_tokens=n_positions, enable_prefix_caching=prefix_caching)
    roomy, _ = engine_factory("hd64", enable_prefix_caching=prefix_caching)
    assert tight.num_free_kv_blocks == n_positions // BLOCK
    prompts = _random_prompts(tight, [30, 25, 33, 20, 31, 28, 17], fresh_seed)
    params = [SamplingParams(max_tokens=28, n=2 if i == 2 else 1, **GREEDY) for i in range(len(prompts))]

    outs = tight.generate(prompt_token_ids=prompts, sampling_params=params)
    assert tight.stats.preemptions > 0
    ref = roomy.generate(prompt_token_ids=prompts, sampling_params=params)
    assert roomy.stats.preemptions == 0
    for prompt, p, out, r in zip(prompts, params, outs, ref):
        expected = hf_greedy(hf, prompt, 28)
        assert [c.index for c in out.outputs] == list(range(p.n))
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in r.outputs] == [expected] * p.n
    _assert_idle_and_whole(tight)
    _assert_idle_and_whole(roomy)


# ---------------------------------------------------------------------------- chunked prefill


def test_chunked_prefill_matches_transformers(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64", max_num_batched_tokens=16, max_num_seqs=4)
    prompts = _random_prompts(engine, [100, 70, 3, 47], fresh_seed)
    before = _stats(engine)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=10, **GREEDY))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 10)
    # No prompt shares a block with another: every prompt token and every output token but the last is computed.
    assert _delta(before, _stats(engine))["computed"] == sum(len(p) + 10 - 1 for p in prompts)
    _assert_idle_and_whole(engine)


def test_decoding_continues_during_chunked_prefill(engine_factory, fresh_seed):
    budget = 16
    engine, hf = engine_factory("hd64", max_num_batched_tokens=budget, max_num_seqs=4)
    short, long = _random_prompts(engine, [5, 100], fresh_seed)
    a_tokens, b_tokens = 20, 6
    prompts, finals = {}, {}
    a = engine.add_request(prompt_token_ids=short, sampling_params=SamplingParams(max_tokens=a_tokens, **GREEDY))
    prompts[a] = short

    computed = []  # tokens each step computed
    step_no = 0

    def step():
        nonlocal step_no
        before = engine.stats.computed_tokens
        outs = engine.step()
        step_no += 1
        computed.append(engine.stats.computed_tokens - before)
        _record(outs, prompts, finals)
        return outs

    # Step 1 computes a's whole prompt and samples its first token.
    step()
    b = engine.add_request(prompt_token_ids=long, sampling_params=SamplingParams(max_tokens=b_tokens, **GREEDY))
    prompts[b] = long
    a_counts, b_counts = {1: None}, {}
    while engine.has_unfinished_requests():
        for out in step():
            n = len(out.outputs[0].token_ids)
            (a_counts if out.request_id == a else b_counts)[step_no] = n

    # b's prompt: the budget less a's decode token each step, 15 + 15 + ... + 10, over 7 steps (2..8);
    # b's first token comes from step 8.
    chunks = [budget - 1] * 6 + [100 - 6 * (budget - 1)]
    assert computed[:9] == [len(short)] + [1 + c for c in chunks] + [2]
    # a got one token every step: whenever a step reported a, a held as many tokens as steps had run,
    # and it finished with its last token at step a_tokens.
    # (a step reports a request whose text grew, and its last output; a token may add no text.)
    assert all(n == s for s, n in a_counts.items() if n is not None), a_counts
    assert max(a_counts) == a_tokens and finals[a].finished
    # b got its first token at step 8 and one per step after.
    assert all(n == s - 7 for s, n in b_counts.items()), b_counts
    assert min(b_counts) >= 8 and max(b_counts) == 7 + b_tokens

    assert finals[a].outputs[0].token_ids == hf_greedy(hf, short, a_tokens)
    assert finals[b].outputs[0].token_ids == hf_greedy(hf, long, b_tokens)
    _assert_idle_and_whole(engine)


# ---------------------------------------------------------------------------- prefix cache


def test_prefix_cache_hits_whole_shared_blocks(engine_factory, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    base, tail, other = (torch.randint(0, TOKENIZER_SIZE, (n,), generator=g).tolist() for n in (60, 12, 12))
    tail[0] = (base[48] + 1) % 400  # differs right after the 48 shared tokens
    shared = base[:48]
    prompts = [
        base,  # nothing cached yet
        shared + tail,  # 48 shared tokens: 3 whole blocks
        shared,  # the same 48 tokens alone: the block holding the last token is computed: 2 blocks
        shared[:20] + other,  # 20 shared tokens: 1 whole block
    ]
    expected_hits = [0, 48, 32, 16]
    max_tokens = 6

    runs = {}
    for caching in (True, False):
        engine, hf = engine_factory("hd64", enable_prefix_caching=caching)
        deltas = []
        for prompt in prompts:
            before = _stats(engine)
            out = engine.generate(
                prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=max_tokens, **GREEDY)
            )
            assert out[0].outputs[0].token_ids == hf_greedy(hf, prompt, max_tokens)
            deltas.append(_delta(before, _stats(engine)))
        _assert_idle_and_whole(engine)
        runs[caching] = deltas

    for prompt, hits, on, off in zip(prompts, expected_hits, runs[True], runs[False]):
        assert off["hits"] == 0
        assert off["computed"] == len(prompt) + max_tokens - 1
        assert on["hits"] == hits
        assert on["computed"] == off["computed"] - hits


# ---------------------------------------------------------------------------- n samples


@pytest.mark.parametrize("prompt_len, copies", [(40, 7), (48, 0)])
def test_n_samples_compute_the_prompt_once(engine_factory, fresh_seed, prompt_len, copies):
    engine, hf = engine_factory("hd64")
    [prompt] = _random_prompts(engine, [prompt_len], fresh_seed)
    before = _stats(engine)
    params = SamplingParams(n=8, temperature=1.0, seed=fresh_seed, max_tokens=10, ignore_eos=True)
    [out] = engine.generate(prompt_token_ids=[prompt], sampling_params=params)
    d = _delta(before, _stats(engine))
    assert [c.index for c in out.outputs] == list(range(8))
    lengths = [len(c.token_ids) for c in out.outputs]
    assert lengths == [10] * 8
    # The prompt once (not 8 times), then each sample's tokens but its last.
    assert d["computed"] == prompt_len + sum(k - 1 for k in lengths) == prompt_len + 8 * 9
    assert d["hits"] == 0 and d["preemptions"] == 0
    assert d["copies"] == copies
    completions = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(completions)) == 8, completions
    _assert_idle_and_whole(engine)

    # Greedy: the same shared prompt, and every sample is transformers' greedy continuation.
    before = _stats(engine)
    [out] = engine.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(n=8, max_tokens=10, **GREEDY))
    d = _delta(before, _stats(engine))
    expected = hf_greedy(hf, prompt, 10)
    assert [c.index for c in out.outputs] == list(range(8))
    assert [c.token_ids for c in out.outputs] == [expected] * 8
    # Its prompt's whole blocks are cached now (never the one with the last token).
    hits = (prompt_len - 1) // BLOCK * BLOCK
    assert d["hits"] == hits
    assert d["computed"] == prompt_len - hits + 8 * (10 - 1)
    assert d["copies"] == copies
    _assert_idle_and_whole(engine)


def test_n_samples_temperature_one_are_not_all_alike_without_a_seed(checkpoint, fresh_seed):
    engine = _seeded_engine(checkpoint, fresh_seed)
    [prompt] = _random_prompts(engine, [40], fresh_seed)
    [out] = engine.generate(
        prompt_token_ids=[prompt], sampling_params=SamplingParams(n=8, temperature=1.0, max_tokens=10, ignore_eos=True)
    )
    assert [c.index for c in out.outputs] == list(range(8))
    assert len({tuple(c.token_ids) for c in out.outputs}) == 8


def test_forks_without_a_free_row_wait_and_match_transformers(engine_factory, fresh_seed):
    # 3 rows: a long request and a 3-sample one; 2 of the 3 samples fork into a full batch and must wait.
    engine, hf = engine_factory("hd64", max_num_seqs=3)
    prompts = _random_prompts(engine, [9, 37], fresh_seed)
    params = [SamplingParams(max_tokens=20, **GREEDY), SamplingParams(n=3, max_tokens=8, **GREEDY)]
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    assert outs[0].outputs[0].token_ids == hf_greedy(hf, prompts[0], 20)
    expected = hf_greedy(hf, prompts[1], 8)
    assert [c.index for c in outs[1].outputs] == [0, 1, 2]
    assert [c.token_ids for c in outs[1].outputs] == [expected] * 3
    _assert_idle_and_whole(engine)


def test_parallel_sampling_is_reproducible(checkpoint, fresh_seed):
    engine = _seeded_engine(checkpoint, 0)
    [prompt] = _random_prompts(engine, [40], fresh_seed)
    params = SamplingParams(n=8, temperature=1.0, seed=fresh_seed, max_tokens=8, ignore_eos=True)

    def completions(e, p=params):
        [out] = e.generate(prompt_token_ids=[prompt], sampling_params=p)
        return [c.token_ids for c in out.outputs]

    first = completions(engine)
    assert len({tuple(c) for c in first}) == 8
    # Again: now with the prompt's blocks in the prefix cache.
    assert completions(engine) == first
    # Alongside other requests, on an engine seeded differently.
    other = _seeded_engine(checkpoint, 1)
    noise = SamplingParams(n=3, temperature=1.0, max_tokens=8)
    outs = other.generate(prompt_token_ids=[prompt[:30], prompt], sampling_params=[noise, params])
    assert [c.token_ids for c in outs[1].outputs] == first
    # Another seed draws other completions.
    assert (
        completions(engine, SamplingParams(n=8, temperature=1.0, seed=fresh_seed + 1, max_tokens=8, ignore_eos=True))
        != first
    )


# ---------------------------------------------------------------------------- abort


def test_abort_running_and_waiting_requests(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64", max_num_seqs=2)
    total = engine.num_free_kv_blocks
    assert total == _total_blocks(engine)
    ps = _random_prompts(engine, [11, 23, 19, 5], fresh_seed)
    prompts, finals = {}, {}
    ids = []
    for p in ps:
        rid = engine.add_request(prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=10, **GREEDY))
        prompts[rid] = p
        ids.append(rid)
    running, kept, waiting, last = ids

    _record(engine.step(), prompts, finals)
    core = engine._scheduler
    assert (core.num_running, core.num_waiting) == (2, 2)
    assert engine.num_free_kv_blocks < total

    engine.abort(running)
    engine.abort(waiting)
    engine.abort("no such request")
    engine.abort(running)  # twice: a no-op
    assert (core.num_running, core.num_waiting) == (1, 1)
    core.check()

    steps = _run_to_end(engine, prompts, finals)
    reported = {o.request_id for outs in steps for o in outs}
    assert running not in reported and waiting not in reported
    assert set(finals) == {kept, last}
    for rid in (kept, last):
        assert finals[rid].outputs[0].token_ids == hf_greedy(hf, prompts[rid], 10)
    assert engine.num_free_kv_blocks == total
    engine.abort(kept)  # finished: a no-op
    _assert_idle_and_whole(engine)


# ---------------------------------------------------------------------------- nothing leaks


class _FailOnce:
    """Wraps ModelRunner.execute: the `at`-th call raises, the others run."""

    def __init__(self, execute, at: int):
        self.execute, self.at, self.calls = execute, at, 0

    def __call__(self, step, *rest):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("injected failure")
        return self.execute(step, *rest)


def test_no_blocks_leak_after_a_mixed_run(engine_factory, fresh_seed, monkeypatch):
    engine, hf = engine_factory("hd64", max_num_seqs=8, max_num_batched_tokens=32)
    total = _total_blocks(engine)
    prompts = _random_prompts(engine, [13, 40, 27, 5, 33, 64], fresh_seed)
    ref = hf_greedy(hf, prompts[0], 12)
    stop_token = ref[5]
    text = engine.tokenizer.decode(hf_greedy(hf, prompts[1], 12))
    stop_string = text[len(text) // 2 :][:2] or "x"

    # n > 1, stop tokens and strings, different lengths, sampled and greedy, in one call.
    params = [
        SamplingParams(max_tokens=12, stop_token_ids=[stop_token], **GREEDY),
        SamplingParams(max_tokens=12, stop=[stop_string], **GREEDY),
        SamplingParams(n=4, max_tokens=9, temperature=0.8, seed=fresh_seed),
        SamplingParams(n=3, max_tokens=3, **GREEDY),
        SamplingParams(max_tokens=30, temperature=1.0),
        SamplingParams(n=2, max_tokens=7, temperature=1.0, stop=["\n"]),
    ]
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    first = outs[0].outputs[0]
    assert first.finish_reason == "stop" and first.stop_reason == stop_token
    assert first.token_ids == ref[: ref.index(stop_token) + 1]
    assert [len(o.outputs) for o in outs] == [p.n for p in params]
    _assert_idle_and_whole(engine)

    # A stream abandoned halfway.
    stream = engine.generate(prompt_token_ids=prompts[1:4], sampling_params=params[1:4], stream=True)
    for _ in range(3):
        next(stream)
    assert engine.num_free_kv_blocks < total
    stream.close()
    _assert_idle_and_whole(engine)

    # A step that fails inside generate(): the error propagates and the call's requests are dropped.
    fail = _FailOnce(engine._runner.execute, at=4)
    monkeypatch.setattr(engine._runner, "execute", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.generate(prompt_token_ids=prompts[2:], sampling_params=params[2:])
    assert fail.calls == 4
    _assert_idle_and_whole(engine)

    # A step that fails under add_request/step: the requests stay, and stepping on finishes them.
    fail = _FailOnce(fail.execute, at=3)
    monkeypatch.setattr(engine._runner, "execute", fail)
    live = {}
    for p, sp in zip(prompts, params):
        live[engine.add_request(prompt_token_ids=p, sampling_params=sp)] = p
    finals = {}
    with pytest.raises(RuntimeError, match="injected failure"):
        for _ in range(5):
            _record(engine.step(), live, finals)
    assert engine.has_unfinished_requests()
    engine._scheduler.check()
    # One still running is aborted midway, the rest run to the end.
    aborted = next(rid for rid in live if rid not in finals)
    engine.abort(aborted)
    del live[aborted]
    _run_to_end(engine, live, finals)
    assert set(finals) == set(live)
    _assert_idle_and_whole(engine)

    # And the engine still gives transformers' tokens.
    out = engine.generate(prompt_token_ids=[prompts[5]], sampling_params=SamplingParams(max_tokens=8, **GREEDY))
    assert out[0].outputs[0].token_ids == hf_greedy(hf, prompts[5], 8)
    _assert_idle_and_whole(engine)


@pytest.mark.parametrize(
    "fail_at",
    [
        1,
        2,
        3,
    ],
)
def test_a_failed_step_retried_gives_the_same_tokens(engine_factory, fresh_seed, monkeypatch, fail_at):
    # Step 1 computes the prompts and forks the 2 samples; step 2 is the samples' first decode, where the
    # older sample copies the shared partial block (31-token prompt: 15 tokens in block 1); step 3 decodes.
    engine, hf = engine_factory("hd64")
    prompts = _random_prompts(engine, [31, 9], fresh_seed)
    ids = {}
    for p, n in zip(prompts, (2, 1)):
        ids[engine.add_request(prompt_token_ids=p, sampling_params=SamplingParams(n=n, max_tokens=8, **GREEDY))] = p
    fail = _FailOnce(engine._runner.execute, at=fail_at)
    monkeypatch.setattr(engine._runner, "execute", fail)
    finals = {}
    for _ in range(fail_at - 1):
        _record(engine.step(), ids, finals)
    copies = engine.stats.block_copies
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.step()
    assert engine.stats.block_copies == copies + (1 if fail_at == 2 else 0)
    _run_to_end(engine, ids, finals)
    for rid, p in ids.items():
        expected = hf_greedy(hf, p, 8)
        assert all(c.token_ids == expected for c in finals[rid].outputs), fail_at
    _assert_idle_and_whole(engine)


# ---------------------------------------------------------------------------- progress


def test_progress_bar_for_many_prompts_only(engine_factory, capfd):
    engine, _ = engine_factory("hd64", progress=True)
    capfd.readouterr()  # loading's own bars
    params = SamplingParams(max_tokens=3, **GREEDY)

    engine.generate(prompt_token_ids=[[1, 2], [3, 4, 5], [6]], sampling_params=params)
    err = capfd.readouterr().err
    assert "generating" in err and "3/3" in err

    engine.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=params)
    assert "generating" not in capfd.readouterr().err

    engine.generate(prompt_token_ids=[[1, 2], [3, 4, 5]], sampling_params=params, use_tqdm=False)
    assert "generating" not in capfd.readouterr().err


def test_step_reports_what_a_generate_call_advanced(engine_factory):
    """A served request that a generate() call carried to its end is reported by the next step(), once."""
    engine, hf = engine_factory("hd64")
    rid = engine.add_request(prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(max_tokens=4, **GREEDY))
    engine.generate(prompt_token_ids=[[4, 5, 6]], sampling_params=SamplingParams(max_tokens=12, **GREEDY))
    assert not engine.has_unfinished_requests()
    outs = engine.step()
    assert [o.request_id for o in outs] == [rid] and outs[0].finished
    assert outs[0].outputs[0].token_ids == hf_greedy(hf, [1, 2, 3], 4)
    assert engine.step() == []
