"""The triton backend against the torch backend on the steps the scheduler really makes.

A step can hold rows with no new token (a prompt that got no chunk because
KV blocks ran out, a decode held back) even when every other row has exactly
one: such a step is not a decode step, whatever its longest query. Here:

* both backends' attention on steps with idle rows before and between rows
  that have one token, against attention computed in this file from the
  unpaged keys and values;
* a fuzz of scheduler steps under block pressure (preemption, chunked
  prefill, idle rows): the engine's outputs against transformers, and the
  Triton attention against the torch backend's on every recorded step;
* on a GPU (`pytest -m gpu`), the real 350M and 2B shapes with dummy weights:
  Triton with CUDA graphs, Triton without, and the torch backend driven in
  lockstep through greedy, n > 1, preemption and prefix hits, step logits
  compared; and the idle-row steps at the real head geometries.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import KERNEL_DEVICE, KERNEL_DTYPES, KERNEL_TOL, TOKENIZER_SIZE, hf_greedy, make_step
from fastcodegen import Engine, SamplingParams
from fastcodegen.config import ModelConfig
from fastcodegen.models.ops import make_ops
from fastcodegen.sampler import SamplingInputs
from fastcodegen.step import StepInputs

BLOCK_SIZE = 16


def _paged_step(q_lens, ctx_lens, config, dtype, device, gen):
    """Random unpaged K/V per sequence, scattered into shuffled cache blocks, and a step's inputs over them."""
    h, hd = config.n_head, config.head_dim
    need = [-(-n // BLOCK_SIZE) for n in ctx_lens]
    num_blocks = sum(need) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    # Slots no sequence owns hold a large value: attention that read one would be far off.
    k_cache = torch.full((num_blocks, BLOCK_SIZE, h, hd), 1e3)
    v_cache = torch.full((num_blocks, BLOCK_SIZE, h, hd), 1e3)
    tables, keys, values, used = [], [], [], 0
    for n, blocks in zip(ctx_lens, need):
        table = order[used : used + blocks]
        used += blocks
        k, v = torch.randn(n, h, hd, generator=gen), torch.randn(n, h, hd, generator=gen)
        for p in range(n):
            k_cache[table[p // BLOCK_SIZE], p % BLOCK_SIZE] = k[p]
            v_cache[table[p // BLOCK_SIZE], p % BLOCK_SIZE] = v[p]
        tables.append(table + [0] * (max(need) - blocks))
        keys.append(k.to(dtype))
        values.append(v.to(dtype))
    q = torch.randn(sum(q_lens), h * hd, generator=gen)
    starts = [0] + np.cumsum(q_lens).tolist()
    step = make_step(
        input_ids=torch.zeros(sum(q_lens), dtype=torch.int64, device=device),
        positions=torch.zeros(sum(q_lens), dtype=torch.int64, device=device),
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        logits_indices=torch.zeros(0, dtype=torch.int64, device=device),
        max_query_len=max(q_lens),
        max_context_len=max(ctx_lens),
        is_decode=min(q_lens) == 1 and max(q_lens) == 1,
    )
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k_cache.to(**to), v_cache.to(**to), step, keys, values


def _attention_by_hand(q, keys, values, q_lens, ctx_lens, n_head):
    """Causal attention of each row's new tokens over its unpaged keys: float32 scores, dtype probabilities."""
    out = []
    at = 0
    for k, v, ql, n in zip(keys, values, q_lens, ctx_lens):
        for i in range(ql):
            pos = n - ql + i
            qi = q[at + i].view(n_head, -1).float()
            scores = torch.einsum("hd,khd->hk", qi, k[: pos + 1].float()) / math.sqrt(qi.shape[-1])
            p = scores.softmax(-1).to(v.dtype).float()
            out.append(torch.einsum("hk,khd->hd", p, v[: pos + 1].float()).reshape(-1))
        at += ql
    return torch.stack(out)


# (query lengths, context lengths) per row: every non-empty row has one new token,
# yet the step is not a decode step.
IDLE_ROW_STEPS = {
    "idle-first": ([0, 1, 1], [5, 17, 33]),
    "idle-between": ([1, 0, 1, 0, 1], [1, 40, 16, 3, 70]),
    "idle-last": ([1, 1, 0], [20, 2, 9]),
}


def _ops(backend: str, config: ModelConfig, device: torch.device):
    return make_ops(config, backend, device, config.n_positions)


@pytest.mark.parametrize("step", list(IDLE_ROW_STEPS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_idle_rows_beside_one_token_rows(step, backend, dtype, fresh_seed):
    config = ModelConfig(n_layer=1, n_embd=320, n_head=4, rotary_dim=64)  # head_dim 80
    q_lens, ctx = IDLE_ROW_STEPS[step]
    q, k_cache, v_cache, inputs, keys, values = _paged_step(
        q_lens, ctx, config, dtype, KERNEL_DEVICE, torch.Generator().manual_seed(fresh_seed)
    )
    assert inputs.max_query_len == 1 and not inputs.is_decode
    got = _ops(backend, config, KERNEL_DEVICE).attention(q, k_cache, v_cache, inputs)
    expect = _attention_by_hand(q.cpu(), keys, values, q_lens, ctx, config.n_head)
    torch.testing.assert_close(got.cpu().float(), expect, **KERNEL_TOL[dtype])


# ----------------------------------------------------------------------------- scheduler fuzz


def _record_attention(engine) -> list[dict]:
    """Wraps the engine's layer-0 attention to record its inputs and output at every step."""
    ops = engine._runner.model.ops
    real = ops.attention
    calls: list[dict] = []
    layer0_cache = engine._runner.kv_cache.layer(0)[0]

    def attention(q, k_cache, v_cache, step):
        out = real(q, k_cache, v_cache, step)
        if k_cache.data_ptr() == layer0_cache.data_ptr():
            calls.append(dict(q=q.clone(), k=k_cache.clone(), v=v_cache.clone(), step=_to(step), out=out.clone()))
        return out

    ops.attention = attention
    return calls


def _to(step: StepInputs, device: torch.device | None = None) -> StepInputs:
    """A copy of the step's inputs (on `device`, if given)."""
    return step.replace(**{k: t.to(device=device, copy=True) for k, t in step.tensors.items()})


def _q_lens(step: StepInputs) -> np.ndarray:
    return np.diff(step.query_start_loc.cpu().numpy())


def test_scheduler_fuzz_under_block_pressure(checkpoint, fresh_seed):
    """Random requests through a KV cache of one full sequence: outputs equal transformers', and the
    Triton attention equals the torch backend's on the steps with idle rows and a sample of the rest."""
    path, hf = checkpoint("full-rotary")
    rng = np.random.default_rng(fresh_seed)
    engine = Engine(
        str(path), device="cpu", dtype="float32", backend="torch", max_model_len=64, block_size=4,
        kv_cache_tokens=64, max_num_seqs=4, max_num_batched_tokens=8, progress=False,
    )  # fmt: skip
    calls = _record_attention(engine)

    def idle_steps() -> list[int]:
        return [i for i, c in enumerate(calls) if c["step"].max_query_len == 1 and (_q_lens(c["step"]) == 0).any()]

    for round in range(12):  # rounds of requests arriving together, until one made a step with an idle row
        if round >= 3 and idle_steps():
            break
        prompts = [rng.integers(1, TOKENIZER_SIZE, int(rng.integers(2, 30))).tolist() for _ in range(8)]
        news = [int(rng.integers(2, 64 - len(p) + 1)) for p in prompts]
        outs = engine.generate(
            prompt_token_ids=prompts,
            sampling_params=[SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in news],
        )
        for p, n, out in zip(prompts, news, outs):
            assert out.outputs[0].token_ids == hf_greedy(hf, p, n)
    assert engine.stats.preemptions > 0
    idle = idle_steps()
    assert idle, "the fuzz made no step with an idle row beside one-token rows"
    assert not any(calls[i]["step"].is_decode for i in idle)

    # The same steps through the Triton kernels (interpreted on the CPU): idle-row steps and a few others.
    others = [i for i in range(len(calls)) if i not in idle]
    picks = rng.choice(idle, size=min(8, len(idle)), replace=False).tolist()
    picks += rng.choice(others, size=min(4, len(others)), replace=False).tolist()
    picks = [calls[i] for i in picks]
    triton_ops = _ops("triton", engine.model_config, torch.device(KERNEL_DEVICE))
    for c in picks:
        to = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
        got = triton_ops.attention(to(c["q"]), to(c["k"]), to(c["v"]), _to(c["step"], KERNEL_DEVICE))
        torch.testing.assert_close(got.cpu(), c["out"], **KERNEL_TOL[torch.float32])


# ----------------------------------------------------------------------------- on a GPU, at the real shapes

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Worst |a - b| of two backends' logits relative to the largest |logit|, as in test_cuda.py.
LOGIT_RTOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _lockstep(engines: list[Engine], first: list, then: list, after_steps: int) -> dict:
    """Runs the engines step by step on the same requests, every engine appending the first engine's tokens.

    `first` requests ((prompt, params) pairs) start at once, `then` ones after
    `after_steps` steps. Every step must be scheduled alike in every engine.
    Returns the worst difference of each engine's step logits to the first
    engine's, relative to the largest |logit|, and what the steps held.
    """
    lead = engines[0]
    worst = [0.0] * len(engines)
    seen = {"steps": 0, "idle_rows": 0, "decode": 0, "copies": 0}
    for prompt, params in first:
        for e in engines:
            e.add_request(prompt_token_ids=prompt, sampling_params=params)
    while lead._scheduler.has_unfinished():
        if seen["steps"] == after_steps:
            for prompt, params in then:
                for e in engines:
                    e.add_request(prompt_token_ids=prompt, sampling_params=params)
        steps = [e._scheduler.schedule() for e in engines]
        first_step = steps[0]
        for s in steps[1:]:
            assert (s.num_rows, s.num_tokens, s.num_samples) == (
                first_step.num_rows, first_step.num_tokens, first_step.num_samples,
            )  # fmt: skip
            assert torch.equal(s.input_ids, first_step.input_ids)
        seen["steps"] += 1
        seen["idle_rows"] += int((_q_lens(first_step) == 0).sum())
        seen["decode"] += int(first_step.is_decode)
        seen["copies"] += first_step.num_copies
        logits = [e._runner.execute(s) for e, s in zip(engines, steps)]
        if logits[0].numel():  # a step in the middle of prompts samples nothing
            scale = logits[0].abs().max().item()
            for i, lg in enumerate(logits):
                worst[i] = max(worst[i], (lg.float() - logits[0].float()).abs().max().item() / scale)
        runner = lead._runner
        inputs = SamplingInputs.of(first_step, runner._on_device(first_step), lead._outputs.requests, runner.device)
        sampled = runner.sampler(logits[0], inputs)
        for e, s in zip(engines, steps):
            e._outputs.process(s, sampled, e._scheduler.update(sampled.tokens, sampled.finite))
    for e in engines:
        e._scheduler.check()
    return {"worst": worst, **seen}


@pytest.mark.parametrize("model", ["codegen-350M-mono", "codegen-2B-mono"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("_", [pytest.param(None, marks=gpu)], ids=["cuda"])
def test_cuda_triton_graphs_eager_and_torch_agree(model, dtype, _, fresh_seed):
    """Dummy weights at the real shapes; a small KV cache and token budget force preemption, chunked
    prefill and idle rows; n = 3 forks share a prompt; late prompts hit the prefix cache."""
    common = dict(
        load_format="dummy", device="cuda", dtype=dtype, seed=fresh_seed % 2**31, progress=False,
        max_num_seqs=16, max_num_batched_tokens=256, kv_cache_tokens=2048,
    )  # fmt: skip
    engines = [
        Engine(model, backend="triton", **common),
        Engine(model, backend="triton", enforce_eager=True, **common),
        Engine(model, backend="torch", **common),
    ]
    try:
        assert engines[0]._runner.graphs is not None and engines[1]._runner.graphs is None
        rng = np.random.default_rng(fresh_seed)
        greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
        shared = rng.integers(0, 50000, 601).tolist()  # computed in the first 3 steps (256 tokens a step)
        late = [(shared[:600] + rng.integers(0, 50000, 9).tolist(), greedy) for _ in range(2)]
        others = [(rng.integers(0, 50000, int(n)).tolist(), greedy) for n in (1, 40, 700, 150, 5, 1200)]
        others.append((rng.integers(0, 50000, 30).tolist(), SamplingParams(n=3, temperature=0.8, max_tokens=40)))
        # Over 4,000 tokens in flight for a cache of 2,048: preemption; the late prompts reuse the
        # first one's 37 full blocks while it still runs.
        seen = _lockstep(engines, [(shared, greedy)], late + others, after_steps=3)
        print(seen)
        assert seen["worst"][1] <= LOGIT_RTOL[dtype], "CUDA graphs against eager Triton"
        assert seen["worst"][2] <= LOGIT_RTOL[dtype], "Triton against the torch backend"
        assert seen["decode"] > 0 and seen["copies"] > 0
        for e in engines:
            assert e.stats.preemptions > 0 and e.stats.prefix_hit_tokens >= 2 * 592
    finally:
        for e in engines:
            e.close()


REAL_GEOMETRY = {"350M": (16, 64), "2B": (32, 80), "6B": (16, 256)}


@pytest.mark.parametrize("size", list(REAL_GEOMETRY))
@pytest.mark.parametrize("step", list(IDLE_ROW_STEPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("_", [pytest.param(None, marks=gpu)], ids=["cuda"])
def test_cuda_idle_rows_at_real_geometry(size, step, dtype, _, fresh_seed):
    n_head, head_dim = REAL_GEOMETRY[size]
    config = ModelConfig(n_layer=1, n_embd=n_head * head_dim, n_head=n_head, rotary_dim=64 if head_dim > 64 else 32)
    q_lens, ctx = IDLE_ROW_STEPS[step]
    ctx = [c * 20 for c in ctx]  # contexts of hundreds of tokens
    device = torch.device("cuda")
    q, k_cache, v_cache, inputs, keys, values = _paged_step(
        q_lens, ctx, config, dtype, device, torch.Generator().manual_seed(fresh_seed)
    )
    got = _ops("triton", config, device).attention(q, k_cache, v_cache, inputs)
    expect = _attention_by_hand(q.cpu(), keys, values, q_lens, ctx, config.n_head)
    torch.testing.assert_close(got.cpu().float(), expect, **KERNEL_TOL[dtype])
