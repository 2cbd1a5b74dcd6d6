"""The fused parallel-residual output GEMM against its PyTorch reference, with and without split-K."""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_DEVICE, KERNEL_DTYPES, KERNEL_TOL, poisoned_allocations, was_poisoned
from fastcodegen.kernels.out_proj import out_proj
from fastcodegen.models.torch_ops import out_proj as out_proj_reference

# (d, f): 350M-like proportions (f = 4d) at odd sizes, one not a multiple of the tiles.
SIZES = [(96, 384), (80, 320), (200, 72)]


@pytest.mark.parametrize("split_k", [None, 1, 3, 8])
@pytest.mark.parametrize("rows", [1, 7, 70])
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_out_proj_matches_reference(size, rows, split_k, dtype, fresh_seed, monkeypatch):
    d, f = size
    g = torch.Generator().manual_seed(fresh_seed)
    dev = KERNEL_DEVICE

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    a, gelu_h, residual = rand(rows, d), rand(rows, f), rand(rows, d)
    w_out, b_out = rand(d, d + f, scale=(d + f) ** -0.5), rand(d, scale=0.1)
    with poisoned_allocations(monkeypatch) as made:  # the output and split-K's partial sums start as NaN
        got = out_proj(a, gelu_h, w_out, b_out, residual, split_k=split_k)
    assert was_poisoned(got, made)
    torch.testing.assert_close(got, out_proj_reference(a, gelu_h, w_out, b_out, residual), **KERNEL_TOL[dtype])


def test_split_k_is_deterministic(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    dev = KERNEL_DEVICE
    a, h, r = (torch.randn(3, n, generator=g).to(dev) for n in (64, 256, 64))
    w, b = torch.randn(64, 320, generator=g).to(dev), torch.randn(64, generator=g).to(dev)
    runs = [out_proj(a, h, w, b, r, split_k=4) for _ in range(3)]
    assert all(torch.equal(runs[0], x) for x in runs[1:])


def test_split_k_counters_are_left_zero_for_the_next_launch(fresh_seed):
    """Persistent counters (as a captured CUDA graph replays them): each launch finds them zeroed."""
    g = torch.Generator().manual_seed(fresh_seed)
    dev = KERNEL_DEVICE
    a, h, r = (torch.randn(5, n, generator=g).to(dev) for n in (96, 384, 96))
    w, b = (torch.randn(96, 480, generator=g) * 480**-0.5).to(dev), torch.randn(96, generator=g).to(dev)
    counters = torch.zeros(16, device=dev, dtype=torch.int32)
    expect = out_proj_reference(a, h, w, b, r)
    for _ in range(2):
        torch.testing.assert_close(out_proj(a, h, w, b, r, split_k=3, counters=counters), expect, **KERNEL_TOL[a.dtype])
        assert not counters.any()
