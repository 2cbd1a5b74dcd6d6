"""Triton kernels of fastcodegen, installed as `fastcodegen.kernels`.

One file per kernel, each with its `@triton.jit` kernel and its host
wrapper, which takes the arguments of the plain PyTorch function it
replaces in `fastcodegen.models.torch_ops` (the "torch" backend, and the
reference the kernel tests compare against) plus its launch options:

    layer_norm.py         ln_1(x), once per step, for the input projection
    in_proj.py            ln(x) @ [q|k|v|fc_in]^T + rotary + paged K/V store + gelu_new, split-K for decode
    prefill_attention.py  paged flash attention over ragged prompts (cached prefixes included)
    decode_attention.py   split-K paged attention for one new token per sequence, graph-safe grid
    verify_attention.py   the same split-K for up to 16 new tokens per sequence (speculative verify steps)
    out_proj.py           [attn | gelu_h] @ [out_proj | fc_out]^T + bias + residual, split-K for decode

and what they share:

    settings.py           launch plans: tiles, splits sized to fill the SMs in whole waves, dot precision, SM count
    split_k.py            split-K partial sums reduced in the same launch by each tile's last program
    tma.py                TMA descriptors for the prefill GEMMs' operand tiles

The kernels read the runtime's weight layout (`fastcodegen.weights.InProjLayout`)
and nothing else of it. `fastcodegen/models/ops.py` builds the "triton" backend's
table of them; the embedding gather, the final LayerNorm and lm_head stay library
calls there (it says why).
"""
