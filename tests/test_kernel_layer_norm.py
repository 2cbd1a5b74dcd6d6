"""The LayerNorm kernel against F.layer_norm: odd widths, large offsets, rows in strided buffers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import KERNEL_DEVICE, KERNEL_DTYPES, KERNEL_TOL, poisoned_allocations, was_poisoned
from fastcodegen.kernels.layer_norm import MAX_WIDTH, layer_norm


@pytest.mark.parametrize("rows,width", [(1, 80), (5, 320), (3, 1000)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_layer_norm_matches_torch(rows, width, dtype, fresh_seed, monkeypatch):
    g = torch.Generator().manual_seed(fresh_seed)
    dev = KERNEL_DEVICE
    # A large mean beside a small spread: a one-pass E[x^2] - E[x]^2 variance would lose it.
    wide = (torch.randn(rows, width + 7, generator=g) * 0.5 + 30.0).to(dev, dtype)
    x = wide[:, 3 : 3 + width]  # rows in a wider buffer: the row stride is not the width
    w = (torch.randn(width, generator=g) * 0.1 + 1.0).to(dev, dtype)
    b = (torch.randn(width, generator=g) * 0.1).to(dev, dtype)
    with poisoned_allocations(monkeypatch) as made:
        got = layer_norm(x, w, b, 1e-5)
    assert was_poisoned(got, made)
    expect = F.layer_norm(x.float(), (width,), w.float(), b.float(), 1e-5).to(dtype)
    torch.testing.assert_close(got, expect, **KERNEL_TOL[dtype])


def test_layer_norm_refuses_rows_wider_than_the_kernel():
    x = torch.zeros(1, MAX_WIDTH + 1)
    with pytest.raises(ValueError, match="wider"):
        layer_norm(x, torch.ones(MAX_WIDTH + 1), torch.zeros(MAX_WIDTH + 1), 1e-5)
