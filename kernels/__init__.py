"""Triton kernels of fastcodegen, installed as `fastcodegen.kernels`.

One file per kernel, each with its `@triton.jit` kernel, its host wrapper
and (imported from `fastcodegen.models.torch_ops`, where the "torch" backend
runs it) the plain PyTorch reference of the same function:

    in_proj.py            LayerNorm + [q|k|v|fc_in] GEMM + rotary + paged K/V store + gelu_new
    prefill_attention.py  paged flash attention over ragged prompts (cached prefixes included)
    decode_attention.py   split-K paged attention for one new token per sequence, graph-safe grid
    out_proj.py           [attn | gelu_h] @ [out_proj | fc_out]^T + bias + residual, split-K for decode

The embedding gather, the final LayerNorm and lm_head stay library calls
(`fastcodegen/models/triton_ops.py` says why).
"""
