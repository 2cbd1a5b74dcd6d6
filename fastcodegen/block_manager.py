"""Which KV cache blocks each sequence holds.

The free list and reference counts live in the native allocator
(`fastcodegen._C.BlockAllocator`); this class maps sequences' token counts to
blocks. A sequence of `t` tokens whose KV is (or is about to be) in the cache
holds ceil(t / block_size) blocks; token `p` lives in slot
`block_table[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

from . import _C
from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._allocator = _C.BlockAllocator(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self._allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _missing(self, seq: Sequence) -> int:
        return self.blocks_for(seq.num_tokens) - len(seq.block_table)

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether blocks for all of `seq`'s tokens are free."""
        return self._missing(seq) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Gives `seq` blocks for all of its tokens."""
        missing = self._missing(seq)
        if missing > 0:
            seq.block_table.extend(self._allocator.allocate_many(missing))

    # Decoding writes one token past what a sequence holds: the same check.
    can_append = can_allocate
    append = allocate

    def free(self, seq: Sequence) -> None:
        self._allocator.release(seq.block_table)
        seq.block_table = []

    def refcount(self, block: int) -> int:
        return self._allocator.refcount(block)
