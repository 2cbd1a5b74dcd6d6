"""Split-K reduced inside the launch: the last program of a tile to finish sums the partials.

A decode projection has too few output tiles to occupy every SM while it
streams the weight, so each tile's K is cut into SPLIT_K slices, one program
each. Every program stores its float32 partial tile to a scratch buffer and
increments the tile's arrival counter; the program that arrives last adds
the SPLIT_K partials in split order (the same sum whichever program is last:
deterministic, no float atomics), runs the kernel's epilogue and resets the
counter to zero, ready for the next launch or CUDA-graph replay. No second
kernel, no pass over the output.

Ordering: the barrier makes every thread's partial stores happen before the
one acquire-release atomic of the program; the last program's atomic
acquires them all, and it reads the partials through L2 (`.cg`), never
from a stale L1 line.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .settings import GemmPlan


@triton.jit
def reduce_split_k(
    acc,  # [BLOCK_M, BLOCK_N] float32, this program's partial sum
    PARTIAL,  # [tiles, SPLIT_K, BLOCK_M, BLOCK_N] float32 scratch
    COUNTERS,  # [tiles] int32, zero between launches
    tile, split, mask,  # this program's tile index and K slice; the valid elements of the tile
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """(the full sum, whether this program is the tile's last): only the last one's sum is complete."""
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    base = PARTIAL + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
    tl.store(base + split * (BLOCK_M * BLOCK_N) + offs, acc, mask=mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(COUNTERS + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if last:
        for s in range(SPLIT_K):
            total += tl.load(base + s * (BLOCK_M * BLOCK_N) + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(COUNTERS + tile, 0, sem="relaxed", scope="gpu")
    return total, last


def scratch(
    tiles: int, plan: GemmPlan, device: torch.device, counters: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials, counters) of a launch with `tiles` output tiles planned as `plan`.

    `counters`, when given, is a zeroed int32 buffer kept between launches
    (each launch leaves it zeroed); otherwise one is made for this launch.
    Without a split the kernel touches neither: a one-element stand-in.
    """
    if plan.split_k == 1:
        stand_in = torch.empty(1, device=device, dtype=torch.int32) if counters is None else counters
        return stand_in, stand_in
    if counters is None:
        counters = torch.zeros(tiles, device=device, dtype=torch.int32)
    if counters.dtype != torch.int32 or counters.numel() < tiles:
        raise ValueError(f"split-K counters: need {tiles} int32 elements, got {counters.numel()} {counters.dtype}")
    partial = torch.empty((tiles, plan.split_k, plan.block_m, plan.block_n), device=device, dtype=torch.float32)
    return partial, counters
