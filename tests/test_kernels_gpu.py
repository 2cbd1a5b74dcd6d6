"""Each kernel compiled on a GPU, in float16 and bfloat16, at the real shapes of 350M, 2B, 6B and 16B.

Run with `pytest -m gpu` on a CUDA machine. Same references and tolerances
as the interpreter tests, at the sizes the engine runs, with every random
draw from the test's fresh seed: a one-token projection that stores its K/V
(batch-1 decode), padding rows (slot -1, context 0) and rows with no new
token beside prompts.
"""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_TOL, random_block_tables
from fastcodegen.registry import MODELS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZES = {
    name.split("-")[1]: MODELS[name]
    for name in ("codegen-350M-mono", "codegen-2B-mono", "codegen-6B-mono", "codegen-16B-mono")
}
DTYPES = [torch.float16, torch.bfloat16]


def _rand(gen, *shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale + shift).to(dtype)


@pytest.mark.parametrize("tokens", [1, 8, 64, 300])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_proj_real_shapes(size, tokens, dtype, fresh_seed):
    from fastcodegen.kernels.in_proj import in_proj
    from fastcodegen.models.torch_ops import in_proj as in_proj_reference
    from fastcodegen.models.torch_ops import rotary_tables
    from fastcodegen.weights import InProjLayout

    c = SIZES[size]
    layout = InProjLayout.of(c)
    g = torch.Generator(device="cuda").manual_seed(fresh_seed)
    d = c.n_embd
    x = _rand(g, tokens, d, dtype=dtype)
    ln_w, ln_b = _rand(g, d, dtype=dtype, scale=0.1, shift=1.0), _rand(g, d, dtype=dtype, scale=0.1)
    w_in, b_in = _rand(g, layout.width, d, dtype=dtype, scale=d**-0.5), _rand(g, layout.width, dtype=dtype, scale=0.1)
    positions = torch.randint(0, c.n_positions, (tokens,), device="cuda", generator=g)
    blocks = -(-tokens // 16) + 2
    slots = torch.randperm(blocks * 16, device="cuda", generator=g)[:tokens]
    # Some tokens store nothing (padding rows); never the first, so the one-token (batch-1 decode)
    # variant's K/V store is checked too.
    slots[2::5] = -1
    assert slots[0] >= 0
    cos, sin = rotary_tables(c.rotary_dim, c.n_positions, torch.device("cuda"))
    caches = [
        torch.full((blocks, 16, c.n_head, c.head_dim), float("nan"), device="cuda", dtype=dtype) for _ in range(4)
    ]
    args = (x, ln_w, ln_b, w_in, b_in, positions, slots, cos, sin)
    q, h = in_proj(*args, caches[0], caches[1], layout, 1e-5)
    q_ref, h_ref = in_proj_reference(*args, caches[2], caches[3], layout, 1e-5)
    torch.testing.assert_close(q, q_ref, **KERNEL_TOL[dtype])
    torch.testing.assert_close(h, h_ref, **KERNEL_TOL[dtype])
    for ours, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(ours.isnan(), ref.isnan())
        torch.testing.assert_close(ours.nan_to_num(), ref.nan_to_num(), **KERNEL_TOL[dtype])


@pytest.mark.parametrize("tokens", [1, 8, 64, 300])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_proj_real_shapes(size, tokens, dtype, fresh_seed):
    from fastcodegen.kernels.out_proj import out_proj
    from fastcodegen.models.torch_ops import out_proj as out_proj_reference

    c = SIZES[size]
    g = torch.Generator(device="cuda").manual_seed(fresh_seed)
    d, f = c.n_embd, c.n_inner
    a, h, r = _rand(g, tokens, d, dtype=dtype), _rand(g, tokens, f, dtype=dtype), _rand(g, tokens, d, dtype=dtype)
    w, b = _rand(g, d, d + f, dtype=dtype, scale=(d + f) ** -0.5), _rand(g, d, dtype=dtype, scale=0.1)
    torch.testing.assert_close(out_proj(a, h, w, b, r), out_proj_reference(a, h, w, b, r), **KERNEL_TOL[dtype])


@pytest.mark.parametrize("size", ["350M", "16B"])
def test_split_k_in_a_cuda_graph_is_exact_and_deterministic(size, fresh_seed):
    """Split-K reduced in the launch, replayed from a graph with persistent counters: each replay equals the
    reference for its new inputs, repeated replays are bitwise equal, and the counters end zeroed."""
    from fastcodegen.kernels.out_proj import out_proj
    from fastcodegen.models.torch_ops import out_proj as out_proj_reference

    c = SIZES[size]
    g = torch.Generator(device="cuda").manual_seed(fresh_seed)
    d, f, dtype = c.n_embd, c.n_inner, torch.float16
    a, h, r = _rand(g, 1, d, dtype=dtype), _rand(g, 1, f, dtype=dtype), _rand(g, 1, d, dtype=dtype)
    w, b = _rand(g, d, d + f, dtype=dtype, scale=(d + f) ** -0.5), _rand(g, d, dtype=dtype, scale=0.1)
    counters = torch.zeros(4096, device="cuda", dtype=torch.int32)
    out_proj(a, h, w, b, r, counters=counters)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = out_proj(a, h, w, b, r, counters=counters)  # allocated in the graph's pool: each replay rewrites it
    for _ in range(3):
        for t in (a, h, r):
            t.copy_(_rand(g, *t.shape, dtype=dtype))
        graph.replay()
        first = out.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
        torch.testing.assert_close(out, out_proj_reference(a, h, w, b, r), **KERNEL_TOL[dtype])
        assert not counters.any()


def _paged(ctx, c, dtype, g, seed):
    blocks = sum(-(-n // 16) for n in ctx) + 2
    tables = random_block_tables(ctx, 16, blocks, torch.Generator().manual_seed(seed)).cuda()
    k = _rand(g, blocks, 16, c.n_head, c.head_dim, dtype=dtype)
    v = _rand(g, blocks, 16, c.n_head, c.head_dim, dtype=dtype)
    return k, v, tables


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_attention_real_shapes(size, dtype, fresh_seed):
    from fastcodegen.kernels.prefill_attention import paged_attention
    from fastcodegen.models.torch_ops import paged_attention as paged_attention_reference

    c = SIZES[size]
    g = torch.Generator(device="cuda").manual_seed(fresh_seed)
    # A prompt, one after a cached 500-token prefix, a single token, and rows with no new token this step
    # (a prompt that got no chunk): first, between, last.
    seqs = [(0, 300), (512, 512), (200, 700), (0, 40), (1, 1), (0, 1000)]
    q_lens, ctx = [q for q, _ in seqs], [n for _, n in seqs]
    k, v, tables = _paged(ctx, c, dtype, g, fresh_seed)
    q = _rand(g, sum(q_lens), c.n_head, c.head_dim, dtype=dtype)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    lens = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    got = paged_attention(q, k, v, tables, lens, starts, max(q_lens), max(ctx))
    ref = paged_attention_reference(q, k, v, tables, lens, starts, max(q_lens), max(ctx))
    torch.testing.assert_close(got, ref, **KERNEL_TOL[dtype])


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_real_shapes(size, batch, dtype, fresh_seed, monkeypatch):
    from conftest import poisoned_allocations, was_poisoned
    from fastcodegen.kernels.decode_attention import decode_attention
    from fastcodegen.kernels.settings import device_sms
    from fastcodegen.models.torch_ops import paged_attention as paged_attention_reference

    c = SIZES[size]
    g = torch.Generator(device="cuda").manual_seed(fresh_seed)
    ctx = torch.randint(1, c.n_positions + 1, (batch,), generator=torch.Generator().manual_seed(fresh_seed)).tolist()
    pad = 3  # padding rows of a CUDA graph's bucket: context 0, must come out as zeros
    k, v, tables = _paged(ctx + [0] * pad, c, dtype, g, fresh_seed)
    q = _rand(g, batch + pad, c.n_head, c.head_dim, dtype=dtype)
    lens = torch.tensor(ctx + [0] * pad, dtype=torch.int32, device="cuda")
    with poisoned_allocations(monkeypatch) as made:  # the output and the splits' partial results start as NaN
        # Split as the engine's launch plans it on this device (settings.num_splits).
        got = decode_attention(
            q, k, v, tables, lens, max(ctx), max_model_len=c.n_positions, num_sms=device_sms(q.device)
        )
    assert was_poisoned(got, made)
    starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    ref = paged_attention_reference(q[:batch], k, v, tables[:batch], lens[:batch], starts, 1, max(ctx))
    torch.testing.assert_close(got[:batch], ref, **KERNEL_TOL[dtype])
    assert torch.equal(got[batch:], torch.zeros_like(got[batch:]))


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_verify_attention_real_shapes(size, batch, dtype, fresh_seed, monkeypatch):
    """Speculative decoding's verify steps: 1 to 16 queries at the end of each context, graph padding after."""
    from conftest import poisoned_allocations, was_poisoned
    from fastcodegen.kernels.settings import device_sms
    from fastcodegen.kernels.verify_attention import MAX_QUERIES, verify_attention
    from fastcodegen.models.torch_ops import paged_attention as paged_attention_reference

    c = SIZES[size]
    g = torch.Generator(device="cuda").manual_seed(fresh_seed)
    host = torch.Generator().manual_seed(fresh_seed)
    q_lens = torch.randint(1, MAX_QUERIES + 1, (batch,), generator=host).tolist()
    ctx = [q + int(torch.randint(0, c.n_positions - q + 1, (), generator=host)) for q in q_lens]
    pad = 3  # padding rows of a verify graph's bucket (no tokens, context 0) and as many padding tokens
    k, v, tables = _paged(ctx + [0] * pad, c, dtype, g, fresh_seed)
    real = sum(q_lens)
    q = _rand(g, real + pad, c.n_head, c.head_dim, dtype=dtype)
    ends = torch.tensor(q_lens).cumsum(0).tolist() + [real] * pad
    starts = torch.tensor([0] + ends, dtype=torch.int32, device="cuda")
    lens = torch.tensor(ctx + [0] * pad, dtype=torch.int32, device="cuda")
    with poisoned_allocations(monkeypatch) as made:
        got = verify_attention(
            q, k, v, tables, lens, starts, max(q_lens), max(ctx), max_model_len=c.n_positions,
            num_sms=device_sms(q.device),
        )  # fmt: skip
    assert was_poisoned(got, made)
    ref = paged_attention_reference(q[:real], k, v, tables, lens, starts, max(q_lens), max(ctx))
    torch.testing.assert_close(got[:real], ref, **KERNEL_TOL[dtype])
