"""Engine(backend="triton") end to end against transformers.

Without a GPU the kernels run in Triton's interpreter on the CPU: float32
must give transformers' greedy tokens exactly; in float16 each token the
engine picks must be, under transformers, within rounding of the best one.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import INTERPRETED, KERNEL_DEVICE, TOKENIZER_SIZE, hf_greedy
from fastcodegen import Engine, SamplingParams

# On CUDA the triton backend runs float16 and bfloat16 only (float32 is refused there): its float32
# parity runs in the interpreter; test_cuda.py and test_backend_parity.py cover CUDA.
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="float32 Triton runs in the interpreter only")

PROMPTS = [[5, 17, 33, 100, 7], list(range(1, 20)), [42]]
NEW = 6
# As in test_model_parity: rounding at different points in float16 GEMMs.
FP16_RTOL = 1e-2


@interpreter_only
@pytest.mark.parametrize("shape", ["full-rotary", "hd80"])
def test_triton_greedy_float32_matches_transformers(checkpoint, shape):
    path, hf = checkpoint(shape)
    engine = Engine(
        str(path), device=KERNEL_DEVICE, dtype="float32", backend="triton", kv_cache_tokens=512, progress=False
    )
    assert engine.config.backend == "triton"
    outs = engine.generate(
        prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    )
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, NEW)


def test_triton_float16_tokens_within_rounding_of_transformers(checkpoint):
    path, hf = checkpoint("hd64")
    engine = Engine(
        str(path), device=KERNEL_DEVICE, dtype="float16", backend="triton", kv_cache_tokens=512, progress=False
    )
    outs = engine.generate(
        prompt_token_ids=PROMPTS,
        sampling_params=SamplingParams(temperature=0, max_tokens=NEW, logprobs=0, ignore_eos=True),
    )
    model = copy.deepcopy(hf).half()
    for prompt, out in zip(PROMPTS, outs):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
        scale = logits.abs().max().item()
        logp = logits[:, :TOKENIZER_SIZE].log_softmax(-1)
        for step, token in enumerate(tokens):
            assert (logp[step].max() - logp[step, token]).item() <= FP16_RTOL * scale
            assert abs(out.outputs[0].logprobs[step][token] - logp[step, token].item()) <= FP16_RTOL * scale


@interpreter_only
def test_triton_and_torch_backends_agree_when_sampling(checkpoint, fresh_seed):
    """Same seed, same weights: both backends draw the same tokens (float32, logits within rounding)."""
    path, _ = checkpoint("full-rotary")
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=NEW, seed=fresh_seed % 10000, ignore_eos=True)
    runs = [
        Engine(
            str(path), device=KERNEL_DEVICE, dtype="float32", backend=b, kv_cache_tokens=512, progress=False
        ).generate(prompt_token_ids=PROMPTS, sampling_params=params)
        for b in ("torch", "triton")
    ]
    assert [o.outputs[0].token_ids for o in runs[0]] == [o.outputs[0].token_ids for o in runs[1]]


def test_backend_choice():
    from fastcodegen.config import resolve_backend

    assert resolve_backend("torch", torch.device("cpu"), torch.float32) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda-graphs", torch.device("cpu"), torch.float32)
