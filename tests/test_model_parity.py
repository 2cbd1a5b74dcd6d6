"""The eager paged-KV model against transformers' CodeGenForCausalLM.

Logits of every prompt position of a ragged batch (prefill) and of several
decode steps, in float32, float16 and bfloat16, at head geometries mirroring
each CodeGen family; greedy generations token for token.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import SHAPES

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


def _prefill_and_decode(engine, prompts: list[list[int]], continuations: list[list[int]]):
    """Runs the engine's model directly: all-position logits of the prefill, then teacher-forced decode logits."""
    requests = engine._make_requests(None, prompts, None)
    seqs = [r.seqs[0] for r in requests]
    runner, blocks = engine._runner, engine._block_manager
    for s in seqs:
        blocks.allocate(s)
    batch = runner.prepare(seqs, is_prefill=True)
    prefill = runner.model.compute_logits(runner.model.forward(batch, runner.kv_cache))
    starts = batch.query_start_loc.tolist()
    prefill_logits = [prefill[a:b] for a, b in zip(starts, starts[1:])]
    decode_logits = []
    for step in range(len(continuations[0])):
        for s, cont in zip(seqs, continuations):
            s.token_ids.append(cont[step])
            blocks.append(s)
        decode_logits.append(runner.execute(seqs, is_prefill=False))
    for s in seqs:
        blocks.free(s)
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
