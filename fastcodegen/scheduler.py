"""Which sequences run in the next step, first come first served.

A step is either a prefill of waiting sequences (their whole token lists, as
many as fit the token budget, the sequence limit and the free KV blocks) or a
decode step of every running sequence. When a running sequence needs a block
and none is free, the most recently admitted running sequence is preempted:
its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed from its tokens later. Any single sequence fits the cache (the
engine checks it at start), so every sequence finishes.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill."""
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if tokens + seq.num_tokens > self.max_num_batched_tokens:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            batch.append(seq)
            tokens += seq.num_tokens
        if batch:
            self.running.extend(batch)
            return batch, True

        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.append(seq)
                batch.append(seq)
        self.running.extendleft(reversed(batch))
        return batch, False

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def retire(self, seqs: list[Sequence]) -> None:
        """Frees the blocks of the sequences of `seqs` that finished."""
        done = [s for s in seqs if s.finished]
        for seq in done:
            self.block_manager.free(seq)
        if done:
            gone = {id(s) for s in done}
            self.running = deque(s for s in self.running if id(s) not in gone)

    def abort(self, seqs: list[Sequence]) -> None:
        """Drops sequences wherever they are, freeing their blocks."""
        gone = {id(s) for s in seqs}
        for seq in seqs:
            if seq.block_table:
                self.block_manager.free(seq)
        self.waiting = deque(s for s in self.waiting if id(s) not in gone)
        self.running = deque(s for s in self.running if id(s) not in gone)
