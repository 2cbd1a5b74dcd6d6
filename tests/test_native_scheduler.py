"""The native scheduler (`fastcodegen._C.Scheduler`) without a model: random tokens stand in for the sampler.

A harness binds the step buffers, keeps a plain Python model of every
request and sequence (prompt, tokens fed so far, completion index, how it
must finish) and of the KV cache's contents (slot -> the tokens whose K/V it
holds: the token at that position and everything before it), and after every
schedule() checks the step's metadata against it: positions, slots from the
row's own block table, query starts, context lengths, which rows sample with
what parameters; it makes the block copies and the KV writes the step asks
for and then checks that every row reads, through its block table, exactly
the K/V of its own tokens (so prefix-cache hits, shared fork blocks and
copy-on-write are checked by content, not by id). After update() the model
says which sequences finish and why (end-of-text, stop token ids,
max_tokens, max_model_len) and what each holds.

On top of that: a randomized run (seeded from `fresh_seed`) through random
requests, steps, aborts and removals with a small KV cache, and explicit
checks of continuous batching, chunked prefill, prefix-cache hits, n-sample
forks with copy-on-write, abort and the stop conditions.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest

from fastcodegen import _C

VOCAB = 64
EOS = 0
STOP, LENGTH, ABORT = 1, 2, 3
BUFFERS = [
    "input_ids", "positions", "slot_mapping", "query_start_loc", "context_lens", "block_tables", "logits_indices",
    "temperature", "top_k", "top_p", "sample_seq", "sample_index", "sample_request", "special_rows", "copy_src",
    "copy_dst",
]  # fmt: skip


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Req:
    prompt: list[int]
    n: int
    max_tokens: int
    ignore_eos: bool
    stop_token_ids: list[int]
    temperature: float
    top_k: int
    top_p: float
    special: bool
    seqs: list[int] = field(default_factory=list)
    removed: bool = False


@dataclass
class Row:
    seq: int
    start: int  # tokens computed before the step
    q: int  # tokens computed in the step
    ctx: int
    blocks: list[int]  # the sequence's block table after schedule()


@dataclass
class Sample:
    seq: int  # the sequence sampled (for an n-sample prompt: the one about to fork)
    index: int  # completion index the token goes to
    request: int
    logits_index: int


@dataclass
class Step:
    info: object
    rows: list[Row]
    samples: list[Sample]
    copies: list[tuple[int, int]]
    preempted: set[int]
    admitted: set[int]


class Harness:
    """A native scheduler, its buffers, and a Python model of what it must do."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 256,
        max_model_len: int = 128,
        max_samples: int | None = None,
        watermark_blocks: int = 0,
        enable_prefix_caching: bool = True,
        eos: tuple[int, ...] = (EOS,),
    ):
        c = _C.SchedulerConfig()
        c.num_blocks = num_blocks
        c.block_size = block_size
        c.max_num_seqs = max_num_seqs
        c.max_num_batched_tokens = max_num_batched_tokens
        c.max_model_len = max_model_len
        c.max_samples = 4 * max_num_seqs if max_samples is None else max_samples
        c.watermark_blocks = watermark_blocks
        c.enable_prefix_caching = enable_prefix_caching
        c.eos_token_ids = list(eos)
        self.cfg = c
        self.core = _C.Scheduler(c)
        self.pool = self.core.pool
        self.bs = block_size
        self.max_blocks = _cdiv(max_model_len, block_size)
        assert self.core.max_blocks_per_seq == self.max_blocks
        t, r, s = max_num_batched_tokens, max_num_seqs, c.max_samples
        # Filled with junk, so that what schedule() leaves unwritten cannot pass for right.
        self.buf = {
            "input_ids": np.full(t, -5, np.int64),
            "positions": np.full(t, -5, np.int64),
            "slot_mapping": np.full(t, -5, np.int64),
            "query_start_loc": np.full(r + 1, -5, np.int32),
            "context_lens": np.full(r, -5, np.int32),
            "block_tables": np.full((r, self.max_blocks), -5, np.int32),
            "logits_indices": np.full(s, -5, np.int64),
            "temperature": np.full(s, -5, np.float32),
            "top_k": np.full(s, -5, np.int32),
            "top_p": np.full(s, -5, np.float32),
            "sample_seq": np.full(s, -5, np.int64),
            "sample_index": np.full(s, -5, np.int32),
            "sample_request": np.full(s, -5, np.int64),
            "special_rows": np.full(s, -5, np.int32),
            "copy_src": np.full(r, -5, np.int64),
            "copy_dst": np.full(r, -5, np.int64),
        }
        self.core.bind(*(self.buf[k] for k in BUFFERS))
        self.eos = set(eos)
        self.reqs: dict[int, Req] = {}
        self.tokens: dict[int, list[int]] = {}  # seq -> prompt + outputs
        self.seq_req: dict[int, int] = {}
        self.index: dict[int, int] = {}
        self.finish: dict[int, tuple[int, int]] = {}  # seq -> (finish code, stop token)
        # Sequences check() looks at: not removed, and unfinished or not yet seen finished.
        self.active: set[int] = set()
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> the tokens whose K/V it holds
        self.pending: Step | None = None
        self.steps = 0

    # ------------------------------------------------------------------ requests

    def add(
        self,
        prompt: list[int],
        n: int = 1,
        max_tokens: int = 16,
        ignore_eos: bool = False,
        stop_token_ids: tuple[int, ...] = (),
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        special: bool = False,
    ) -> int:
        rc = _C.RequestConfig()
        rc.n, rc.max_tokens, rc.ignore_eos = n, max_tokens, ignore_eos
        rc.stop_token_ids = list(stop_token_ids)
        rc.temperature, rc.top_k, rc.top_p, rc.special = temperature, top_k, top_p, special
        rid = self.core.add_request(list(prompt), rc)
        assert rid not in self.reqs
        req = Req(list(prompt), n, max_tokens, ignore_eos, list(stop_token_ids), temperature, top_k, top_p, special)
        seqs = self.core.request_seqs(rid)
        assert len(seqs) == 1 and seqs[0] not in self.tokens
        s = seqs[0]
        req.seqs.append(s)
        self.reqs[rid] = req
        self.tokens[s] = list(prompt)
        self.seq_req[s] = rid
        self.index[s] = 0
        self.active.add(s)
        info = self.core.seq_info(s)
        assert info["waiting"] and not info["running"] and info["blocks"] == [] and info["num_prompt"] == len(prompt)
        self.check()
        return rid

    def abort(self, rid: int) -> None:
        held_only_by_it = self._blocks_freed_without(rid)
        free_before = self.pool.num_free
        self.core.abort(rid)
        for s in self.reqs[rid].seqs:
            if s not in self.finish:
                self.finish[s] = (ABORT, -1)
            info = self.core.seq_info(s)
            assert info["blocks"] == [] and not info["running"] and not info["waiting"]
        assert self.pool.num_free == free_before + held_only_by_it
        self.check()

    def remove(self, rid: int) -> None:
        """remove_request(): for a finished request; an unfinished one is aborted first."""
        held_only_by_it = self._blocks_freed_without(rid)
        free_before = self.pool.num_free
        self.core.remove_request(rid)
        req = self.reqs[rid]
        req.removed = True
        for s in req.seqs:
            self.finish.setdefault(s, (ABORT, -1))
            self.active.discard(s)
            with pytest.raises(IndexError):
                self.core.seq_info(s)
        with pytest.raises(IndexError):
            self.core.request_seqs(rid)
        assert self.pool.num_free == free_before + held_only_by_it
        self.check()

    def _blocks_freed_without(self, rid: int) -> int:
        """How many blocks stop being held when every sequence of request `rid` lets go."""
        holders = self._holders()
        mine = set(self.reqs[rid].seqs)
        return sum(1 for hs in holders.values() if all(s in mine for s, _ in hs))

    def unfinished(self) -> list[int]:
        return [s for s in self.active if s not in self.finish]

    def unfinished_requests(self) -> list[int]:
        return [r for r, q in self.reqs.items() if not q.removed and any(s not in self.finish for s in q.seqs)]

    def finished_requests(self) -> list[int]:
        return [r for r, q in self.reqs.items() if not q.removed and all(s in self.finish for s in q.seqs)]

    def samples_needed(self, s: int) -> int:
        """An n-sample request's prompt samples n tokens at once; every other sequence one."""
        req = self.reqs[self.seq_req[s]]
        if req.n > 1 and s == req.seqs[0] and len(self.tokens[s]) == len(req.prompt):
            return req.n
        return 1

    # ------------------------------------------------------------------ consistency

    def _holders(self) -> dict[int, list[tuple[int, int]]]:
        """block -> [(sequence, index in its table)] over every unfinished sequence."""
        holders = defaultdict(list)
        for s in self.unfinished():
            info = self.core.seq_info(s)
            for i, b in enumerate(info["blocks"]):
                holders[b].append((s, i))
            if info["copy_src"] >= 0:  # a pending copy-on-write holds its source too
                holders[info["copy_src"]].append((s, -1))
        return holders

    def check(self) -> None:
        self.core.check()
        pool = self.pool
        infos = {s: self.core.seq_info(s) for s in sorted(self.active)}
        holders = defaultdict(list)
        pending = defaultdict(int)  # a copy-on-write source stays held until the step that copies it completes
        for s, info in infos.items():
            for i, b in enumerate(info["blocks"]):
                holders[b].append((s, i))
            if info["copy_src"] >= 0:
                assert info["copy_src"] not in info["blocks"]
                pending[info["copy_src"]] += 1
        for b in range(pool.num_blocks):
            assert pool.refcount(b) == len(holders.get(b, [])) + pending[b], b
        assert pool.num_free == pool.num_blocks - len(set(holders) | {b for b, n in pending.items() if n})
        assert pool.num_evictable <= pool.num_cached
        for b, hs in holders.items():
            seqs = [s for s, _ in hs]
            assert len(set(seqs)) == len(seqs), f"block {b} twice in one table"
            if len(hs) == 1 or pool.is_cached(b):
                continue
            # Shared and not a cached prefix: samples of one request sharing their prompt's blocks.
            reqs = {self.seq_req[s] for s in seqs}
            assert len(reqs) == 1, f"block {b} shared by requests {reqs}"
            (i,) = {i for _, i in hs}
            assert i * self.bs < len(self.reqs[reqs.pop()].prompt), f"shared block {b} past the prompt"
        running = waiting = 0
        settled = set()
        for s, info in infos.items():
            assert info["request"] == self.seq_req[s] and info["index"] == self.index[s]
            assert info["num_tokens"] == len(self.tokens[s])
            assert info["num_computed"] <= info["num_tokens"]
            if s in self.finish:
                code, stop_token = self.finish[s]
                assert info["finish"] == code and info["stop_token"] == stop_token
                assert not info["running"] and not info["waiting"] and info["blocks"] == []
                settled.add(s)  # nothing changes a finished sequence any more
            else:
                assert info["finish"] == 0
                assert info["running"] != info["waiting"]
                running += info["running"]
                waiting += info["waiting"]
                if info["waiting"]:
                    assert info["blocks"] == [] and info["num_computed"] == 0
                else:
                    assert len(info["blocks"]) >= _cdiv(info["num_computed"], self.bs)
        assert running == self.core.num_running <= self.cfg.max_num_seqs
        assert waiting == self.core.num_waiting
        assert self.core.has_unfinished() == bool(running + waiting)
        for rid in {self.seq_req[s] for s in infos}:
            req = self.reqs[rid]
            assert self.core.request_seqs(rid) == req.seqs
            assert self.core.request_num_finished(rid) == sum(s in self.finish for s in req.seqs)
        self.active -= settled

    # ------------------------------------------------------------------ a step

    def schedule(self) -> Step:
        assert self.pending is None
        core, b, bs = self.core, self.buf, self.bs
        before = {s: core.seq_info(s) for s in self.unfinished()}
        preemptions, hits, computed = core.stats.preemptions, core.stats.prefix_hit_tokens, core.stats.computed_tokens
        info = core.schedule()
        after = {s: core.seq_info(s) for s in before}
        running = [s for s in after if after[s]["running"]]
        R, T, S, C = info.num_rows, info.num_tokens, info.num_samples, info.num_copies
        assert R == len(running) == core.num_running <= self.cfg.max_num_seqs
        assert 0 <= T <= self.cfg.max_num_batched_tokens
        assert S <= self.cfg.max_samples and C <= R
        assert core.stats.computed_tokens - computed == T

        # Query starts, positions and slots, row by row.
        qsl = b["query_start_loc"][: R + 1].tolist()
        assert R == 0 or qsl[0] == 0
        assert all(x <= y for x, y in zip(qsl, qsl[1:])) and (R == 0 or qsl[-1] == T)
        tables = b["block_tables"]
        ids = b["input_ids"][:T].tolist()
        positions = b["positions"][:T].tolist()
        slots = b["slot_mapping"][:T].tolist()
        ctxs = b["context_lens"][:R].tolist()
        raw_rows = []
        for r in range(R):
            lo, hi, ctx = qsl[r], qsl[r + 1], ctxs[r]
            q = hi - lo
            start = ctx - q
            assert start >= 0 and _cdiv(ctx, bs) <= self.max_blocks
            assert positions[lo:hi] == list(range(start, ctx))
            table = tables[r].tolist()
            assert slots[lo:hi] == [table[p // bs] * bs + p % bs for p in range(start, ctx)]
            raw_rows.append((lo, hi, start, q, ctx, table))

        # Which sequence each row is: its computed count, block table and tokens must all fit.
        def fits(r: int, s: int) -> bool:
            lo, hi, start, q, ctx, table = raw_rows[r]
            a = after[s]
            toks = self.tokens[s]
            return (
                a["num_computed"] == start
                and ctx <= len(toks)
                and len(a["blocks"]) >= _cdiv(ctx, bs)
                and table[: len(a["blocks"])] == a["blocks"]
                and ids[lo:hi] == toks[start:ctx]
            )

        owner = _match(R, running, fits)
        assert owner is not None, "rows and running sequences do not match"
        rows = []
        for r, (lo, hi, start, q, ctx, table) in enumerate(raw_rows):
            s = owner[r]
            rows.append(Row(s, start, q, ctx, list(after[s]["blocks"])))
            if q > 0:  # exactly the blocks its context needs
                assert len(after[s]["blocks"]) == _cdiv(ctx, bs)

        # Sampled rows: the rows that reach the end of their sequence, in row order.
        samples = []
        for r, row in enumerate(rows):
            if row.q == 0 or row.ctx != len(self.tokens[row.seq]):
                continue
            n = self.samples_needed(row.seq)
            indices = [self.index[row.seq]] if n == 1 else list(range(1, n)) + [0]  # forks first, its own last
            for i in indices:
                samples.append(Sample(row.seq, i, self.seq_req[row.seq], qsl[r + 1] - 1))
        assert S == len(samples)
        assert b["logits_indices"][:S].tolist() == [x.logits_index for x in samples]
        assert b["sample_seq"][:S].tolist() == [x.seq for x in samples]
        assert b["sample_index"][:S].tolist() == [x.index for x in samples]
        assert b["sample_request"][:S].tolist() == [x.request for x in samples]
        reqs = [self.reqs[x.request] for x in samples]
        assert b["temperature"][:S].tolist() == [np.float32(q.temperature) for q in reqs]
        assert b["top_k"][:S].tolist() == [q.top_k for q in reqs]
        assert b["top_p"][:S].tolist() == [np.float32(q.top_p) for q in reqs]
        assert info.num_special == sum(q.special for q in reqs)
        assert b["special_rows"][: info.num_special].tolist() == [j for j, q in enumerate(reqs) if q.special]

        # The step's shape.
        qs = [row.q for row in rows]
        assert info.is_decode == (R > 0 and all(q == 1 for q in qs))
        assert info.max_query_len == max(qs, default=0)
        assert info.max_context_len == max((row.ctx for row in rows), default=0)

        # Preemption: running before, now waiting, or recomputing from its prefix hits (preempted and
        # readmitted in the same step): its computed count fell, or its table is not the old one grown
        # (a block replaced by its copy-on-write copy aside).
        copies = list(zip(b["copy_src"][:C].tolist(), b["copy_dst"][:C].tolist()))
        copied = dict((d, src) for src, d in copies)

        def grown(s: int) -> bool:
            old, new = before[s]["blocks"], after[s]["blocks"]
            return len(new) >= len(old) and [copied.get(x, x) for x in new[: len(old)]] == old

        preempted = {
            s
            for s in before
            if before[s]["running"]
            and (not after[s]["running"] or after[s]["num_computed"] < before[s]["num_computed"] or not grown(s))
        }
        for s in preempted:
            if not after[s]["running"]:
                assert after[s]["waiting"] and after[s]["blocks"] == [] and after[s]["num_computed"] == 0
        # Preempted and readmitted in the same step onto the very same cached blocks: indistinguishable.
        ambiguous = {
            s
            for s in before
            if before[s]["running"]
            and s not in preempted
            and before[s]["num_computed"] % bs == 0
            and all(self.pool.is_cached(x) for x in before[s]["blocks"])
        }
        delta = core.stats.preemptions - preemptions
        assert len(preempted) <= delta <= len(preempted) + len(ambiguous)
        # Every running sequence ready to decode got its token, unless preempted (or out of samples).
        if self.cfg.max_samples >= 4 * self.cfg.max_num_seqs:
            scheduled = {row.seq: row.q for row in rows}
            for s in before:
                if before[s]["running"] and before[s]["num_computed"] == len(self.tokens[s]) - 1:
                    assert s in preempted or scheduled.get(s) == 1, s

        # Admitted: from the prefix cache, whole blocks only, one token short of the end at most.
        admitted = {s for s in running if not before[s]["running"] or s in preempted}
        hit = 0
        for s in admitted:
            nc = after[s]["num_computed"]
            assert nc % bs == 0 and nc <= (len(self.tokens[s]) - 1) // bs * bs
            if not self.cfg.enable_prefix_caching:
                assert nc == 0
            hit += nc
        delta = core.stats.prefix_hit_tokens - hits
        if ambiguous:
            assert hit <= delta <= hit + sum(before[s]["num_computed"] for s in ambiguous)
        else:
            assert delta == hit

        # Block copies: a block shared before, copied for the one sequence about to write into it, to a
        # block now its alone (perhaps one freed in this very step, by a preemption or an earlier copy).
        assert len({d for _, d in copies}) == C
        by_seq = {row.seq: row for row in rows}
        for k, (src, dst) in enumerate(copies):
            assert self.pool.refcount(dst) == 1 and self.pool.refcount(src) >= 1
            (s,) = [row.seq for row in rows if dst in row.blocks]
            i = by_seq[s].blocks.index(dst)
            assert before[s]["blocks"][i] == src and dst not in before[s]["blocks"]
            assert by_seq[s].q == 1 and i == by_seq[s].start // bs and by_seq[s].start % bs != 0
            # No block is overwritten before it is read: copying in order or all at once is the same.
            assert src not in {d for _, d in copies[:k]}

        # What the forward does: copies, then every row's K/V writes, then every row's attention reads.
        # (all at once, as the model runner does: every source read before any destination written)
        saved = [[self.kv.get(src * bs + k) for k in range(bs)] for src, _ in copies]
        for (_, dst), content in zip(copies, saved):
            for k in range(bs):
                self.kv[dst * bs + k] = content[k]
        for row in rows:
            toks = self.tokens[row.seq]
            for p in range(row.start, row.ctx):
                self.kv[row.blocks[p // bs] * bs + p % bs] = tuple(toks[: p + 1])
        for row in rows:
            if row.q == 0:
                continue
            toks = self.tokens[row.seq]
            for p in range(row.ctx):
                got = self.kv.get(row.blocks[p // bs] * bs + p % bs)
                assert got == tuple(toks[: p + 1]), f"sequence {row.seq} reads wrong K/V at position {p}"

        step = Step(info, rows, samples, copies, preempted, admitted)
        self.pending = step
        self.steps += 1
        self.check()
        return step

    def update(self, tokens: list[int]) -> list[tuple[int, int]]:
        step, self.pending = self.pending, None
        assert step is not None and len(tokens) == len(step.samples)
        finished, watched = self.core.update(np.array(tokens, dtype=np.int32))
        assert watched == []
        got = self.buf["sample_seq"][: len(tokens)].tolist()
        expected = []
        for j, (smp, tok) in enumerate(zip(step.samples, tokens)):
            parent = smp.seq
            if parent in self.finish:  # aborted or removed since schedule()
                assert got[j] == -1
                continue
            if smp.index != self.index[parent]:  # a new completion: a fork of the prompt
                target = got[j]
                assert target not in self.tokens and target >= 0
                self.tokens[target] = list(self.tokens[parent])
                self.seq_req[target] = smp.request
                self.index[target] = smp.index
                self.reqs[smp.request].seqs.append(target)
                self.active.add(target)
            else:
                target = parent
                assert got[j] == parent
            toks = self.tokens[target]
            toks.append(tok)
            req = self.reqs[smp.request]
            if tok in self.eos and not req.ignore_eos:
                self.finish[target] = (STOP, -1)
            elif tok in req.stop_token_ids:
                self.finish[target] = (STOP, tok)
            elif len(toks) - len(req.prompt) >= req.max_tokens or len(toks) >= self.cfg.max_model_len:
                self.finish[target] = (LENGTH, -1)
            if target in self.finish:
                expected.append((target, smp.request))
        assert finished == expected
        for row in step.rows:  # what the step computed is in the cache now
            if row.seq not in self.finish:
                assert self.core.seq_info(row.seq)["num_computed"] == row.ctx
        for s in self.active:
            req = self.reqs[self.seq_req[s]]
            assert self.core.output_tokens(s) == self.tokens[s][len(req.prompt) :]
        self.check()
        return finished

    def step(self, tokens: list[int] | None = None, rng: random.Random | None = None) -> Step:
        st = self.schedule()
        if tokens is None:
            rng = rng or random.Random(self.steps)
            tokens = [rng.randrange(1, VOCAB) for _ in st.samples]
        self.update(tokens)
        return st

    def run_until_done(self, rng: random.Random | None = None, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.core.has_unfinished():
                return
            self.step(rng=rng)
        raise AssertionError("requests still unfinished after %d steps" % max_steps)


def _match(n_rows: int, seqs: list[int], fits) -> dict[int, int] | None:
    """A perfect matching of rows to sequences where fits(row, seq) (Kuhn's augmenting paths)."""
    if n_rows != len(seqs):
        return None
    cands = [[s for s in seqs if fits(r, s)] for r in range(n_rows)]
    row_of: dict[int, int] = {}

    def augment(r: int, seen: set[int]) -> bool:
        for s in cands[r]:
            if s in seen:
                continue
            seen.add(s)
            if s not in row_of or augment(row_of[s], seen):
                row_of[s] = r
                return True
        return False

    for r in range(n_rows):
        if not augment(r, set()):
            return None
    return {r: s for s, r in row_of.items()}


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


# ----------------------------------------------------------------------------- randomized


CONFIGS = {
    # A KV cache of 10 blocks for up to 6 sequences of up to 32 tokens: preemption is routine.
    "small-cache": dict(
        num_blocks=10, block_size=4, max_num_seqs=6, max_num_batched_tokens=16, max_model_len=32, watermark_blocks=1
    ),
    # Sampled rows capped at one per row (n-sample prompts wait for room), no prefix cache.
    "few-samples-no-prefix-cache": dict(
        num_blocks=12,
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=12,
        max_model_len=32,
        max_samples=4,
        enable_prefix_caching=False,
    ),
    # Big blocks, a budget of 8 tokens a step, and just enough blocks for one full-length sequence.
    "tiny-budget": dict(num_blocks=5, block_size=8, max_num_seqs=5, max_num_batched_tokens=8, max_model_len=40),
    # One token a block (no partly filled block to copy), a watermark of free blocks kept when admitting.
    "one-token-blocks": dict(
        num_blocks=20, block_size=1, max_num_seqs=4, max_num_batched_tokens=6, max_model_len=16, watermark_blocks=2
    ),
}


def _random_run(config: dict, seed: int, steps: int = 300) -> Harness:
    rng = random.Random(seed)
    h = Harness(**config)
    L = config["max_model_len"]
    shared = [_prompt(rng, L) for _ in range(3)]  # prompts start alike, so the prefix cache hits
    stop_ids = list(range(1, 6))

    def add():
        length = rng.randint(1, L - 1)
        head = rng.randint(0, length) if rng.random() < 0.7 else 0
        prompt = rng.choice(shared)[:head] + _prompt(rng, length - head)
        h.add(
            prompt,
            n=rng.randint(1, min(4, config["max_num_seqs"])),
            max_tokens=rng.randint(1, 20),
            ignore_eos=rng.random() < 0.3,
            stop_token_ids=tuple(rng.sample(stop_ids, rng.randint(0, 2))),
            temperature=rng.choice([0.0, 0.7, 1.0]),
            top_k=rng.choice([0, 5]),
            top_p=rng.choice([1.0, 0.9]),
            special=rng.random() < 0.2,
        )

    def token() -> int:
        x = rng.random()
        if x < 0.03:
            return EOS
        if x < 0.06:
            return rng.choice(stop_ids)
        return rng.randrange(6, VOCAB)

    def step(may_interrupt: bool):
        st = h.schedule()
        if may_interrupt and rng.random() < 0.03 and h.unfinished_requests():
            rid = rng.choice(h.unfinished_requests())  # between schedule() and update()
            if rng.random() < 0.5:
                h.abort(rid)
            else:
                h.remove(rid)
        h.update([token() for _ in st.samples])

    for _ in range(steps):
        if h.core.num_waiting < 4 and rng.random() < 0.4:  # busy, not swamped
            for _ in range(rng.randint(1, 2)):
                add()
        if rng.random() < 0.04 and h.unfinished_requests():
            h.abort(rng.choice(h.unfinished_requests()))
        for rid in h.finished_requests():
            if rng.random() < 0.3:
                h.remove(rid)
        if h.core.has_unfinished():
            step(True)
            assert h.pending is None
    for _ in range(3000):
        if not h.core.has_unfinished():
            break
        step(False)
    assert not h.core.has_unfinished(), "requests never finished"
    return h


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_run_keeps_every_invariant(name, fresh_seed):
    config = CONFIGS[name]
    totals = defaultdict(int)
    for k in range(5):  # a few runs of a few hundred steps each
        h = _random_run(config, fresh_seed + k, steps=400)
        pool = h.pool
        pool.check()
        h.check()
        assert pool.num_free == pool.num_blocks
        assert pool.num_evictable == pool.num_cached
        if not config.get("enable_prefix_caching", True):
            assert h.core.stats.prefix_hit_tokens == 0 and pool.num_cached == 0
        for rid in h.finished_requests():
            h.remove(rid)
        assert pool.num_free == pool.num_blocks and not h.core.has_unfinished()
        for key in ("preemptions", "prefix_hit_tokens", "block_copies"):
            totals[key] += getattr(h.core.stats, key)
    if name == "small-cache":
        assert totals["preemptions"] > 0 and totals["prefix_hit_tokens"] > 0 and totals["block_copies"] > 0


# ----------------------------------------------------------------------------- continuous batching


def test_request_joins_the_batch_at_the_next_step():
    h = Harness(num_blocks=32, block_size=16, max_num_seqs=4, max_num_batched_tokens=64)
    rng = random.Random(1)
    a = h.add(_prompt(rng, 10), max_tokens=20, ignore_eos=True)
    (sa,) = h.reqs[a].seqs
    st = h.step()
    assert [(r.seq, r.start, r.q) for r in st.rows] == [(sa, 0, 10)]
    st = h.step()
    assert [(r.seq, r.start, r.q) for r in st.rows] == [(sa, 10, 1)] and st.info.is_decode
    b = h.add(_prompt(rng, 20), max_tokens=3, ignore_eos=True)
    (sb,) = h.reqs[b].seqs
    st = h.step()
    assert sorted((r.seq, r.start, r.q) for r in st.rows) == [(sa, 11, 1), (sb, 0, 20)]
    assert st.info.num_tokens == 21 and st.info.num_rows == 2 and not st.info.is_decode
    assert sorted(x.seq for x in st.samples) == [sa, sb]
    st = h.step()
    assert sorted((r.seq, r.start, r.q) for r in st.rows) == [(sa, 12, 1), (sb, 20, 1)] and st.info.is_decode
    h.run_until_done()
    assert len(h.core.output_tokens(sa)) == 20 and len(h.core.output_tokens(sb)) == 3
    assert h.pool.num_free == h.pool.num_blocks


# ----------------------------------------------------------------------------- chunked prefill


def test_long_prompt_is_prefilled_in_chunks_while_a_sequence_decodes():
    budget = 32
    h = Harness(num_blocks=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=256)
    rng = random.Random(2)
    a = h.add(_prompt(rng, 5), max_tokens=40, ignore_eos=True)
    (sa,) = h.reqs[a].seqs
    h.step()
    h.step()
    b = h.add(_prompt(rng, 100), max_tokens=2, ignore_eos=True)
    (sb,) = h.reqs[b].seqs
    # Each step: a's one decode token, and what is left of the budget for b's prompt.
    chunks, done = [], 0
    while done < 100:
        chunks.append(min(budget - 1, 100 - done))
        done += chunks[-1]
    assert chunks == [31, 31, 31, 7]
    a_pos = 6
    for k, chunk in enumerate(chunks):
        st = h.step()
        rows = {r.seq: r for r in st.rows}
        assert (rows[sa].start, rows[sa].q) == (a_pos, 1)
        assert (rows[sb].start, rows[sb].q) == (sum(chunks[:k]), chunk)
        assert st.info.num_tokens == 1 + chunk <= budget
        last = k == len(chunks) - 1
        assert sorted(x.seq for x in st.samples) == ([sa, sb] if last else [sa])
        a_pos += 1
    st = h.step()
    assert sorted((r.seq, r.start, r.q) for r in st.rows) == [(sa, a_pos, 1), (sb, 100, 1)]
    h.run_until_done()
    assert h.pool.num_free == h.pool.num_blocks


def test_prompt_alone_is_chunked_to_the_budget():
    h = Harness(num_blocks=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=256)
    b = h.add(_prompt(random.Random(3), 100), max_tokens=1)
    starts = []
    while h.core.has_unfinished():
        st = h.step()
        starts.append([(r.start, r.q) for r in st.rows])
    assert starts == [[(0, 32)], [(32, 32)], [(64, 32)], [(96, 4)]]
    assert h.finish[h.reqs[b].seqs[0]] == (LENGTH, -1)


# ----------------------------------------------------------------------------- prefix cache


@pytest.mark.parametrize("length", [48, 47, 49, 16, 17, 33, 100])
@pytest.mark.parametrize("enabled", [True, False])
def test_same_prompt_after_the_first_finished_hits_the_prefix_cache(length, enabled):
    bs = 16
    h = Harness(num_blocks=32, block_size=bs, max_model_len=128, enable_prefix_caching=enabled)
    prompt = _prompt(random.Random(length), length)
    first = h.add(prompt, max_tokens=3, ignore_eos=True)
    (s1,) = h.reqs[first].seqs
    st = h.step()
    first_blocks = st.rows[0].blocks
    h.run_until_done()
    assert h.core.stats.prefix_hit_tokens == 0
    # The prompt's full blocks were published; a hit must leave the last prompt token to compute.
    expected = bs * ((length - 1) // bs) if enabled else 0
    second = h.add(prompt, max_tokens=3, ignore_eos=True)
    (s2,) = h.reqs[second].seqs
    st = h.step()
    (row,) = st.rows
    assert row.seq == s2 and row.start == expected and row.q == length - expected
    assert h.core.stats.prefix_hit_tokens == expected
    assert st.info.num_tokens == length - expected
    assert row.blocks[: expected // bs] == first_blocks[: expected // bs]
    h.run_until_done()
    assert h.core.output_tokens(s1) != [] and len(h.core.output_tokens(s2)) == 3
    assert h.pool.num_free == h.pool.num_blocks


def test_same_prompt_while_the_first_runs_shares_its_cached_blocks():
    bs = 16
    h = Harness(num_blocks=32, block_size=bs, max_model_len=128)
    prompt = _prompt(random.Random(5), 40)
    first = h.add(prompt, max_tokens=10, ignore_eos=True)
    (s1,) = h.reqs[first].seqs
    h.step()
    h.step()
    second = h.add(prompt + [7, 8], max_tokens=10, ignore_eos=True)
    (s2,) = h.reqs[second].seqs
    st = h.step()
    rows = {r.seq: r for r in st.rows}
    assert (rows[s2].start, rows[s2].q) == (32, 10)
    shared = rows[s1].blocks[:2]
    assert rows[s2].blocks[:2] == shared
    assert rows[s2].blocks[2] != rows[s1].blocks[2]  # 40 prompt tokens + 1 output: a partial block, not shared
    for x in shared:
        assert h.pool.refcount(x) == 2 and h.pool.is_cached(x)
    h.run_until_done()
    assert h.pool.num_free == h.pool.num_blocks


# ----------------------------------------------------------------------------- n-sample forks


def test_n_samples_fork_after_the_prompt_and_copy_the_shared_block_on_write():
    bs, n = 16, 4
    h = Harness(num_blocks=32, block_size=bs, max_num_seqs=8, max_model_len=128)
    prompt = _prompt(random.Random(6), 40)
    rid = h.add(prompt, n=n, max_tokens=5, ignore_eos=True)
    (s0,) = h.reqs[rid].seqs
    st = h.schedule()
    (row,) = st.rows
    assert (row.seq, row.start, row.q) == (s0, 0, 40)
    assert st.info.num_samples == n
    assert [x.logits_index for x in st.samples] == [39] * n
    assert [x.seq for x in st.samples] == [s0] * n
    assert sorted(x.index for x in st.samples) == list(range(n))
    first_tokens = [11, 12, 13, 14]
    h.update(first_tokens)
    seqs = h.core.request_seqs(rid)
    assert len(seqs) == n and len(set(seqs)) == n and seqs[0] == s0
    infos = {s: h.core.seq_info(s) for s in seqs}
    assert sorted(i["index"] for i in infos.values()) == list(range(n))
    for x, tok in zip(st.samples, first_tokens):
        (s,) = [s for s in seqs if infos[s]["index"] == x.index]
        assert h.core.output_tokens(s) == [tok]
    prompt_blocks = infos[s0]["blocks"]
    assert len(prompt_blocks) == 3  # 16 + 16 + 8 prompt tokens
    for s in seqs:
        assert infos[s]["blocks"] == prompt_blocks and infos[s]["running"]
        assert infos[s]["num_computed"] == 40 and infos[s]["num_tokens"] == 41
    for x in prompt_blocks:
        assert h.pool.refcount(x) == n
    assert [h.pool.is_cached(x) for x in prompt_blocks] == [True, True, False]

    # The first decode writes position 40, into the shared, partly filled third block.
    st = h.schedule()
    assert st.info.is_decode and st.info.num_rows == n
    assert st.info.num_copies == n - 1
    assert [src for src, _ in st.copies] == [prompt_blocks[2]] * (n - 1)
    dsts = [dst for _, dst in st.copies]
    assert len(set(dsts)) == n - 1 and not set(dsts) & set(prompt_blocks)
    tables = {r.seq: r.blocks for r in st.rows}
    assert all(t[:2] == prompt_blocks[:2] for t in tables.values())
    assert sorted(t[2] for t in tables.values()) == sorted(dsts + [prompt_blocks[2]])
    # Decodes go oldest first: the youngest fork writes last and keeps the original block.
    (keeper,) = [s for s, t in tables.items() if t[2] == prompt_blocks[2]]
    assert infos[keeper]["index"] == n - 1
    for x in prompt_blocks[:2]:
        assert h.pool.refcount(x) == n
    for x in dsts:
        assert h.pool.refcount(x) == 1
    # The shared block stays held by the n - 1 pending copies until the step that makes them completes.
    assert h.pool.refcount(prompt_blocks[2]) == n
    assert h.core.stats.block_copies == n - 1
    h.update([20 + i for i in range(len(st.samples))])
    assert h.pool.refcount(prompt_blocks[2]) == 1
    h.run_until_done()
    for s in seqs:
        assert len(h.core.output_tokens(s)) == 5
        assert h.core.seq_info(s)["finish"] == LENGTH
    assert h.pool.num_free == h.pool.num_blocks


def test_fork_without_a_free_row_waits_and_finds_the_prompt_in_the_prefix_cache():
    bs = 16
    h = Harness(num_blocks=32, block_size=bs, max_num_seqs=3, max_model_len=128)
    rng = random.Random(7)
    others = [h.add(_prompt(rng, 5), max_tokens=30, ignore_eos=True) for _ in range(2)]
    rid = h.add(_prompt(rng, 40), n=3, max_tokens=4, ignore_eos=True)
    st = h.step()
    assert st.info.num_rows == 3 and st.info.num_samples == 2 + 3
    seqs = h.core.request_seqs(rid)
    assert len(seqs) == 3
    waiting = [s for s in seqs if h.core.seq_info(s)["waiting"]]
    assert len(waiting) == 2
    h.run_until_done()
    # The waiting forks recomputed only what the prefix cache did not have: one token short of the end.
    assert h.core.stats.prefix_hit_tokens >= 2 * 32
    for s in seqs:
        assert len(h.core.output_tokens(s)) == 4
    for other in others:
        assert len(h.core.output_tokens(h.reqs[other].seqs[0])) == 30
    assert h.pool.num_free == h.pool.num_blocks


# ----------------------------------------------------------------------------- abort


def test_abort_running_and_waiting_requests_frees_their_blocks():
    h = Harness(num_blocks=32, block_size=16, max_num_seqs=3, max_model_len=128)
    rng = random.Random(8)
    r0 = h.add(_prompt(rng, 20), max_tokens=30, ignore_eos=True)
    r1 = h.add(_prompt(rng, 20), n=2, max_tokens=30, ignore_eos=True)
    r2 = h.add(_prompt(rng, 20), max_tokens=5, ignore_eos=True)
    r3 = h.add(_prompt(rng, 30), max_tokens=5, ignore_eos=True)
    st = h.step()
    assert st.info.num_rows == 3  # r3 waits for a row; r1's second sample too
    h.step()
    assert all(h.core.seq_info(s)["running"] for s in h.reqs[r0].seqs)
    assert h.core.seq_info(h.reqs[r3].seqs[0])["waiting"]
    h.abort(r1)  # a running sequence and a waiting fork
    h.abort(r3)  # waiting
    for rid in (r1, r3):
        for s in h.reqs[rid].seqs:
            info = h.core.seq_info(s)
            assert info["finish"] == ABORT and info["blocks"] == []
    h.abort(r3)  # twice: nothing more happens
    h.core.abort(12345)  # unknown: ignored
    h.check()
    h.run_until_done()
    assert h.finish[h.reqs[r0].seqs[0]] == (LENGTH, -1) and h.finish[h.reqs[r2].seqs[0]] == (LENGTH, -1)
    assert h.pool.num_free == h.pool.num_blocks
    for rid in (r0, r1, r2, r3):
        h.remove(rid)
    assert h.pool.num_free == h.pool.num_blocks


def test_abort_between_schedule_and_update_drops_its_samples():
    h = Harness(num_blocks=32, block_size=16, max_num_seqs=4, max_model_len=128)
    rng = random.Random(9)
    r0 = h.add(_prompt(rng, 20), n=3, max_tokens=4, ignore_eos=True)
    r1 = h.add(_prompt(rng, 10), max_tokens=4, ignore_eos=True)
    st = h.schedule()
    assert st.info.num_samples == 4
    h.abort(r0)
    h.update([30, 31, 32, 33])  # r0's three rows go nowhere; r1's token lands
    assert h.buf["sample_seq"][:3].tolist() == [-1, -1, -1]
    assert h.core.request_seqs(r0) == h.reqs[r0].seqs and len(h.reqs[r0].seqs) == 1
    assert h.core.output_tokens(h.reqs[r1].seqs[0]) == [33]
    st = h.schedule()
    h.remove(r1)
    h.update([40] * len(st.samples))
    assert not h.core.has_unfinished()
    assert h.pool.num_free == h.pool.num_blocks


# ----------------------------------------------------------------------------- stop conditions


def _one(h: Harness, tokens: list[int], **kwargs) -> int:
    """Runs one request fed `tokens`, one per step, until it finishes; its sequence."""
    kwargs = dict(kwargs)
    rid = h.add(_prompt(random.Random(10), kwargs.pop("prompt_len", 12)), **kwargs)
    (s,) = h.reqs[rid].seqs
    for tok in tokens:
        st = h.schedule()
        assert len(st.samples) == 1
        h.update([tok])
        if s in h.finish:
            break
    return s


@pytest.mark.parametrize(
    "kwargs, tokens, outputs, finish",
    [
        (dict(max_tokens=10), [5, 6, EOS, 7], [5, 6, EOS], (STOP, -1)),  # end of text
        (dict(max_tokens=10), [EOS], [EOS], (STOP, -1)),  # as the very first token
        (dict(max_tokens=4, ignore_eos=True), [EOS, EOS, 9, EOS, 8], [EOS, EOS, 9, EOS], (LENGTH, -1)),
        (dict(max_tokens=3), [5, 6, 7, 8], [5, 6, 7], (LENGTH, -1)),  # max_tokens
        (dict(max_tokens=1), [5, 6], [5], (LENGTH, -1)),
        (dict(max_tokens=10, stop_token_ids=(7, 9)), [5, 6, 9, 8], [5, 6, 9], (STOP, 9)),  # stop token ids
        (dict(max_tokens=10, stop_token_ids=(7,)), [7], [7], (STOP, 7)),
        (dict(max_tokens=3, stop_token_ids=(7,)), [5, 6, 7], [5, 6, 7], (STOP, 7)),  # a stop beats the length
        (dict(max_tokens=10, ignore_eos=True, stop_token_ids=(EOS,)), [5, EOS], [5, EOS], (STOP, EOS)),
        (dict(max_tokens=100, prompt_len=60), [5, 6, 7, 8, 9], [5, 6, 7, 8], (LENGTH, -1)),  # max_model_len
        (dict(max_tokens=100, prompt_len=63), [5, 6], [5], (LENGTH, -1)),
    ],
)
def test_stop_conditions(kwargs, tokens, outputs, finish):
    h = Harness(num_blocks=16, block_size=16, max_model_len=64, eos=(EOS,))
    s = _one(h, tokens, **kwargs)
    assert h.core.output_tokens(s) == outputs
    info = h.core.seq_info(s)
    assert (info["finish"], info["stop_token"]) == finish
    assert info["blocks"] == [] and not h.core.has_unfinished()
    assert h.pool.num_free == h.pool.num_blocks


def test_several_eos_ids_and_none():
    h = Harness(num_blocks=16, block_size=16, max_model_len=64, eos=(3, 4))
    s = _one(h, [5, 4, 6], max_tokens=10)
    assert h.core.output_tokens(s) == [5, 4] and h.finish[s] == (STOP, -1)
    h = Harness(num_blocks=16, block_size=16, max_model_len=64, eos=())
    s = _one(h, [EOS, 3, 4], max_tokens=3)
    assert h.core.output_tokens(s) == [EOS, 3, 4] and h.finish[s] == (LENGTH, -1)


def test_bad_requests_are_refused():
    h = Harness(num_blocks=16, block_size=16, max_num_seqs=4, max_model_len=64)
    for prompt, n in (([], 1), ([1] * 64, 1), ([1] * 5, 0), ([1] * 5, 5)):
        with pytest.raises(ValueError):
            h.add(prompt, n=n)
    assert not h.core.has_unfinished()
    with pytest.raises(ValueError):
        h.core.update(np.array([1], dtype=np.int32))  # no sampled rows to take it


def test_bad_configs_are_refused():
    base = dict(num_blocks=8, block_size=16, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    for change in (
        dict(num_blocks=7),  # one sequence of max_model_len tokens must fit
        dict(max_num_batched_tokens=3),  # a decode token for every row
        dict(max_samples=3),  # a sampled row for every row
        dict(max_num_seqs=0),
        dict(max_model_len=0),
    ):
        with pytest.raises(ValueError):
            Harness(**{**base, **change})
    h = Harness(**base)
    assert h.core.max_blocks_per_seq == 8


def test_schedule_before_bind_is_refused():
    c = _C.SchedulerConfig()
    c.num_blocks, c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len, c.max_samples = 4, 2, 8, 64, 2
    sched = _C.Scheduler(c)
    sched.add_request([1, 2, 3], _C.RequestConfig())
    with pytest.raises(RuntimeError):
        sched.schedule()
    with pytest.raises(ValueError):
        sched.bind(*[np.zeros(1, np.int64)] * len(BUFFERS))  # too small, and of the wrong dtypes


def test_engine_facade_hands_out_views_of_the_bound_buffers():
    """fastcodegen.scheduler.Scheduler: the engine's buffers and the step's views of them."""
    import torch

    from fastcodegen import SamplingParams
    from fastcodegen.config import EngineConfig
    from fastcodegen.scheduler import Scheduler

    config = EngineConfig(
        model="none",
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_model_len=64,
        block_size=16,
        max_num_seqs=4,
        max_num_batched_tokens=64,
    )
    sched = Scheduler(config, num_blocks=8, eos_token_ids=(EOS,))
    prompt = list(range(1, 21))
    rid = sched.add(prompt, SamplingParams(n=2, max_tokens=2, ignore_eos=True, seed=3), watch=False)
    step = sched.schedule()
    assert step.input_ids.tolist() == prompt and step.positions.tolist() == list(range(20))
    assert step.query_start_loc.tolist() == [0, 20] and step.context_lens.tolist() == [20]
    table = step.block_tables[0, :2].tolist()
    assert step.slot_mapping.tolist() == [table[p // 16] * 16 + p % 16 for p in range(20)]
    assert step.logits_indices.tolist() == [19, 19]
    assert sorted(step.sample_index.tolist()) == [0, 1] and step.sample_request.tolist() == [rid, rid]
    assert step.special_rows.tolist() == [0, 1]  # seeded: the engine samples these rows itself
    assert len(step.copy_src) == 0
    finished, watched = sched.update(np.array([7, 8], dtype=np.int32))
    assert finished == [] and watched == []
    seqs = sched.core.request_seqs(rid)
    assert sorted(sched.sampled_seq(j) for j in range(2)) == sorted(seqs) and len(seqs) == 2
    step = sched.schedule()
    assert step.info.is_decode and step.info.num_rows == 2 and len(step.copy_src) == 1
    finished, _ = sched.update(np.array([9, 9], dtype=np.int32))
    assert sorted(finished) == sorted((s, rid) for s in seqs)
    assert sched.core.pool.num_free == 8


def test_decode_step_padded_for_a_graph_bucket():
    """What a CUDA graph's padding rows hold: no K/V store (slot -1), nothing to attend to (context 0)."""
    import torch

    from fastcodegen.config import EngineConfig
    from fastcodegen.sampling_params import SamplingParams
    from fastcodegen.scheduler import Scheduler as Facade

    cfg = EngineConfig(model="x", device=torch.device("cpu"), dtype=torch.float32, max_model_len=64, max_num_seqs=8)
    sched = Facade(cfg, num_blocks=64, eos_token_ids=())
    for n in (5, 9, 3):
        sched.add(list(range(1, n + 1)), SamplingParams(max_tokens=4, ignore_eos=True), watch=False)
    step = sched.schedule()
    sched.update(np.zeros(step.info.num_samples, dtype=np.int32))
    step = sched.schedule()
    assert step.info.is_decode and step.info.num_rows == 3
    real = {k: getattr(step, k).clone() for k in ("input_ids", "positions", "slot_mapping", "context_lens")}
    padded = sched.pad_decode(step, 8)
    assert padded.input_ids.shape == (8,) and padded.block_tables.shape[0] == 8
    for k, v in real.items():
        assert torch.equal(getattr(padded, k)[:3], v)  # the real rows are untouched
    assert padded.slot_mapping[3:].eq(-1).all() and padded.context_lens[3:].eq(0).all()
    assert padded.input_ids[3:].eq(0).all() and padded.positions[3:].eq(0).all()
    assert padded.query_start_loc.tolist() == list(range(9))
    assert torch.equal(padded.logits_indices, step.logits_indices)
    empty = sched.padding_step(4)
    assert empty.slot_mapping.eq(-1).all() and empty.context_lens.eq(0).all() and empty.info.is_decode
