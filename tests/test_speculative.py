"""Speculative decoding with prompt lookup (`speculative_model="[ngram]"`): exact, whatever is accepted.

Greedy output equals transformers' greedy loop on random checkpoints at odd shapes, and the engine's own output
without speculation on codegen-tiny-py (real code, an editing workload where most proposals are kept); stops,
max_tokens and the context end inside an accepted run cut it where plain decoding would; sampled output matches
the exact distribution of the first three tokens, computed by hand from transformers' logits, by a chi-square
test; seeded requests give the same tokens with and without speculation; preemption, abort, n samples,
logprobs, penalties (no speculation) and plain requests share batches; the prefix cache ends up holding what
plain decoding would leave there. The native proposer is checked against the rule written out in Python.
"""

from __future__ import annotations

import inspect
import json
import random
import textwrap

import numpy as np
import pytest
import torch

from conftest import (
    EOS_ID, SHAPES, TOKENIZER_SIZE, Shape, assert_greedy_equal, build_hf_model, hf_greedy, perturb, repetitive_prompts,
    save_checkpoint,
)  # fmt: skip
from fastcodegen import Engine, SamplingParams, _C

GREEDY = dict(temperature=0.0, ignore_eos=True)
# The chi-square tests flag a sound sampler with probability FALSE_ALARM each.
FALSE_ALARM = 1e-4


def edit_prompt() -> str:
    """A file, then the same file being re-emitted with one name changed: prompt lookup's best case."""
    src = textwrap.dedent(inspect.getsource(json.dumps))[:1400]
    return "# before\n" + src + "\n# after: skipkeys is now skip_keys\n" + src.replace("skipkeys", "skip_keys")[:160]


@pytest.fixture(scope="module")
def tiny_engines():
    common = dict(device="cpu", progress=False)
    plain = Engine("codegen-tiny-py", **common)
    spec = Engine("codegen-tiny-py", speculative_model="[ngram]", num_speculative_tokens=5, **common)
    yield plain, spec
    plain.close()
    spec.close()


@pytest.mark.parametrize("shape", ["hd64", "hd80", "full-rotary"])
def test_greedy_equals_transformers(engine_factory, fresh_seed, shape):
    engine, hf = engine_factory(shape, speculative_model="[ngram]", num_speculative_tokens=3)
    prompts = repetitive_prompts([5, 12, 23, 40], fresh_seed)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=40, **GREEDY))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 40)
    s = engine.stats
    assert s.spec_runs > 0 and s.spec_proposed >= s.spec_runs and 0 < s.spec_accepted <= s.spec_proposed
    assert s.acceptance_rate == s.spec_accepted / s.spec_proposed
    engine._scheduler.check()
    assert engine.num_free_kv_blocks == engine.stats.num_blocks


def test_tiny_py_editing_workload(tiny_engines):
    plain, spec = tiny_engines
    prompt = edit_prompt()
    params = SamplingParams(max_tokens=160, **GREEDY)
    before = spec.stats
    want, got = plain.generate(prompt, params)[0], spec.generate(prompt, params)[0]
    assert got.outputs[0].token_ids == want.outputs[0].token_ids and got.outputs[0].text == want.outputs[0].text
    proposed = spec.stats.spec_proposed - before.spec_proposed
    accepted = spec.stats.spec_accepted - before.spec_accepted
    assert proposed > 0 and accepted / proposed > 0.5  # the edited copy follows the original
    runs = spec.stats.spec_runs - before.spec_runs
    assert runs < 160 * 0.6  # far fewer verifying steps than tokens


def test_stops_and_lengths_cut_accepted_runs_where_plain_decoding_does(tiny_engines, fresh_seed):
    plain, spec = tiny_engines
    prompt = edit_prompt()
    full = plain.generate(prompt, SamplingParams(max_tokens=120, **GREEDY))[0].outputs[0]
    rng = random.Random(fresh_seed)
    params = [SamplingParams(max_tokens=k, **GREEDY) for k in (1, 2, 3, 4, 5, 6, 9, 17)]
    for _ in range(6):  # stop strings that end inside the output, so inside accepted runs
        at = rng.randrange(5, len(full.text) - 3)
        params.append(SamplingParams(max_tokens=120, stop=[full.text[at : at + rng.randint(1, 3)]], **GREEDY))
    for _ in range(3):  # stop tokens taken from the output
        params.append(SamplingParams(max_tokens=120, stop_token_ids=[rng.choice(full.token_ids[3:])], **GREEDY))
    params.append(SamplingParams(max_tokens=120, stop_patterns=[r"^\s+if "], **GREEDY))
    prompts = [prompt] * len(params)
    for want, got in zip(plain.generate(prompts, params), spec.generate(prompts, params)):
        w, g = want.outputs[0], got.outputs[0]
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (w.token_ids, w.text, w.finish_reason, w.stop_reason)
    spec._scheduler.check()


def test_the_context_end_inside_an_accepted_run():
    prompt = edit_prompt()
    outs = []
    for spec in (None, "[ngram]"):
        with Engine("codegen-tiny-py", device="cpu", progress=False, max_model_len=512, speculative_model=spec) as e:
            ids = e.tokenizer.encode(prompt)[: 512 - 37]
            out = e.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=100, **GREEDY))[0]
            outs.append(out.outputs[0])
            if spec:
                assert e.stats.spec_accepted > 0
    assert outs[1].token_ids == outs[0].token_ids and len(outs[0].token_ids) == 37
    assert outs[1].finish_reason == outs[0].finish_reason == "length"


def _small_vocab_checkpoint(tmp_path_factory, vocab: int):
    shape = Shape(f"v{vocab}", n_embd=64, n_head=4, rotary_dim=8, n_layer=2, vocab_size=vocab, n_positions=64)
    model = build_hf_model(shape, seed=3, init_scale=0.05)  # a flat distribution: every token has mass
    path = save_checkpoint(model, tmp_path_factory.mktemp(f"v{vocab}"))
    return path, model


def _exact_three_token_probs(model, prompt: list[int], vocab: int, top_p: float) -> np.ndarray:
    """P(t1, t2, t3 | prompt) [vocab^3], float64, from transformers' logits, top-p applied by hand at each place."""

    def dist(contexts: list[list[int]]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor(contexts)).logits[:, -1].double()
        p = logits.softmax(-1).numpy()
        if top_p < 1.0:
            for row in p:
                order = np.argsort(-row, kind="stable")
                before = np.cumsum(row[order]) - row[order]
                row[order[(before >= top_p) & (np.arange(vocab) > 0)]] = 0.0
                row /= row.sum()
        return p

    p1 = dist([prompt])[0]
    p2 = dist([prompt + [a] for a in range(vocab)])
    p3 = dist([prompt + [a, b] for a in range(vocab) for b in range(vocab)]).reshape(vocab, vocab, vocab)
    return (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1)


def _chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of counts against probs, cells expecting fewer than 5 pooled into one."""
    n = counts.sum()
    expected = n * probs
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampled_tokens_follow_the_targets_distribution(tmp_path_factory, fresh_seed, top_p):
    vocab, draws = 6, 6000
    path, hf = _small_vocab_checkpoint(tmp_path_factory, vocab)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]  # prompt lookup proposes 3, 4, 1 after it
    probs = _exact_three_token_probs(hf, prompt, vocab, top_p)
    base = fresh_seed * draws
    params = [SamplingParams(temperature=1.0, top_p=top_p, max_tokens=3, ignore_eos=True, seed=base + i) for i in range(draws)]
    common = dict(device="cpu", progress=False, max_num_seqs=256, max_num_batched_tokens=2048, kv_cache_tokens=8192)
    outs = {}
    for spec in (None, "[ngram]"):
        with Engine(str(path), speculative_model=spec, num_speculative_tokens=3 if spec else None,
                    speculative_max_rows=0, **common) as e:  # fmt: skip
            got = e.generate(prompt_token_ids=[prompt] * draws, sampling_params=params, use_tqdm=False)
            outs[spec] = [tuple(o.outputs[0].token_ids) for o in got]
            if spec:
                # Past the first token (the prompt's step) each request verifies a proposal for its second token
                # (max_tokens leaves room for one), kept with the target's probability of it.
                assert e.stats.spec_runs > draws // 2 and 0 < e.stats.spec_accepted < e.stats.spec_proposed
    counts = np.zeros(vocab**3)
    for a, b, c in outs["[ngram]"]:
        counts[(a * vocab + b) * vocab + c] += 1
    assert _chi_square_p_value(counts, probs) > FALSE_ALARM
    # A seeded token's noise depends on its place only: speculation changes nothing a seed decides.
    assert outs["[ngram]"] == outs[None]


def test_mixed_batches_match_plain_decoding(tiny_engines, fresh_seed):
    plain, spec = tiny_engines
    prompt = edit_prompt()
    seed = fresh_seed % 10_000
    params = [
        SamplingParams(max_tokens=60, **GREEDY),
        SamplingParams(max_tokens=60, logprobs=2, **GREEDY),
        SamplingParams(max_tokens=60, temperature=0.8, top_p=0.95, seed=seed, n=3),
        SamplingParams(max_tokens=60, temperature=0.8, top_k=20, seed=seed + 1, logprobs=1),
        SamplingParams(max_tokens=60, frequency_penalty=0.5, presence_penalty=0.3, **GREEDY),  # never speculates
        SamplingParams(max_tokens=60, logit_bias={7: -100.0}, prompt_logprobs=1, **GREEDY),
    ]
    prompts = [prompt, prompt[:300], prompt, prompt[:500], prompt, prompt[:200]]
    for want, got in zip(plain.generate(prompts, params), spec.generate(prompts, params)):
        assert len(got.outputs) == len(want.outputs)
        for w, g in zip(want.outputs, got.outputs):
            assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
            if w.logprobs is not None:
                assert len(g.logprobs) == len(g.token_ids)
                for dw, dg in zip(w.logprobs, g.logprobs):
                    assert dg.keys() == dw.keys()
                    assert all(dg[t] == pytest.approx(dw[t], abs=1e-4) for t in dw)
        if want.prompt_logprobs is not None:
            assert got.prompt_logprobs[1:] == [pytest.approx(d, abs=1e-4) for d in want.prompt_logprobs[1:]]
    spec._scheduler.check()


def test_preemption_and_abort_while_speculating(engine_factory, fresh_seed):
    engine, hf = engine_factory("hd64", kv_cache_tokens=128, speculative_model="[ngram]", num_speculative_tokens=4)
    prompts = repetitive_prompts([30, 25, 33, 20, 31, 28], fresh_seed)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=50, **GREEDY))
    assert engine.stats.preemptions > 0 and engine.stats.spec_accepted > 0
    for prompt, out in zip(prompts, outs):
        # A preempted sequence's tokens are recomputed as a prompt: a near-tie may then go the other way.
        assert_greedy_equal(hf, prompt, out.outputs[0].token_ids, 50)
    engine._scheduler.check()
    assert engine.num_free_kv_blocks == engine.kv_cache_tokens // 16
    rid = engine.add_request(prompt_token_ids=prompts[0], sampling_params=SamplingParams(max_tokens=50, **GREEDY))
    for _ in range(4):
        engine.step()
    assert engine.stats.spec_runs > 0
    engine.abort(rid)
    engine._scheduler.check()
    assert not engine.has_unfinished_requests()
    assert engine.num_free_kv_blocks == engine.kv_cache_tokens // 16


def test_prefix_cache_holds_what_plain_decoding_leaves(engine_factory, fresh_seed):
    prompts = repetitive_prompts([20, 37], fresh_seed)
    follow_hits, follow_tokens, cached = [], [], []
    for spec in (None, "[ngram]"):
        engine, _ = engine_factory("hd64", speculative_model=spec)
        outs = engine.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=45, **GREEDY))
        cached.append(engine._scheduler._core.pool.num_cached)
        # Each prompt with its completion, asked again: the cache serves the same verified blocks.
        again = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
        hits = engine.stats.prefix_hit_tokens
        follow = engine.generate(prompt_token_ids=again, sampling_params=SamplingParams(max_tokens=5, **GREEDY))
        follow_hits.append(engine.stats.prefix_hit_tokens - hits)
        follow_tokens.append([o.outputs[0].token_ids for o in follow])
        engine._scheduler.check()
    assert cached[0] == cached[1]
    assert follow_hits[0] == follow_hits[1] > 0
    assert follow_tokens[0] == follow_tokens[1]


def test_cached_blocks_hold_what_plain_decoding_computes(engine_factory, fresh_seed):
    """After speculative runs, each completed sequence's cached blocks are the blocks plain decoding caches, holding
    the same K/V (up to float rounding: verify steps compute them with prefill attention)."""
    prompts = repetitive_prompts([18, 35], fresh_seed)
    params = SamplingParams(max_tokens=45, **GREEDY)
    found = []
    for spec in (None, "[ngram]"):
        engine, _ = engine_factory("hd64", speculative_model=spec)
        outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
        if spec:
            assert engine.stats.spec_accepted > 0 and engine.stats.spec_proposed > engine.stats.spec_accepted
        per_seq = []
        for p, o in zip(prompts, outs):
            tokens = p + o.outputs[0].token_ids
            hits = engine.stats.prefix_hit_tokens
            rid = engine.add_request(prompt_token_ids=tokens, sampling_params=SamplingParams(max_tokens=2, **GREEDY))
            engine.step()  # admitted: its cached blocks looked up
            n = (engine.stats.prefix_hit_tokens - hits) // 16
            [seq] = engine._scheduler._core.request_seqs(engine._outputs.by_user_id[rid])
            blocks = engine._scheduler.seq_info(seq)["blocks"][:n]
            per_seq.append((n, engine._runner.kv_cache.data[:, :, blocks].clone()))
            engine.abort(rid)
        engine._scheduler.check()
        found.append(per_seq)
    for (n_plain, kv_plain), (n_spec, kv_spec) in zip(*found):
        assert n_plain == n_spec > 0  # every verified full block, and nothing more
        torch.testing.assert_close(kv_spec, kv_plain, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the native proposer


def reference_proposal(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup as documented: the longest trailing n-gram found earlier; of its occurrences the most recent
    followed by k tokens, else the one followed by the most."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        tail = tokens[L - n :]
        best, best_from = 0, -1
        for start in range(L - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                follow = min(k, L - start - n)
                if follow > best:
                    best, best_from = follow, start + n
                if best == k:
                    break
        if best_from >= 0:
            return tokens[best_from : best_from + best]
    return []


def _spec_scheduler(k: int, n_min: int, n_max: int, block_size: int = 4):
    c = _C.SchedulerConfig()
    c.num_blocks, c.block_size, c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len = 64, block_size, 4, 64, 96
    c.num_speculative_tokens, c.ngram_min, c.ngram_max = k, n_min, n_max
    core = _C.Scheduler(c)
    dtypes = {"int64": np.int64, "int32": np.int32, "float32": np.float32}
    buf = {name: np.full(shape, -7, dtypes[dtype]) for name, dtype, shape, *_ in core.step_fields()}
    core.bind(buf)
    return core, buf


def test_native_proposals_and_acceptance_follow_the_rule(fresh_seed):
    rng = random.Random(fresh_seed)
    for trial in range(60):
        k, n_min = rng.randint(1, 5), rng.randint(1, 2)
        n_max = rng.randint(n_min, 4)
        core, buf = _spec_scheduler(k, n_min, n_max)
        prompt = [rng.randrange(1, 5) for _ in range(rng.randint(2, 30))]  # 4 token ids: n-grams recur
        rc = _C.RequestConfig()
        rc.max_tokens, rc.ignore_eos = 40, True
        rid = core.add_request(prompt, rc)
        [seq] = core.request_seqs(rid)
        info = core.schedule()  # the prompt
        assert info.num_samples == 1
        core.update(np.array([rng.randrange(1, 5)], np.int32), None)
        tokens = prompt + core.output_tokens(seq)
        info = core.schedule()
        want = reference_proposal(tokens, k, n_min, n_max)
        T, S = info.num_tokens, info.num_samples
        assert T == S == 1 + len(want)
        assert buf["input_ids"][:T].tolist() == [tokens[-1]] + want
        assert buf["positions"][:T].tolist() == list(range(len(tokens) - 1, len(tokens) - 1 + T))
        assert buf["logits_indices"][:S].tolist() == list(range(S))
        assert buf["spec_token"][:S].tolist() == want + [-1]
        # The target agrees with the first `agree` proposals, then draws something else (or the bonus token).
        agree = rng.randint(0, len(want))
        drawn = want[:agree] + ([rng.choice([t for t in range(1, 6) if t != want[agree]])] if agree < len(want) else [5])
        drawn += [rng.randrange(1, 5) for _ in range(S - len(drawn))]
        stats = core.stats
        runs, proposed, accepted = stats.spec_runs, stats.spec_proposed, stats.spec_accepted
        core.update(np.array(drawn, np.int32), None)
        kept = drawn[: agree + 1]
        assert core.output_tokens(seq) == tokens[len(prompt) :] + kept
        assert buf["row_kept"][:S].tolist() == [1] * (agree + 1) + [0] * (S - agree - 1)
        info_after = core.seq_info(seq)
        assert info_after["num_computed"] == len(tokens) + agree  # the last token and the kept proposals
        # Blocks for the computed tokens, as a plain decode step leaves them: rejected proposals' blocks are freed.
        assert len(info_after["blocks"]) == -(-info_after["num_computed"] // 4)
        s = core.stats
        assert (s.spec_runs - runs, s.spec_proposed - proposed, s.spec_accepted - accepted) == (int(bool(want)), len(want), agree)
        core.check()


# ----------------------------------------------------------------------------- a draft model


# "same" keeps all but the near-ties that float rounding flips between the draft's decode and the verify step.
@pytest.mark.parametrize("draft, accepted", [("same", (0.9, 1.0)), ("perturbed", (0.05, 0.99)), ("unrelated", (0.0, 0.5))])
def test_draft_model_greedy_equals_transformers(engine_factory, drafts, fresh_seed, draft, accepted):
    engine, hf = engine_factory("hd64", speculative_model=str(drafts[draft]), num_speculative_tokens=3)
    prompts = repetitive_prompts([3, 17, 30], fresh_seed)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=30, **GREEDY))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 30)
    s = engine.stats
    assert s.spec_proposed > 0 and accepted[0] <= s.acceptance_rate <= accepted[1]
    engine._scheduler.check()
    assert engine.num_free_kv_blocks == engine.stats.num_blocks


def test_draft_model_under_preemption_n_samples_logprobs_and_abort(engine_factory, drafts, fresh_seed):
    plain, _ = engine_factory("hd64", kv_cache_tokens=128)
    spec, hf = engine_factory("hd64", kv_cache_tokens=128, speculative_model=str(drafts["perturbed"]))
    prompts = repetitive_prompts([30, 25, 33, 20], fresh_seed)
    params = [
        SamplingParams(max_tokens=40, **GREEDY),
        SamplingParams(max_tokens=40, logprobs=2, **GREEDY),
        SamplingParams(max_tokens=40, n=2, **GREEDY),
        SamplingParams(max_tokens=40, frequency_penalty=1.0, **GREEDY),
    ]
    for want, got in zip(plain.generate(prompt_token_ids=prompts, sampling_params=params),
                         spec.generate(prompt_token_ids=prompts, sampling_params=params)):  # fmt: skip
        for w, g in zip(want.outputs, got.outputs, strict=True):
            assert g.token_ids == w.token_ids
            if w.logprobs is not None:
                assert [d.keys() for d in g.logprobs] == [d.keys() for d in w.logprobs]
    assert spec.stats.preemptions > 0 and spec.stats.spec_accepted > 0
    spec._scheduler.check()
    rid = spec.add_request(prompt_token_ids=prompts[0], sampling_params=SamplingParams(max_tokens=40, **GREEDY))
    for _ in range(4):
        spec.step()
    spec.abort(rid)
    spec._scheduler.check()
    assert spec.num_free_kv_blocks == spec.kv_cache_tokens // 16


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_draft_model_sampling_follows_the_targets_distribution(tmp_path_factory, fresh_seed, top_p):
    """Rejection sampling against a draft whose distribution differs from the target's: the first three tokens'
    joint distribution is still the target's."""
    import shutil

    vocab, draws = 6, 6000
    path, hf = _small_vocab_checkpoint(tmp_path_factory, vocab)
    draft = tmp_path_factory.mktemp("draft") / "d"
    shutil.copytree(path, draft)
    perturb(draft, 2.0, seed=5)
    prompt = [1, 2, 3, 4, 1, 2]
    probs = _exact_three_token_probs(hf, prompt, vocab, top_p)
    params = [
        SamplingParams(temperature=1.0, top_p=top_p, max_tokens=5, ignore_eos=True, seed=fresh_seed * draws + i)
        for i in range(draws)
    ]
    with Engine(str(path), device="cpu", progress=False, max_num_seqs=256, max_num_batched_tokens=2048,
                kv_cache_tokens=8192, speculative_model=str(draft), num_speculative_tokens=3,
                speculative_max_rows=0) as e:  # fmt: skip
        got = e.generate(prompt_token_ids=[prompt] * draws, sampling_params=params, use_tqdm=False)
        assert e.stats.spec_runs > draws and 0.1 < e.stats.acceptance_rate < 0.95  # rejections happen
    counts = np.zeros(vocab**3)
    for o in got:
        a, b, c = o.outputs[0].token_ids[:3]
        counts[(a * vocab + b) * vocab + c] += 1
    assert _chi_square_p_value(counts, probs) > FALSE_ALARM


def test_a_draft_with_another_vocabulary_is_refused(engine_factory, checkpoint, tmp_path_factory):
    with pytest.raises(ValueError, match="tokenizer"):
        engine_factory("hd64", speculative_model="codegen-tiny-py")
    path, _ = checkpoint("hd64")
    bare = save_checkpoint(build_hf_model(SHAPES["hd64"], seed=1), tmp_path_factory.mktemp("bare"))  # no tokenizer
    with pytest.raises(ValueError, match="no tokenizer"):
        Engine(str(path), device="cpu", progress=False, speculative_model=str(bare))
    with pytest.raises(ValueError, match="speculative_model"):
        Engine(str(path), device="cpu", progress=False, speculative_model="")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        Engine(str(path), device="cpu", progress=False, num_speculative_tokens=3)


def test_tiny_py_with_its_shipped_draft(tiny_engines, fresh_seed):
    """codegen-tiny-py with codegen-tiny-py-draft on real code: the plain engine's greedy tokens, stops included."""
    plain, _ = tiny_engines
    rng = random.Random(fresh_seed)
    prompts = [textwrap.dedent(inspect.getsource(f))[:rng.randint(120, 400)] for f in (json.dumps, json.loads, random.shuffle)]
    with Engine("codegen-tiny-py", device="cpu", progress=False, speculative_model="codegen-tiny-py-draft") as spec:
        params = [SamplingParams(max_tokens=k, **GREEDY) for k in (3, 50)] + [SamplingParams(max_tokens=60, stop=["\n\n"], temperature=0)]
        for prompt in prompts:
            for p in params:
                w = plain.generate(prompt, p)[0].outputs[0]
                g = spec.generate(prompt, p)[0].outputs[0]
                assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        s = spec.stats
        assert s.spec_proposed > 0 and s.spec_accepted > 0  # about a quarter kept (bench_speculative.py), varying by prompt
        spec._scheduler.check()
