"""The native KV cache block pool's reference counting (`fastcodegen._C.BlockPool`) without its prefix cache.

Explicit checks of the documented contract (fresh order 0, 1, 2, ...,
all-or-nothing allocation, errors that change nothing), a hypothesis state
machine running random allocate / allocate_many / incref / decref / release
sequences against a plain Python model of the reference counts and of the
free stack.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fastcodegen._C import BlockPool as BlockAllocator


def _state(a: BlockAllocator) -> tuple[int, list[int]]:
    return a.num_free, [a.refcount(b) for b in range(a.num_blocks)]


# ----------------------------------------------------------------------------- explicit contract


def test_fresh_allocator_hands_out_in_order():
    a = BlockAllocator(6)
    assert a.num_blocks == 6 and a.num_free == 6
    assert [a.refcount(b) for b in range(6)] == [0] * 6
    assert [a.allocate() for _ in range(3)] == [0, 1, 2]
    assert a.allocate_many(3) == [3, 4, 5]
    assert a.num_free == 0
    assert [a.refcount(b) for b in range(6)] == [1] * 6


def test_allocate_many_is_all_or_nothing():
    a = BlockAllocator(5)
    a.allocate_many(2)
    before = _state(a)
    with pytest.raises(RuntimeError):
        a.allocate_many(4)
    assert _state(a) == before
    assert a.allocate_many(0) == []
    assert _state(a) == before
    with pytest.raises(ValueError):
        a.allocate_many(-1)
    assert _state(a) == before
    assert a.allocate_many(3) == [2, 3, 4]
    assert a.num_free == 0


def test_empty_allocator_raises():
    a = BlockAllocator(2)
    a.allocate_many(2)
    before = _state(a)
    with pytest.raises(RuntimeError):
        a.allocate()
    with pytest.raises(RuntimeError):
        a.allocate_many(1)
    assert _state(a) == before


@pytest.mark.parametrize("op", ["incref", "decref"])
def test_bad_block_raises_and_changes_nothing(op):
    a = BlockAllocator(4)
    a.allocate_many(2)  # 0 and 1 held, 2 and 3 free
    a.incref(1)
    before = _state(a)
    for bad in (2, 3, 4, 100, -1, -(2**31), 2**31 - 1):
        with pytest.raises(ValueError):
            getattr(a, op)(bad)
        assert _state(a) == before


def test_release_of_bad_table_changes_nothing():
    a = BlockAllocator(6)
    a.allocate_many(4)  # 0..3 held
    a.incref(2)
    before = _state(a)
    for table in ([0, 1, 4], [4], [0, -1], [3, 2, 6], [5, 0], [0, 1, 2, 3, 99]):
        with pytest.raises(ValueError):
            a.release(table)
        assert _state(a) == before, table
    # A good table releases one holder of each block.
    a.release([0, 2])
    assert [a.refcount(b) for b in range(6)] == [0, 1, 1, 1, 0, 0]
    assert a.num_free == 3


def test_release_of_table_listing_a_block_too_often_changes_nothing():
    a = BlockAllocator(4)
    a.allocate_many(2)  # 0 and 1 held once
    before = _state(a)
    with pytest.raises(ValueError):
        a.release([0, 1, 1])
    assert _state(a) == before


def test_release_returns_blocks_last_first():
    """release() drops a table last to first, so the blocks taken last are handed out first again."""
    a = BlockAllocator(8)
    table = a.allocate_many(5)
    a.release(table)
    assert a.num_free == 8
    assert a.allocate_many(5) == table


def test_decref_reports_when_freed():
    a = BlockAllocator(3)
    b = a.allocate()
    a.incref(b)
    a.incref(b)
    assert a.refcount(b) == 3
    assert a.decref(b) is False
    assert a.decref(b) is False
    assert a.num_free == 2
    assert a.decref(b) is True
    assert a.num_free == 3 and a.refcount(b) == 0


@pytest.mark.parametrize("n", [0, -1, -(2**40), 2**31])
def test_bad_num_blocks(n):
    with pytest.raises(ValueError):
        BlockAllocator(n)


def test_refcount_out_of_range():
    a = BlockAllocator(3)
    for bad in (-1, 3, 1000):
        with pytest.raises(ValueError):
            a.refcount(bad)


# ----------------------------------------------------------------------------- property-based


class AllocatorMachine(RuleBasedStateMachine):
    """The allocator against a Python model: refcounts and the free stack (top = next handed out)."""

    @initialize(n=st.integers(min_value=1, max_value=8))
    def setup(self, n):
        self.n = n
        self.alloc = BlockAllocator(n)
        self.refs = [0] * n
        self.free = list(range(n - 1, -1, -1))

    # Block ids to try: in range, and just outside it on both sides.
    def _ids(self):
        return st.integers(min_value=-2, max_value=self.n + 1)

    def _unchanged(self, before):
        assert _state(self.alloc) == before

    def _take(self) -> int:
        b = self.free.pop()
        assert self.refs[b] == 0, f"block {b} handed out while held"
        self.refs[b] = 1
        return b

    def _drop(self, b: int) -> bool:
        self.refs[b] -= 1
        if self.refs[b] == 0:
            assert b not in self.free, f"block {b} freed twice"
            self.free.append(b)
            return True
        return False

    @rule()
    def allocate(self):
        if not self.free:
            before = _state(self.alloc)
            with pytest.raises(RuntimeError):
                self.alloc.allocate()
            self._unchanged(before)
        else:
            assert self.alloc.allocate() == self._take()

    @rule(k=st.integers(min_value=0, max_value=10))
    def allocate_many(self, k):
        if k > len(self.free):
            before = _state(self.alloc)
            with pytest.raises(RuntimeError):
                self.alloc.allocate_many(k)
            self._unchanged(before)
        else:
            got = self.alloc.allocate_many(k)
            assert got == [self._take() for _ in range(k)]
            assert len(set(got)) == k

    @rule(data=st.data())
    def incref(self, data):
        b = data.draw(self._ids())
        if 0 <= b < self.n and self.refs[b] > 0:
            self.alloc.incref(b)
            self.refs[b] += 1
        else:
            before = _state(self.alloc)
            with pytest.raises(ValueError):
                self.alloc.incref(b)
            self._unchanged(before)

    @rule(data=st.data())
    def decref(self, data):
        held = [b for b in range(self.n) if self.refs[b] > 0]
        # Mostly held blocks, so that blocks do get freed; sometimes anything.
        if held and data.draw(st.booleans()):
            b = data.draw(st.sampled_from(held))
        else:
            b = data.draw(self._ids())
        if 0 <= b < self.n and self.refs[b] > 0:
            assert self.alloc.decref(b) == self._drop(b)
        else:
            before = _state(self.alloc)
            with pytest.raises(ValueError):
                self.alloc.decref(b)
            self._unchanged(before)

    @rule(data=st.data())
    def release(self, data):
        held = [b for b in range(self.n) if self.refs[b] > 0]
        table = data.draw(st.lists(st.sampled_from(held), unique=True)) if held else []
        if data.draw(st.integers(0, 3)) == 0:  # slip in one bad block
            bad = data.draw(
                st.sampled_from([b for b in range(-2, self.n + 2) if not 0 <= b < self.n or not self.refs[b]])
            )
            table.insert(data.draw(st.integers(0, len(table))), bad)
            before = _state(self.alloc)
            with pytest.raises(ValueError):
                self.alloc.release(table)
            self._unchanged(before)
        else:
            self.alloc.release(table)
            for b in reversed(table):
                self._drop(b)

    @precondition(lambda self: any(r > 0 for r in self.refs))
    @rule(data=st.data())
    def fork(self, data):
        """A sequence forked: every block of a table gains a holder."""
        held = [b for b in range(self.n) if self.refs[b] > 0]
        table = data.draw(st.lists(st.sampled_from(held), min_size=1, unique=True))
        for b in table:
            self.alloc.incref(b)
            self.refs[b] += 1

    @invariant()
    def matches_model(self):
        a = self.alloc
        assert a.num_blocks == self.n
        assert [a.refcount(b) for b in range(self.n)] == self.refs
        held = sum(1 for r in self.refs if r > 0)
        assert a.num_free == len(self.free) == self.n - held
        # Every block is either free (refcount 0, once on the free stack) or held, never both.
        assert sorted(self.free) == [b for b in range(self.n) if self.refs[b] == 0]
        assert all(r >= 0 for r in self.refs)


AllocatorMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_allocator_state_machine = AllocatorMachine.TestCase
