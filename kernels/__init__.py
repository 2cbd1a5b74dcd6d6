"""Triton kernels of fastcodegen, installed as `fastcodegen.kernels`.

One file per kernel: the `@triton.jit` kernel, its host wrapper and a plain
PyTorch reference of the same function.
"""
