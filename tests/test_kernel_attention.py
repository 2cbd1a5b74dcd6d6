"""The paged attention kernels (prefill, split-K decode and verify) against the PyTorch reference.

Block tables are shuffled (non-contiguous) and padded; sequences cross block
boundaries, have a cached prefix before their new tokens, or hold a single
token. Cache slots no sequence owns hold a large finite value: a kernel that
read one would be far off (NaN would poison the reference's own masked
product as well). Outputs (and decode's partial results) start as NaN.
"""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_DEVICE, KERNEL_DTYPES, KERNEL_TOL, poisoned_allocations, random_block_tables, was_poisoned
from fastcodegen.kernels.decode_attention import decode_attention
from fastcodegen.kernels.prefill_attention import paged_attention
from fastcodegen.kernels.settings import num_splits
from fastcodegen.kernels.verify_attention import MAX_QUERIES, verify_attention
from fastcodegen.models.torch_ops import paged_attention as paged_attention_reference

HEAD_DIMS = [64, 80, 256]
N_HEAD = 2
BLOCK_SIZE = 16
POISON = 1000.0


def _cache(context_lens, head_dim, dtype, gen):
    """K and V caches with each sequence's tokens random and every other slot POISON."""
    num_blocks = sum(-(-n // BLOCK_SIZE) for n in context_lens) + 3
    tables = random_block_tables(context_lens, BLOCK_SIZE, num_blocks, gen)
    shape = (num_blocks, BLOCK_SIZE, N_HEAD, head_dim)
    k = torch.full(shape, POISON)
    v = torch.full(shape, POISON)
    for b, n in enumerate(context_lens):
        for p in range(n):
            blk, off = tables[b, p // BLOCK_SIZE], p % BLOCK_SIZE
            k[blk, off] = torch.randn(N_HEAD, head_dim, generator=gen)
            v[blk, off] = torch.randn(N_HEAD, head_dim, generator=gen)
    dev = KERNEL_DEVICE
    return k.to(dev, dtype), v.to(dev, dtype), tables.to(dev)


# (query_len, context_len) per sequence: a plain prompt, a prompt after a
# 23-token cached prefix, a one-token prompt, prompts crossing block and
# query-tile boundaries, a chunk of a prompt in the middle of its context,
# a chunk over several query tiles whose later tiles see whole key tiles
# before their diagonal (the unmasked loop).
PREFILL_BATCHES = {
    "mixed": [(5, 5), (17, 40), (1, 1), (33, 33), (16, 16)],
    "long-prefix": [(3, 70), (64, 64)],
    "query-tiles": [(150, 170), (2, 2)],
    "single": [(1, 1)],
}


def test_reference_matches_dense_attention(fresh_seed):
    """The PyTorch reference itself, on a mixed step, against attention written out per sequence in float64.

    Rows with one new token (batched together), longer queries and a row with
    no new token, in the order a mixed prefill + decode step has them.
    """
    g = torch.Generator().manual_seed(fresh_seed)
    seqs = [(1, 9), (4, 4), (0, 12), (1, 33), (3, 20), (1, 1)]  # (query_len, context_len)
    q_lens, ctx = [q for q, _ in seqs], [c for _, c in seqs]
    k_cache, v_cache, tables = _cache(ctx, 64, torch.float32, g)
    q = torch.randn(sum(q_lens), N_HEAD, 64, generator=g)
    starts = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    got = paged_attention_reference(
        q, k_cache, v_cache, tables, torch.tensor(ctx, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
        max(q_lens), max(ctx),
    )  # fmt: skip
    for b, (n, c) in enumerate(seqs):
        slots = [int(tables[b, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in range(c)]
        k = k_cache.view(-1, N_HEAD, 64)[slots].double()  # [c, H, D]
        v = v_cache.view(-1, N_HEAD, 64)[slots].double()
        for i in range(n):
            pos = c - n + i  # the query's position: it sees keys 0..pos
            scores = torch.einsum("hd,khd->hk", q[starts[b] + i].double(), k[: pos + 1]) / 8.0
            expect = torch.einsum("hk,khd->hd", scores.softmax(-1), v[: pos + 1])
            torch.testing.assert_close(got[starts[b] + i].double(), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", list(PREFILL_BATCHES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_prefill_attention_matches_reference(batch, head_dim, dtype, fresh_seed, monkeypatch):
    g = torch.Generator().manual_seed(fresh_seed)
    seqs = PREFILL_BATCHES[batch]
    q_lens = [q for q, _ in seqs]
    ctx = [c for _, c in seqs]
    k_cache, v_cache, tables = _cache(ctx, head_dim, dtype, g)
    dev = KERNEL_DEVICE
    t = sum(q_lens)
    q = torch.randn(t, N_HEAD, head_dim, generator=g).to(dev, dtype)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
    with poisoned_allocations(monkeypatch) as made:
        got = paged_attention(q, k_cache, v_cache, tables, lens, starts, max(q_lens), max(ctx))
    expect = paged_attention_reference(q, k_cache, v_cache, tables, lens, starts, max(q_lens), max(ctx))
    assert was_poisoned(got, made)
    torch.testing.assert_close(got, expect, **KERNEL_TOL[dtype])


@pytest.mark.parametrize("splits", [1, 3, "planned"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_decode_attention_matches_reference(splits, head_dim, dtype, fresh_seed, monkeypatch):
    g = torch.Generator().manual_seed(fresh_seed)
    # Contexts of 1 token, exactly one block, one past it, several blocks and
    # key tiles; the last row is a padding row (context 0), as in a CUDA graph's batch.
    ctx = [1, 16, 17, 150, 0]
    k_cache, v_cache, tables = _cache(ctx, head_dim, dtype, g)
    dev = KERNEL_DEVICE
    b = len(ctx)
    # "planned": the split count the wrapper plans itself for a context limit (settings.num_splits)
    grid = dict(max_model_len=2048) if splits == "planned" else dict(splits=splits)
    q = torch.randn(b, N_HEAD, head_dim, generator=g).to(dev, dtype)
    lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
    with poisoned_allocations(monkeypatch) as made:
        got = decode_attention(q, k_cache, v_cache, tables, lens, max(ctx), **grid)
    assert was_poisoned(got, made)
    real = b - 1
    expect = paged_attention_reference(
        q[:real], k_cache, v_cache, tables[:real], lens[:real],
        torch.arange(real + 1, dtype=torch.int32, device=dev), 1, max(ctx),
    )  # fmt: skip
    torch.testing.assert_close(got[:real], expect, **KERNEL_TOL[dtype])
    assert torch.equal(got[real], torch.zeros_like(got[real]))


# (query_len, context_len) per sequence of a verify step: proposals at the end of contexts that cross blocks
# and key tiles, a sequence with one token (nothing proposed), a short prompt (its context is its query), the
# most queries a sequence may have, one whose last split holds only keys its first queries must not see
# (129 over 3 splits: [128, 129)), and a graph's padding row (no tokens, context 0).
VERIFY_BATCH = [(5, 150), (1, 17), (3, 3), (MAX_QUERIES, 40), (5, 129), (0, 0)]


@pytest.mark.parametrize("splits", [1, 3, "planned"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_verify_attention_matches_reference(splits, head_dim, dtype, fresh_seed, monkeypatch):
    g = torch.Generator().manual_seed(fresh_seed)
    q_lens = [q for q, _ in VERIFY_BATCH]
    ctx = [c for _, c in VERIFY_BATCH]
    k_cache, v_cache, tables = _cache(ctx, head_dim, dtype, g)
    dev = KERNEL_DEVICE
    real = sum(q_lens)
    # Three more tokens that belong to no sequence, as a graph's bucket pads a step's tokens.
    q = torch.randn(real + 3, N_HEAD, head_dim, generator=g).to(dev, dtype)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
    grid = dict(max_model_len=2048) if splits == "planned" else dict(splits=splits)
    with poisoned_allocations(monkeypatch) as made:
        got = verify_attention(q, k_cache, v_cache, tables, lens, starts, max(q_lens), max(ctx), **grid)
    assert was_poisoned(got, made)
    expect = paged_attention_reference(q[:real], k_cache, v_cache, tables, lens, starts, max(q_lens), max(ctx))
    torch.testing.assert_close(got[:real], expect, **KERNEL_TOL[dtype])


def test_verify_attention_refuses_longer_queries():
    q = torch.zeros(MAX_QUERIES + 1, N_HEAD, 64)
    cache = torch.zeros(2, BLOCK_SIZE, N_HEAD, 64)
    starts = torch.tensor([0, MAX_QUERIES + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"at most {MAX_QUERIES} new tokens"):
        verify_attention(q, cache, cache, torch.zeros(1, 2, dtype=torch.int32), starts[1:], starts, MAX_QUERIES + 1, 17)


def test_decode_equals_prefill_of_one_token(fresh_seed):
    """The two kernels agree where both apply: one new token per sequence."""
    g = torch.Generator().manual_seed(fresh_seed)
    ctx = [7, 33, 2]
    k_cache, v_cache, tables = _cache(ctx, 80, torch.float32, g)
    dev = KERNEL_DEVICE
    q = torch.randn(3, N_HEAD, 80, generator=g).to(dev)
    lens = torch.tensor(ctx, dtype=torch.int32, device=dev)
    a = decode_attention(q, k_cache, v_cache, tables, lens, max(ctx), splits=4)
    b = paged_attention(q, k_cache, v_cache, tables, lens, torch.arange(4, dtype=torch.int32, device=dev), 1, max(ctx))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_num_splits_ignores_lengths():
    # A graph captured for a batch size keeps its grid: only batch, heads and the limit matter.
    for head_dim in (64, 80, 256):
        assert num_splits(1, 16, 2048, head_dim) > 1  # a single sequence is spread over the SMs
        assert num_splits(256, 24, 2048, head_dim) == 1  # a large batch fills them already
        assert num_splits(1, 16, 20, head_dim) == 1  # never more splits than tiles of context
