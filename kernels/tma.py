"""TMA (Hopper's tensor memory accelerator) for the prefill GEMMs' operand tiles.

A prefill GEMM is matmul-bound: its tiles should reach shared memory without
the threads computing addresses or masks. A host-side tensor descriptor
hands the whole tile copy to the TMA unit (`cp.async.bulk.tensor` on sm_90);
rows and columns past the tensor's edge arrive as zeros, which is the
masking the cp.async path does by hand. Decode GEMMs keep cp.async: their
16-64-row tiles stream the weight, where TMA gains nothing.

TMA's rules: a 2-D tensor with contiguous rows, its base address and row
stride multiples of 16 bytes. `usable` checks them; a launch whose operands
break one takes the cp.async path.
"""

from __future__ import annotations

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from .settings import GemmPlan


def usable(plan: GemmPlan, m: int, *operands: torch.Tensor) -> bool:
    """Whether a launch of `plan` over m rows loads its operands through TMA: prefill plans on TMA-addressable tensors."""
    if m <= 64 or plan.block_m < 64:
        return False
    for t in operands:
        elem = t.element_size()
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * elem) % 16 or t.data_ptr() % 16:
            return False
    return True


def descriptor(t: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
    """A descriptor of the 2-D tensor t loading [rows, cols] tiles."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, cols])
