"""The eager paged-KV model against transformers' CodeGenForCausalLM.

Logits of every prompt position of a ragged batch (prefill) and of several
decode steps, in float32, float16 and bfloat16, at head geometries mirroring
each CodeGen family; greedy generations token for token.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import SHAPES, make_step
from fastcodegen.step import StepInputs

# Worst |ours - transformers| over the logits, relative to the largest |logit|.
# float32: both sides compute the same operations and differ only in
# summation order (~1e-6). float16 / bfloat16: the engine fuses GEMMs, adds
# biases and residuals in another order than transformers and keeps q in the
# model dtype (transformers keeps it in float32), so each side rounds at
# different points: a few units of the format's epsilon
# (2^-11 = 4.9e-4 for float16, 2^-8 = 3.9e-3 for bfloat16) accumulated over
# the layers.
LOGIT_RTOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}

PROMPT_LENS = [5, 17, 33]  # crossing 16-token block boundaries
DECODE_STEPS = 3


def _step(
    seqs: list[list[int]], starts: list[int], tables: list[list[int]], block_size: int, is_decode: bool
) -> StepInputs:
    """Row b computes tokens seqs[b][starts[b]:] after the cached ones before; its blocks are tables[b]."""
    ids, pos, slots, qsl = [], [], [], [0]
    for toks, start, table in zip(seqs, starts, tables):
        for p in range(start, len(toks)):
            ids.append(toks[p])
            pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        qsl.append(len(ids))
    width = max(len(t) for t in tables)
    return make_step(
        input_ids=torch.tensor(ids),
        positions=torch.tensor(pos),
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        context_lens=torch.tensor([len(t) for t in seqs], dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        logits_indices=torch.arange(len(ids)),
        max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
        max_context_len=max(len(t) for t in seqs),
        is_decode=is_decode,
    )


def _prefill_and_decode(engine, prompts: list[list[int]], continuations: list[list[int]]):
    """Runs the engine's model directly: all-position logits of a ragged prefill, then teacher-forced decodes.

    Each sequence gets its own blocks, in reverse order so that no table is contiguous.
    """
    runner = engine._runner
    bs = runner.kv_cache.block_size
    total = [len(p) + len(c) for p, c in zip(prompts, continuations)]
    tables, next_block = [], runner.kv_cache.num_blocks - 1
    for n in total:
        need = -(-n // bs)
        tables.append(list(range(next_block, next_block - need, -1)))
        next_block -= need
    model, kv = runner.model, runner.kv_cache
    step = _step(prompts, [0] * len(prompts), tables, bs, is_decode=False)
    prefill = model.compute_logits(model.forward(step, kv))
    starts = step.query_start_loc.tolist()
    prefill_logits = [prefill[a:b] for a, b in zip(starts, starts[1:])]
    decode_logits = []
    seqs = [list(p) for p in prompts]
    for i in range(len(continuations[0])):
        for s, c in zip(seqs, continuations):
            s.append(c[i])
        step = _step(seqs, [len(s) - 1 for s in seqs], tables, bs, is_decode=True)
        decode_logits.append(model.compute_logits(model.forward(step, kv)))
    return prefill_logits, decode_logits


def _hf_logits(model, ids: list[int], dtype) -> torch.Tensor:
    m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        return m(torch.tensor([ids]), use_cache=True).logits[0].float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_transformers(engine_factory, shape, dtype, fresh_seed):
    engine, hf = engine_factory(shape, dtype=dtype)
    g = torch.Generator().manual_seed(fresh_seed)
    vocab = engine.vocab_limit
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
    conts = [torch.randint(0, vocab, (DECODE_STEPS,), generator=g).tolist() for _ in PROMPT_LENS]
    prefill, decode = _prefill_and_decode(engine, prompts, conts)
    worst = 0.0
    for b, (p, c) in enumerate(zip(prompts, conts)):
        ref = _hf_logits(hf, p + c, dtype)
        scale = ref.abs().max().item()
        worst = max(worst, (prefill[b] - ref[: len(p)]).abs().max().item() / scale)
        for step in range(DECODE_STEPS):
            worst = max(worst, (decode[step][b] - ref[len(p) + step]).abs().max().item() / scale)
    print(f"{shape} {dtype}: worst relative logit error {worst:.2e}")
    assert worst <= LOGIT_RTOL[dtype]
