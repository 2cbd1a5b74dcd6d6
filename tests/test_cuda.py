"""The engine on CUDA against transformers on CUDA, in float16 and bfloat16 (run with `pytest -m gpu`)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import SHAPES, TOKENIZER_SIZE
from fastcodegen import Engine, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# As in test_model_parity: rounding at different points in fp16 / bf16 GEMMs.
LOGIT_RTOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cuda_generation_matches_transformers(checkpoint, shape, dtype, backend, fresh_seed):
    path, hf = checkpoint(shape)
    engine = Engine(str(path), device="cuda", dtype=dtype, backend=backend, kv_cache_tokens=1024, progress=False)
    model = copy.deepcopy(hf).to("cuda", dtype)
    g = torch.Generator().manual_seed(fresh_seed)
    prompts = [torch.randint(0, TOKENIZER_SIZE, (n,), generator=g).tolist() for n in (5, 17, 40)]
    outs = engine.generate(
        prompt_token_ids=prompts,
        sampling_params=SamplingParams(temperature=0, max_tokens=8, logprobs=0, ignore_eos=True),
    )
    for prompt, out in zip(prompts, outs):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens], device="cuda")).logits[0, len(prompt) - 1 : -1].float()
        logp = logits[:, :TOKENIZER_SIZE].log_softmax(-1)
        # Each engine token is, under transformers, within rounding of the best one.
        for step, token in enumerate(tokens):
            gap = (logp[step].max() - logp[step, token]).item()
            assert gap <= LOGIT_RTOL[dtype] * logits[step].abs().max().item(), (step, gap)
            ours = out.outputs[0].logprobs[step][token]
            assert abs(ours - logp[step, token].item()) <= LOGIT_RTOL[dtype] * logits[step].abs().max().item()
    engine.close()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_dummy_weights_real_shape(backend):
    with Engine(
        "codegen-350M-mono", device="cuda", load_format="dummy", backend=backend, kv_cache_tokens=8192, progress=False
    ) as engine:
        assert engine.model_config.n_layer == 20
        out = engine.generate(
            prompt_token_ids=[list(range(1, 129))], sampling_params=SamplingParams(max_tokens=16, ignore_eos=True)
        )
        assert len(out[0].outputs[0].token_ids) == 16
        text = engine.generate("def fib(n):", SamplingParams(max_tokens=8, ignore_eos=True))[0].outputs[0].text
        assert isinstance(text, str)  # the shipped CodeGen tokenizer, offline
