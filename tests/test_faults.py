"""Faults the engine must survive: non-finite logits, closing an engine, a second engine sizing its KV cache.

Non-finite logits (NaN weights, an overflow) must fail the requests they
touch with an error naming them, never turn into a stream of token 0; the
other requests keep running. A closed engine gives its memory back. The KV
cache is sized from what this engine may use, whatever else the process
holds.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from conftest import TOKENIZER_SIZE, hf_greedy
from fastcodegen import Engine, GenerationError, SamplingParams
from fastcodegen.config import EngineConfig, ModelConfig
from fastcodegen.kv_cache import activation_bytes, graph_bytes, num_kv_blocks

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _poison_rows_of(engine, prompt_first_token: int, value: float, after_steps: int = 0):
    """Makes the model's logits non-finite for the rows of the request whose prompt starts with a given token."""
    real = engine._runner.execute
    steps = {"n": 0}

    def execute(step, *rest):
        logits = real(step, *rest).clone()
        steps["n"] += 1
        if steps["n"] > after_steps:
            for row in range(step.num_samples):
                req = engine._outputs.requests[int(step.sample_request[row])]
                if req.prompt_token_ids[0] == prompt_first_token:
                    logits[row, 3] = value
        return logits

    engine._runner.execute = execute
    return real


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("after_steps", [0, 2], ids=["in-prefill", "in-decode"])
def test_non_finite_logits_fail_that_request_and_the_others_complete(engine_factory, value, after_steps, fresh_seed):
    engine, hf = engine_factory("hd64")
    rng = np.random.default_rng(fresh_seed)
    prompts = [[7] + rng.integers(8, TOKENIZER_SIZE, 5).tolist() for _ in range(3)]
    prompts[1][0] = 1  # the faulty one
    real = _poison_rows_of(engine, 1, value, after_steps)
    with pytest.raises(GenerationError, match=r"prompt 1: request \S+: the model produced non-finite logits") as e:
        engine.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    outs = e.value.outputs
    assert [o.error is None for o in outs] == [True, False, True]
    for i in (0, 2):
        assert outs[i].outputs[0].token_ids == hf_greedy(hf, prompts[i], 6)
        assert outs[i].outputs[0].finish_reason == "length"
    bad = outs[1]
    assert bad.finished and bad.outputs[0].finish_reason == "error" and "non-finite" in bad.error
    assert 0 not in bad.outputs[0].token_ids or hf_greedy(hf, prompts[1], after_steps)[:after_steps].count(0)
    assert len(bad.outputs[0].token_ids) == after_steps  # nothing appended once the logits went bad
    # The engine is whole and usable: every block back, the next call normal.
    engine._runner.execute = real
    engine._scheduler.check()
    assert engine.num_free_kv_blocks == engine.kv_cache_tokens // 16
    again = engine.generate(prompt_token_ids=prompts[1:2], sampling_params=GREEDY)
    assert again[0].outputs[0].token_ids == hf_greedy(hf, prompts[1], 6)


def test_non_finite_logits_in_a_served_request_are_an_output_not_an_exception(engine_factory):
    engine, hf = engine_factory("hd64")
    _poison_rows_of(engine, 1, float("nan"))
    bad = engine.add_request(prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(n=3, max_tokens=5))
    good = engine.add_request(prompt_token_ids=[9, 2, 3], sampling_params=GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished[bad].error is not None and [c.finish_reason for c in finished[bad].outputs] == ["error"] * 3
    assert finished[good].error is None and finished[good].outputs[0].token_ids == hf_greedy(hf, [9, 2, 3], 6)


def test_torch_decode_attention_keeps_a_live_rows_nan_and_zeroes_padding_rows():
    """A fault must reach the logits (where the sampler detects it), never be turned into zeros on the way."""
    from fastcodegen.models.torch_ops import decode_attention

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(4, 16, 2, 8, generator=g), torch.randn(4, 16, 2, 8, generator=g)
    q = torch.randn(3, 2, 8, generator=g)
    q[0, 1, 3] = float("nan")
    tables = torch.tensor([[0, 1], [2, 0], [3, 0]], dtype=torch.int32)
    out = decode_attention(q, k, v, tables, torch.tensor([20, 5, 0], dtype=torch.int32), 20)
    assert out[0, 1].isnan().all() and out[0, 0].isfinite().all()
    assert out[1].isfinite().all() and torch.equal(out[2], torch.zeros_like(out[2]))


def test_nan_weights_fail_every_request_with_a_clear_error(engine_factory):
    engine, _ = engine_factory("hd64")
    with torch.no_grad():
        engine._runner.model.weights.layers[0].w_in[5, 0] = float("nan")
    with pytest.raises(GenerationError, match="2 of 2 prompts failed") as e:
        engine.generate(prompt_token_ids=[[1, 2], [3, 4, 5]], sampling_params=GREEDY)
    assert all(o.outputs[0].token_ids == [] for o in e.value.outputs)
    engine._scheduler.check()
    assert engine.num_free_kv_blocks == engine.kv_cache_tokens // 16


def test_streaming_raises_after_the_last_output(engine_factory):
    engine, _ = engine_factory("hd64")
    _poison_rows_of(engine, 1, float("nan"), after_steps=1)
    seen = []
    with pytest.raises(GenerationError):
        for out in engine.generate(prompt_token_ids=[[1, 2], [3, 4]], sampling_params=GREEDY, stream=True):
            seen.append((out.request_id, out.finished, out.error))
    assert any(err is not None for _, _, err in seen) and sum(done for _, done, _ in seen) == 2


# ----------------------------------------------------------------------------- closing


def test_close_frees_the_engine_and_refuses_further_use(engine_factory):
    engine, _ = engine_factory("hd64")
    kv = weakref.ref(engine._runner.kv_cache.data)
    wte = weakref.ref(engine._runner.model.weights.wte)
    engine.add_request(prompt_token_ids=[1, 2, 3])
    engine.close()
    gc.collect()
    assert kv() is None and wte() is None
    assert engine.closed and not engine.has_unfinished_requests()
    for call in (lambda: engine.generate(prompt_token_ids=[[1]]), engine.step, lambda: engine.add_request("x")):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    engine.close()  # again: nothing to do


def test_context_manager_closes(checkpoint):
    path, _ = checkpoint("hd64")
    with Engine(str(path), device="cpu", progress=False) as engine:
        kv = weakref.ref(engine._runner.kv_cache.data)
        engine.generate(prompt_token_ids=[[1, 2]], sampling_params=SamplingParams(max_tokens=2))
    gc.collect()
    assert engine.closed and kv() is None


def test_dropped_engine_frees_its_memory_without_the_cycle_collector(checkpoint):
    """No reference cycle keeps a dropped engine's tensors alive until a garbage collection."""
    path, _ = checkpoint("hd64")
    engine = Engine(str(path), device="cpu", progress=False)
    engine.generate(prompt_token_ids=[[1, 2]], sampling_params=SamplingParams(max_tokens=2))
    kv = weakref.ref(engine._runner.kv_cache.data)
    gc.disable()
    try:
        del engine
        assert kv() is None
    finally:
        gc.enable()


# ----------------------------------------------------------------------------- sizing the KV cache

GiB = 2**30


def _cuda_config(**kw) -> EngineConfig:
    kw.setdefault("backend", "triton")
    return EngineConfig(model="m", device=torch.device("cuda", 0), dtype=torch.float16, **kw)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A 100 GiB device whose memory state the test sets: free, PyTorch's reserved and allocated bytes."""
    state = {"free": 0, "reserved": 0, "allocated": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    return state


def test_kv_budget_is_this_engines_share(fake_gpu):
    model = ModelConfig(n_layer=20, n_embd=1024, n_head=16, rotary_dim=32)  # 350M
    engine = _cuda_config(gpu_memory_utilization=0.9)
    block = 16 * 2 * 20 * 1024 * 2
    weights = 1 * GiB
    working = activation_bytes(model, engine)
    # An empty device: 90 GiB less the weights and the working memory.
    fake_gpu.update(free=99 * GiB, reserved=1 * GiB, allocated=1 * GiB)
    assert num_kv_blocks(model, engine, weights) == (90 * GiB - weights - working) // block
    # PyTorch holds 40 GiB cached that no tensor uses (a closed engine's, say): still this engine's to take.
    fake_gpu.update(free=59 * GiB, reserved=41 * GiB, allocated=1 * GiB)
    assert num_kv_blocks(model, engine, weights) == (90 * GiB - weights - working) // block
    # Another live engine holds 60 GiB: this one gets what is really free, not 90% less everything used.
    fake_gpu.update(free=39 * GiB, reserved=61 * GiB, allocated=61 * GiB)
    assert num_kv_blocks(model, engine, weights) == (39 * GiB - working) // block
    # Too little left: a clear error that says what to change.
    fake_gpu.update(free=working + block, reserved=99 * GiB, allocated=99 * GiB)
    with pytest.raises(RuntimeError, match="kv_cache_tokens"):
        num_kv_blocks(model, engine, weights)


def test_working_memory_counts_the_sampler_and_the_graph_pool():
    model = ModelConfig(n_layer=20, n_embd=1024, n_head=16, rotary_dim=32)
    graphs = activation_bytes(model, _cuda_config(max_num_seqs=256))
    eager = activation_bytes(model, _cuda_config(max_num_seqs=256, enforce_eager=True))
    # The sampler works on [2 * max_num_seqs, vocab] logits: several float32 copies of 512 x 51200.
    assert eager >= 512 * 51200 * 4 * 10
    assert graphs > eager  # the graphs' private pool comes on top


def test_working_memory_counts_the_verify_graphs_and_the_drafts(fake_gpu):
    """Verify graphs add an output buffer of k + 1 logits rows per speculating sequence; a draft model's decode
    graphs are charged to the KV budget beside the target's working memory."""
    model = ModelConfig(n_layer=20, n_embd=1024, n_head=16, rotary_dim=32)
    draft = ModelConfig(n_layer=2, n_embd=256, n_head=4, rotary_dim=32)
    plain = _cuda_config(max_num_seqs=64)
    spec = _cuda_config(max_num_seqs=64, speculative_model="[ngram]", num_speculative_tokens=4)
    verify_rows = 32 * 5  # speculative_max_rows sequences, k + 1 tokens each
    assert graph_bytes(model, spec) - graph_bytes(model, plain) >= verify_rows * model.vocab_size * 4
    assert graph_bytes(model, _cuda_config(max_num_seqs=64, enforce_eager=True)) == 0
    weights = 1 * GiB
    fake_gpu.update(free=99 * GiB, reserved=1 * GiB, allocated=1 * GiB)
    block = 16 * 2 * (20 * 1024 + 2 * 256) * 2
    working = activation_bytes(model, spec) + graph_bytes(draft, spec, verify=False)
    assert graph_bytes(draft, spec, verify=False) > 0
    assert num_kv_blocks(model, spec, weights, draft) == (90 * GiB - weights - working) // block


def test_triton_refuses_float32_on_cuda():
    from fastcodegen.config import resolve_backend as _resolve_backend

    cuda = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="backend='torch'"):
        _resolve_backend("triton", cuda, torch.float32)
    assert _resolve_backend("auto", cuda, torch.float32) == "torch"
    assert _resolve_backend("triton", cuda, torch.bfloat16) == "triton"


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engines_share_the_device_and_give_memory_back(checkpoint):
    """Default sizing twice in a row (the first engine closed), an explicitly sized engine beside a live
    one, and a dropped engine with CUDA graphs freed by reference counting alone."""
    path, hf = checkpoint("hd64")
    kw = dict(device="cuda", dtype="float16", backend="triton", max_num_seqs=8, progress=False)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    first = Engine(str(path), **kw)
    assert first._runner.graphs is not None
    tokens = first.kv_cache_tokens
    free, total = torch.cuda.mem_get_info()
    assert tokens * first.model_config.kv_bytes_per_token(torch.float16) > 0.5 * total  # most of the device
    first.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=GREEDY)
    first.close()
    assert torch.cuda.memory_allocated() - base < 2**20
    second = Engine(str(path), **kw)  # PyTorch's cached memory and the closed engine's count as free
    assert abs(second.kv_cache_tokens - tokens) <= 64 * 16
    beside = Engine(str(path), kv_cache_tokens=4096, **kw)  # a live engine leaves room for a sized one
    for e in (second, beside):
        out = e.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=GREEDY)
        assert len(out[0].outputs[0].token_ids) == 6
    second.close()
    kv = weakref.ref(beside._runner.kv_cache.data)
    gc.disable()
    try:
        del beside  # graphs captured: no cycle may keep the memory until a collection
        assert kv() is None
    finally:
        gc.enable()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - base < 2**20
