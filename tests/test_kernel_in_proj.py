"""The fused input projection kernel against its PyTorch reference.

Odd geometries (head_dim 80 with 16 pass-through dims, rotary over the whole
head, head_dim 256), row counts on both sides of the kernel's tile sizes,
positions anywhere in the context, cache slots shuffled with -1 padding.
Outputs (poisoned allocations) and caches start as NaN: an element the
kernel should write and does not stays NaN and fails; a slot it must not
write stays NaN too.
"""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_DEVICE, KERNEL_DTYPES, KERNEL_TOL, poisoned_allocations, was_poisoned
from fastcodegen.kernels.in_proj import in_proj
from fastcodegen.models.torch_ops import in_proj as in_proj_reference
from fastcodegen.models.torch_ops import rotary_tables
from fastcodegen.weights import InProjLayout

GEOMETRIES = {
    # (n_head, head_dim, rotary_dim)
    "hd80-rot64": (2, 80, 64),
    "hd32-full-rotary": (4, 32, 32),
    "hd64-rot32": (2, 64, 32),
    "hd256-rot64": (1, 256, 64),
}
MAX_POS = 96
BLOCK_SIZE = 4


@pytest.mark.parametrize("tokens", [1, 5, 37, 70])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_in_proj_matches_reference(geometry, tokens, dtype, fresh_seed, monkeypatch):
    check_in_proj(geometry, tokens, dtype, fresh_seed, monkeypatch)


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("tokens", [1, 70])  # one row tile, and prefill's tiles over several
@pytest.mark.parametrize("geometry", ["hd80-rot64", "hd256-rot64"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_in_proj_split_k_matches_reference(geometry, tokens, split_k, dtype, fresh_seed, monkeypatch):
    """K cut into slices reduced in the launch (rotary tiles' pairs and plain tiles); counters left zero."""
    counters = torch.zeros(64, device=KERNEL_DEVICE, dtype=torch.int32)
    for _ in range(2):  # the second launch finds the counters the first one reset
        check_in_proj(geometry, tokens, dtype, fresh_seed, monkeypatch, split_k=split_k, counters=counters)
        assert not counters.any()


def check_in_proj(geometry, tokens, dtype, fresh_seed, monkeypatch, **kernel_options):
    n_head, head_dim, rotary_dim = GEOMETRIES[geometry]
    d = n_head * head_dim
    layout = InProjLayout(n_head, head_dim, rotary_dim, d, 4 * d)
    dev = KERNEL_DEVICE
    g = torch.Generator().manual_seed(fresh_seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dev, dtype)

    x = rand(tokens, d)
    ln_w, ln_b = rand(d, scale=0.1, shift=1.0), rand(d, scale=0.1)
    w_in, b_in = rand(layout.width, d, scale=d**-0.5), rand(layout.width, scale=0.1)
    positions = torch.randint(0, MAX_POS, (tokens,), generator=g).to(dev)
    num_blocks = -(-tokens // BLOCK_SIZE) + 3
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g)[:tokens]
    slots[torch.rand(tokens, generator=g) < 0.2] = -1  # padding rows store nothing
    slots = slots.to(dev)
    cos, sin = rotary_tables(rotary_dim, MAX_POS, dev)
    nan = float("nan")
    k_cache = torch.full((num_blocks, BLOCK_SIZE, n_head, head_dim), nan, device=dev, dtype=dtype)
    v_cache = k_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    args = (x, ln_w, ln_b, w_in, b_in, positions, slots, cos, sin)
    with poisoned_allocations(monkeypatch) as made:  # q, gelu, ln_1(x) and split-K's partial sums start as NaN
        q, gelu = in_proj(*args, k_cache, v_cache, layout, 1e-5, **kernel_options)
    q_expect, gelu_expect = in_proj_reference(*args, k_ref, v_ref, layout, 1e-5)

    assert was_poisoned(q, made) and was_poisoned(gelu, made)
    torch.testing.assert_close(q, q_expect, **KERNEL_TOL[dtype])
    torch.testing.assert_close(gelu, gelu_expect, **KERNEL_TOL[dtype])
    # Written exactly where the reference writes (slot -1 and unused slots stay NaN), with its values.
    assert torch.equal(k_cache.isnan(), k_ref.isnan()) and torch.equal(v_cache.isnan(), v_ref.isnan())
    written = (slots >= 0).sum().item()
    assert (~k_ref.isnan()).sum().item() == written * n_head * head_dim
    torch.testing.assert_close(k_cache.nan_to_num(), k_ref.nan_to_num(), **KERNEL_TOL[dtype])
    torch.testing.assert_close(v_cache.nan_to_num(), v_ref.nan_to_num(), **KERNEL_TOL[dtype])


def test_rotary_pairs_are_rotated_by_position(fresh_seed):
    """Independent of the reference: a token's q.k score with itself does not depend on its position."""
    n_head, head_dim, rotary_dim = 2, 80, 64
    d = n_head * head_dim
    layout = InProjLayout(n_head, head_dim, rotary_dim, d, 4 * d)
    g = torch.Generator().manual_seed(fresh_seed)
    dev = KERNEL_DEVICE
    x = torch.randn(1, d, generator=g).repeat(2, 1).to(dev)
    w_in = (torch.randn(layout.width, d, generator=g) * d**-0.5).to(dev)
    ones, zeros = torch.ones(d, device=dev), torch.zeros(d, device=dev)
    cos, sin = rotary_tables(rotary_dim, MAX_POS, dev)
    k_cache = torch.zeros(1, 2, n_head, head_dim, device=dev)
    v_cache = k_cache.clone()
    positions = torch.tensor([3, 60], device=dev)
    q, _ = in_proj(x, ones, zeros, w_in, torch.zeros(layout.width, device=dev), positions,
                   torch.tensor([0, 1], device=dev), cos, sin, k_cache, v_cache, layout, 1e-5)  # fmt: skip
    q = q.view(2, n_head, head_dim)
    k = k_cache.view(2, n_head, head_dim)
    # The same vector at two positions: rotated differently, same norm, same self-score.
    assert not torch.allclose(q[0], q[1], atol=1e-3)
    torch.testing.assert_close((q[0] * k[0]).sum(-1), (q[1] * k[1]).sum(-1), atol=1e-4, rtol=1e-4)
    # Pass-through dims are not rotated.
    torch.testing.assert_close(q[0, :, rotary_dim:], q[1, :, rotary_dim:])
