"""The native scheduler (`fastcodegen._C.Scheduler`) without a model: random tokens stand in for the sampler.

A harness allocates the step buffers from the scheduler's table of step
fields, binds them by name, and keeps a plain Python model of every request
and sequence (prompt, tokens fed so far, completion index, how it must
finish, its text) and of the KV cache's contents (slot -> the tokens whose
K/V it holds: the token at that position and everything before it). After
every schedule() it checks the step's metadata against the model:
positions, slots from the row's own block table, query starts, context
lengths, which rows sample with what parameters; it makes the block copies
and the KV writes the step asks for and then checks that every row reads,
through its block table, exactly the K/V of its own tokens (so prefix-cache
hits, shared fork blocks and copy-on-write are checked by content, not by
id). After update() the model says which sequences finish and why
(end-of-text, stop token ids, stop strings, max_tokens, max_model_len,
non-finite logits), what each holds, and which events update() returns:
which sequence each sampled row went to, and the text bytes each reports,
decoded by Python's own UTF-8 decoder (errors="replace") from a vocabulary
of made-up byte tokens.

On top of that: a randomized run (seeded from `fresh_seed`) through random
requests, steps, aborts, removals and non-finite rows with a small KV cache,
and explicit checks of binding, continuous batching, chunked prefill,
prefix-cache hits, n-sample forks with copy-on-write, abort, errors, events
and the stop conditions.
"""

from __future__ import annotations

import codecs
import random
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest

from fastcodegen import _C

VOCAB = 64
EOS = 0
NOT_FINISHED, STOP, LENGTH, ABORT, ERROR = 0, 1, 2, 3, 4
DTYPES = {"int64": np.int64, "int32": np.int32, "float32": np.float32}
# The text of made-up tokens: ASCII, and characters of 2, 3 and 4 bytes whose bytes tokens split.
ALPHABET = "ab \nxé中😀"


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
    host_sampled: bool
    report_tokens: bool
    stop: list[str]
    prompt_logprobs: bool = False
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


def random_vocab(rng: random.Random, size: int = VOCAB) -> list[bytes]:
    """Tokens of 1 to 4 bytes cut from UTF-8 text, so characters straddle tokens; a few invalid bytes too."""
    data = "".join(rng.choice(ALPHABET) for _ in range(4 * size)).encode()
    vocab, i = [b"<|eos|>"], 0
    while len(vocab) < size:
        if rng.random() < 0.05:
            vocab.append(rng.choice([b"\xff", b"\x80", b"\xc3", b"\xf0\x9f"]))
            continue
        k = rng.randint(1, 4)
        vocab.append(data[i : i + k])
        i += k
    return vocab


def random_stops(rng: random.Random) -> list[str]:
    """Up to three stop strings of one to three characters."""
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 3))]


def reference_text(vocab: list[bytes], tokens: list[int], stops: list[str]) -> bytes:
    """What a sequence that got `tokens` (none of them a stop token or end-of-text) holds, independently."""
    text = b"".join(vocab[t] for t in tokens).decode("utf-8", errors="replace")
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)].encode() if hits else text.encode()


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
        vocab: list[bytes] | None = None,
        bind_seed: int | None = None,
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
        self.core = _C.Scheduler(c)
        self.cfg = self.core.config
        self.pool = self.core.pool
        self.bs = block_size
        self.max_blocks = _cdiv(max_model_len, block_size)
        assert self.core.max_blocks_per_seq == self.max_blocks
        # Filled with junk, so that what schedule() leaves unwritten cannot pass for right.
        fields = self.core.step_fields()
        if bind_seed is not None:
            random.Random(bind_seed).shuffle(fields)
        self.buf = {name: np.full(shape, -5, DTYPES[dtype]) for name, dtype, shape, *_ in fields}
        self.core.bind(self.buf)
        self.vocab = vocab
        self.special = {EOS} if vocab is not None else set()  # end-of-text is special: never in the text
        if vocab is not None:
            self.core.set_vocabulary(vocab, sorted(self.special))
        self.eos = set(eos)
        self.reqs: dict[int, Req] = {}
        self.tokens: dict[int, list[int]] = {}  # seq -> prompt + outputs
        self.seq_req: dict[int, int] = {}
        self.index: dict[int, int] = {}
        self.finish: dict[int, tuple[int, int]] = {}  # seq -> (finish code, stop token)
        self.stop_string: dict[int, int] = {}  # seq -> which stop string ended it, or -1
        self.decoder: dict[int, codecs.IncrementalDecoder] = {}
        self.text: dict[int, str] = {}  # seq -> its text, as Python's decoder makes it
        self.reported: dict[int, bytes] = {}  # seq -> the bytes of its events, joined
        # Sequences check() looks at: not removed, and unfinished or not yet seen finished.
        self.active: set[int] = set()
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> the tokens whose K/V it holds
        self.pending: Step | None = None
        self.steps = 0
        self.scored: dict[int, set[int]] = {}  # request -> prompt positions whose logits a step computed

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
        host_sampled: bool = False,
        report_tokens: bool = False,
        stop: tuple[str, ...] = (),
        prompt_logprobs: bool = False,
    ) -> int:
        rc = _C.RequestConfig()
        rc.prompt_logprobs = prompt_logprobs
        rc.n, rc.max_tokens, rc.ignore_eos = n, max_tokens, ignore_eos
        rc.stop_token_ids, rc.stop_strings = list(stop_token_ids), list(stop)
        rc.temperature, rc.top_k, rc.top_p = temperature, top_k, top_p
        rc.host_sampled, rc.report_tokens = host_sampled, report_tokens
        rid = self.core.add_request(list(prompt), rc)
        assert rid not in self.reqs
        req = Req(
            list(prompt),
            n,
            max_tokens,
            ignore_eos,
            list(stop_token_ids),
            temperature,
            top_k,
            top_p,
            host_sampled,
            report_tokens,
            list(stop),
            prompt_logprobs,
        )
        self.reqs[rid] = req
        self.scored[rid] = set()
        seqs = self.core.request_seqs(rid)
        assert len(seqs) == 1 and seqs[0] not in self.tokens
        s = seqs[0]
        self._new_seq(s, rid, 0, list(prompt))
        info = self.core.seq_info(s)
        assert info["waiting"] and not info["running"] and info["blocks"] == [] and info["num_prompt"] == len(prompt)
        self.check()
        return rid

    def _new_seq(self, s: int, rid: int, index: int, tokens: list[int]) -> None:
        self.reqs[rid].seqs.append(s)
        self.tokens[s] = tokens
        self.seq_req[s] = rid
        self.index[s] = index
        self.stop_string[s] = -1
        self.decoder[s] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text[s] = ""
        self.reported[s] = b""
        self.active.add(s)

    def abort(self, rid: int) -> None:
        held_only_by_it = self._blocks_freed_without(rid)
        free_before = self.pool.num_free
        self.core.abort(rid)
        for s in self.reqs[rid].seqs:
            if s not in self.finish:
                self._end(s, ABORT)
            info = self.core.seq_info(s)
            assert info["blocks"] == [] and not info["running"] and not info["waiting"]
        assert self.pool.num_free == free_before + held_only_by_it
        self.check()

    def stop(self, s: int) -> None:
        """stop(): a stop pattern Python matched ends a sequence."""
        held = {b for b, hs in self._holders().items() if all(x == s for x, _ in hs)}
        free_before = self.pool.num_free
        self.core.stop(s)
        self._end(s, STOP)
        assert self.pool.num_free == free_before + len(held)
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
        infos = {s: self.core.seq_info(s) for s in sorted(self.active)}
        self._check_blocks(infos)
        running = waiting = 0
        settled = set()
        for s, info in infos.items():
            assert info["request"] == self.seq_req[s] and info["index"] == self.index[s]
            assert info["num_tokens"] == len(self.tokens[s])
            assert info["num_computed"] <= info["num_tokens"]
            assert self.core.text(s) == self.text[s].encode() and info["stop_string"] == self.stop_string[s]
            assert info["reported"] == len(self.reported[s])
            if s in self.finish:
                code, stop_token = self.finish[s]
                assert info["finish"] == code and info["stop_token"] == stop_token
                assert not info["running"] and not info["waiting"] and info["blocks"] == []
                settled.add(s)  # nothing changes a finished sequence any more
            else:
                assert info["finish"] == NOT_FINISHED
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

    def _check_blocks(self, infos: dict[int, dict]) -> None:
        """Reference counts are the holders; only one request's samples share blocks outside the prefix cache."""
        pool = self.pool
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

    # ------------------------------------------------------------------ a step

    def schedule(self) -> Step:
        assert self.pending is None
        core = self.core
        before = {s: core.seq_info(s) for s in self.unfinished()}
        stats = core.stats
        preemptions, hits, computed = stats.preemptions, stats.prefix_hit_tokens, stats.computed_tokens
        info = core.schedule()
        after = {s: core.seq_info(s) for s in before}
        running = [s for s in after if after[s]["running"]]
        self._check_counts(info, running, computed)
        rows = self._check_rows(info, running, after)
        samples = self._check_samples(info, rows)
        self._check_shape(info, rows)
        C = info.num_copies
        copies = list(zip(self.buf["copy_src"][:C].tolist(), self.buf["copy_dst"][:C].tolist()))
        preempted, ambiguous = self._check_preemptions(before, after, rows, copies, preemptions)
        admitted = self._check_prefix_hits(before, after, running, preempted, ambiguous, hits)
        self._check_prompt_rows(info, rows, samples)
        self._check_copies(copies, rows, before)
        self._forward(rows, copies)
        step = Step(info, rows, samples, copies, preempted, admitted)
        self.pending = step
        self.steps += 1
        self.check()
        return step

    def _check_counts(self, info, running: list[int], computed: int) -> None:
        R, T, S, C = info.num_rows, info.num_tokens, info.num_samples, info.num_copies
        assert R == len(running) == self.core.num_running <= self.cfg.max_num_seqs
        assert 0 <= T <= self.cfg.max_num_batched_tokens
        assert S <= self.cfg.max_samples and C <= R
        assert self.core.stats.computed_tokens - computed == T

    def _check_rows(self, info, running: list[int], after: dict[int, dict]) -> list[Row]:
        """Query starts, positions and slots row by row; which running sequence each row is."""
        b, bs, R, T = self.buf, self.bs, info.num_rows, info.num_tokens
        qsl = b["query_start_loc"][: R + 1].tolist()
        assert R == 0 or qsl[0] == 0
        assert all(x <= y for x, y in zip(qsl, qsl[1:])) and (R == 0 or qsl[-1] == T)
        ids = b["input_ids"][:T].tolist()
        positions = b["positions"][:T].tolist()
        slots = b["slot_mapping"][:T].tolist()
        ctxs = b["context_lens"][:R].tolist()
        raw_rows = []
        for r in range(R):
            lo, hi, ctx = qsl[r], qsl[r + 1], ctxs[r]
            start = ctx - (hi - lo)
            assert start >= 0 and _cdiv(ctx, bs) <= self.max_blocks
            assert positions[lo:hi] == list(range(start, ctx))
            table = b["block_tables"][r].tolist()
            assert slots[lo:hi] == [table[p // bs] * bs + p % bs for p in range(start, ctx)]
            raw_rows.append((lo, hi, start, ctx, table))

        # Which sequence each row is: its computed count, block table and tokens must all fit.
        def fits(r: int, s: int) -> bool:
            lo, hi, start, ctx, table = raw_rows[r]
            a, toks = after[s], self.tokens[s]
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
        for r, (lo, hi, start, ctx, _) in enumerate(raw_rows):
            s = owner[r]
            rows.append(Row(s, start, hi - lo, ctx, list(after[s]["blocks"])))
            if hi > lo:  # exactly the blocks its context needs
                assert len(after[s]["blocks"]) == _cdiv(ctx, bs)
        return rows

    def _check_samples(self, info, rows: list[Row]) -> list[Sample]:
        """Sampled rows: the rows that reach the end of their sequence, in row order, with their parameters."""
        b, S = self.buf, info.num_samples
        qsl = b["query_start_loc"][: info.num_rows + 1].tolist()
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
        assert b["sample_index"][:S].tolist() == [x.index for x in samples]
        assert b["sample_request"][:S].tolist() == [x.request for x in samples]
        reqs = [self.reqs[x.request] for x in samples]
        assert b["temperature"][:S].tolist() == [np.float32(q.temperature) for q in reqs]
        assert b["top_k"][:S].tolist() == [q.top_k for q in reqs]
        assert b["top_p"][:S].tolist() == [np.float32(q.top_p) for q in reqs]
        H = info.num_host_sampled
        assert H == sum(q.host_sampled for q in reqs)
        assert b["host_sampled_rows"][:H].tolist() == [j for j, q in enumerate(reqs) if q.host_sampled]
        return samples

    @staticmethod
    def _check_shape(info, rows: list[Row]) -> None:
        qs = [row.q for row in rows]
        assert info.is_decode == (info.num_rows > 0 and all(q == 1 for q in qs))
        assert info.max_query_len == max(qs, default=0)
        assert info.max_context_len == max((row.ctx for row in rows), default=0)

    def _check_preemptions(self, before, after, rows, copies, preemptions: int) -> tuple[set[int], set[int]]:
        """The sequences preempted by the step, and those that may have been (see below)."""
        # Preemption: running before, now waiting, or recomputing from its prefix hits (preempted and
        # readmitted in the same step): its computed count fell, or its table is not the old one grown
        # (a block replaced by its copy-on-write copy aside).
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
            and before[s]["num_computed"] % self.bs == 0
            and all(self.pool.is_cached(x) for x in before[s]["blocks"])
        }
        delta = self.core.stats.preemptions - preemptions
        assert len(preempted) <= delta <= len(preempted) + len(ambiguous)
        # Every running sequence ready to decode got its token, unless preempted (or out of samples).
        if self.cfg.max_samples >= 4 * self.cfg.max_num_seqs:
            scheduled = {row.seq: row.q for row in rows}
            for s in before:
                if before[s]["running"] and before[s]["num_computed"] == len(self.tokens[s]) - 1:
                    assert s in preempted or scheduled.get(s) == 1, s
        return preempted, ambiguous

    def _check_prefix_hits(self, before, after, running, preempted, ambiguous, hits: int) -> set[int]:
        """Admitted: from the prefix cache, whole blocks only, one token short of the end at most."""
        admitted = {s for s in running if not before[s]["running"] or s in preempted}
        hit = 0
        for s in admitted:
            nc = after[s]["num_computed"]
            assert nc % self.bs == 0 and nc <= (len(self.tokens[s]) - 1) // self.bs * self.bs
            rid = self.seq_req[s]
            if self.reqs[rid].prompt_logprobs:  # hits only over positions scored already (a prefix)
                assert nc <= len(self.scored[rid]) // self.bs * self.bs
            if not self.cfg.enable_prefix_caching:
                assert nc == 0
            hit += nc
        delta = self.core.stats.prefix_hit_tokens - hits
        if ambiguous:
            assert hit <= delta <= hit + sum(before[s]["num_computed"] for s in ambiguous)
        else:
            assert delta == hit
        return admitted

    def _check_prompt_rows(self, info, rows: list[Row], samples: list[Sample]) -> None:
        """Prompt rows: each prompt position of a scoring request computed in the step and not scored before.

        In row order, beside the sampled rows under one cap; a prompt's first
        sampled row comes with every position before it scored.
        """
        b, P = self.buf, info.num_prompt_logits
        assert info.num_samples + P <= self.cfg.max_samples
        qsl = b["query_start_loc"][: info.num_rows + 1].tolist()
        expected = []
        for r, row in enumerate(rows):
            rid = self.seq_req[row.seq]
            req = self.reqs[rid]
            if not req.prompt_logprobs:
                continue
            for p in range(row.start, min(row.start + row.q, len(req.prompt) - 1)):
                if p not in self.scored[rid]:
                    expected.append((qsl[r] + p - row.start, rid, p))
                    self.scored[rid].add(p)
            assert self.scored[rid] == set(range(len(self.scored[rid])))
        got = zip(
            b["prompt_logits_indices"][:P].tolist(),
            b["prompt_logits_request"][:P].tolist(),
            b["prompt_logits_position"][:P].tolist(),
        )
        assert list(got) == expected
        for smp in samples:
            req = self.reqs[smp.request]
            if req.prompt_logprobs:
                assert self.scored[smp.request] == set(range(len(req.prompt) - 1))

    def _check_copies(self, copies: list[tuple[int, int]], rows: list[Row], before: dict[int, dict]) -> None:
        """A block shared before, copied for the one sequence about to write into it, to a block now its alone.

        (perhaps one freed in this very step, by a preemption or an earlier copy)
        """
        bs = self.bs
        assert len({d for _, d in copies}) == len(copies)
        by_seq = {row.seq: row for row in rows}
        for k, (src, dst) in enumerate(copies):
            assert self.pool.refcount(dst) == 1 and self.pool.refcount(src) >= 1
            (s,) = [row.seq for row in rows if dst in row.blocks]
            i = by_seq[s].blocks.index(dst)
            assert before[s]["blocks"][i] == src and dst not in before[s]["blocks"]
            assert by_seq[s].q == 1 and i == by_seq[s].start // bs and by_seq[s].start % bs != 0
            # No block is overwritten before it is read: copying in order or all at once is the same.
            assert src not in {d for _, d in copies[:k]}

    def _forward(self, rows: list[Row], copies: list[tuple[int, int]]) -> None:
        """What the forward does: copies, then every row's K/V writes, then every row's attention reads.

        (all at once, as the model runner does: every source read before any destination written)
        """
        bs = self.bs
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

    # ------------------------------------------------------------------ a step's outputs

    def update(self, tokens: list[int], finite: list[bool] | None = None) -> list[tuple]:
        """update() with the model's expectations; its events."""
        step, self.pending = self.pending, None
        assert step is not None and len(tokens) == len(step.samples)
        known = {rid: len(q.seqs) for rid, q in self.reqs.items() if not q.removed}
        events = self.core.update(
            np.array(tokens, dtype=np.int32), None if finite is None else np.array(finite, dtype=bool)
        )
        # The sequences the step created: forks of the sampled prompts, in row order.
        forks = {rid: self.core.request_seqs(rid)[n:] for rid, n in known.items()}
        expected = []
        for j, (smp, tok) in enumerate(zip(step.samples, tokens)):
            parent = smp.seq
            if parent in self.finish:  # aborted, stopped or removed since schedule(), or its request failed
                continue
            if finite is not None and not finite[j]:
                expected += self._fail(parent, j)
                continue
            if smp.index != self.index[parent]:  # a new completion: a fork of the prompt
                target = forks[smp.request].pop(0)
                assert target not in self.tokens and target >= 0
                self._new_seq(target, smp.request, smp.index, list(self.tokens[parent]))
            else:
                target = parent
            self._append(target, tok)
            if target in self.finish:
                expected.append(self._event(target, j, len(self.text[target].encode())))
            elif self.reqs[smp.request].report_tokens:
                expected.append(self._event(target, j, self._stable_len(target)))
        assert all(not new for new in forks.values())
        assert events == expected
        for row in step.rows:  # what the step computed is in the cache now
            if row.seq not in self.finish:
                assert self.core.seq_info(row.seq)["num_computed"] == row.ctx
        for s in self.active:
            req = self.reqs[self.seq_req[s]]
            assert self.core.output_tokens(s) == self.tokens[s][len(req.prompt) :]
        self.check()
        return events

    def _append(self, s: int, tok: int) -> None:
        """A token for s, and what it does to s: end-of-text, stop tokens, its text, stop strings, lengths."""
        toks = self.tokens[s]
        toks.append(tok)
        req = self.reqs[self.seq_req[s]]
        if tok in self.eos and not req.ignore_eos:
            return self._end(s, STOP)
        if tok in req.stop_token_ids:
            return self._end(s, STOP, tok)
        if self.vocab is not None and tok < len(self.vocab) and tok not in self.special:
            self.text[s] += self.decoder[s].decode(self.vocab[tok])
            hits = [(self.text[s].find(x), k) for k, x in enumerate(req.stop) if x in self.text[s]]
            if hits:
                at, self.stop_string[s] = min(hits)
                self.text[s] = self.text[s][:at]
                self.finish[s] = (STOP, -1)
                return
        if len(toks) - len(req.prompt) >= req.max_tokens or len(toks) >= self.cfg.max_model_len:
            self._end(s, LENGTH)

    def _end(self, s: int, code: int, stop_token: int = -1) -> None:
        """s finishes with its text whole: bytes of a character still incomplete become U+FFFD."""
        self.text[s] += self.decoder[s].decode(b"", final=True)
        self.finish[s] = (code, stop_token)

    def _fail(self, s: int, row: int) -> list[tuple]:
        """Row `row` of s had non-finite logits: every unfinished sequence of its request ends in an error."""
        req = self.reqs[self.seq_req[s]]
        events = []
        for x in [s] + [x for x in req.seqs if x != s]:
            if x not in self.finish:
                self._end(x, ERROR)
                events.append(self._event(x, row if x == s else -1, len(self.text[x].encode())))
        return events

    def _stable_len(self, s: int) -> int:
        """The bytes of s's text no later token can cut: all but a stop string's length less one, whole characters."""
        data = self.text[s].encode()
        stops = self.reqs[self.seq_req[s]].stop
        if not stops:
            return len(data)
        n = max(0, len(data) - (max(len(x.encode()) for x in stops) - 1))
        while 0 < n < len(data) and data[n] & 0xC0 == 0x80:  # a continuation byte: inside a character
            n -= 1
        return n

    def _event(self, s: int, row: int, end: int) -> tuple:
        """The event update() owes s: its text from what it reported up to `end`."""
        data = self.text[s].encode()
        assert len(self.reported[s]) <= end <= len(data) and data.startswith(self.reported[s])
        new = data[len(self.reported[s]) : end]
        self.reported[s] += new
        code = self.finish.get(s, (NOT_FINISHED, -1))[0]
        return (s, self.seq_req[s], self.index[s], row, code, new)

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
    h = Harness(**config, vocab=random_vocab(rng), bind_seed=seed)
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
            host_sampled=rng.random() < 0.2,
            report_tokens=rng.random() < 0.5,
            stop=tuple(random_stops(rng)) if rng.random() < 0.5 else (),
            prompt_logprobs=rng.random() < 0.25,
        )

    def token() -> int:
        x = rng.random()
        if x < 0.03:
            return EOS
        if x < 0.06:
            return rng.choice(stop_ids)
        return rng.randrange(6, VOCAB)

    def interrupt():
        """What Python may do between two calls: abort, remove, or stop a sequence on a pattern of its own."""
        x = rng.random()
        if x < 0.01 and h.unfinished():
            h.stop(rng.choice(sorted(h.unfinished())))
        elif x < 0.03 and h.unfinished_requests():
            rid = rng.choice(h.unfinished_requests())
            h.abort(rid) if rng.random() < 0.5 else h.remove(rid)

    def step(may_interrupt: bool):
        st = h.schedule()
        if may_interrupt:
            interrupt()  # between schedule() and update()
        finite = [rng.random() > 0.01 for _ in st.samples] if may_interrupt else None
        h.update([token() for _ in st.samples], finite)

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
        codes = [code for code, _ in h.finish.values()]
        for code in (STOP, LENGTH, ABORT, ERROR):
            totals[code] += codes.count(code)
    if name == "small-cache":
        assert totals["preemptions"] > 0 and totals["prefix_hit_tokens"] > 0 and totals["block_copies"] > 0
    assert all(totals[code] > 0 for code in (STOP, LENGTH, ABORT, ERROR)), dict(totals)


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
    r0 = h.add(_prompt(rng, 20), n=3, max_tokens=4, ignore_eos=True, report_tokens=True)
    r1 = h.add(_prompt(rng, 10), max_tokens=4, ignore_eos=True, report_tokens=True)
    st = h.schedule()
    assert st.info.num_samples == 4
    h.abort(r0)
    events = h.update([30, 31, 32, 33])  # r0's three rows go nowhere; r1's token lands
    (s1,) = h.reqs[r1].seqs
    assert events == [(s1, r1, 0, 3, NOT_FINISHED, b"")]  # nothing for rows 0-2
    assert h.core.request_seqs(r0) == h.reqs[r0].seqs and len(h.reqs[r0].seqs) == 1
    assert h.core.output_tokens(s1) == [33]
    st = h.schedule()
    h.remove(r1)
    assert h.update([40] * len(st.samples)) == []
    assert not h.core.has_unfinished()
    assert h.pool.num_free == h.pool.num_blocks


def test_stop_from_outside_ends_the_sequence_without_an_event():
    """stop(): Python matched a stop pattern of its own; it knows, so update() says nothing of it."""
    h = Harness(num_blocks=32, block_size=16, max_num_seqs=4, max_model_len=128, vocab=random_vocab(random.Random(4)))
    rng = random.Random(11)
    r0 = h.add(_prompt(rng, 20), n=2, max_tokens=8, ignore_eos=True, report_tokens=True)
    r1 = h.add(_prompt(rng, 10), max_tokens=8, ignore_eos=True, report_tokens=True)
    h.step(tokens=[10, 11, 12])
    a, b = h.reqs[r0].seqs
    (c,) = h.reqs[r1].seqs
    st = h.schedule()
    h.stop(a)  # between schedule() and update(): its row goes nowhere
    assert h.core.seq_info(a)["finish"] == STOP and h.core.seq_info(a)["blocks"] == []
    events = h.update([20 + j for j in range(len(st.samples))])
    assert sorted(e[0] for e in events) == sorted([b, c]) and all(e[4] == NOT_FINISHED for e in events)
    assert h.core.output_tokens(a) == [h.core.output_tokens(a)[0]]  # the one token it had
    h.stop(c)  # between update() and schedule()
    h.run_until_done()
    assert h.finish[b] == (LENGTH, -1)
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


def test_update_refuses_a_finite_mask_of_another_length():
    h = Harness(num_blocks=16, block_size=16, max_num_seqs=4, max_model_len=64)
    h.add([1, 2, 3], n=2)
    st = h.schedule()
    assert st.info.num_samples == 2
    with pytest.raises(ValueError, match="finite"):
        h.core.update(np.array([5, 6], dtype=np.int32), np.ones(3, dtype=bool))
    h.pending = st
    h.update([5, 6], [True, True])  # the refused call changed nothing
    st = h.schedule()
    events = h.core.update(np.array([7, 8], dtype=np.int32), np.array([1, 1], dtype=np.uint8))  # uint8 works too
    assert events == []


def test_bad_configs_are_refused():
    base = dict(num_blocks=8, block_size=16, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    for change in (
        dict(num_blocks=7),  # one sequence of max_model_len tokens must fit
        dict(max_num_batched_tokens=3),  # a decode token for every row
        dict(max_samples=3),  # a sampled row for every row
        dict(max_samples=-1),
        dict(max_num_seqs=0),
        dict(max_model_len=0),
        dict(block_size=0),  # refused before anything divides by it
        dict(block_size=-16),
    ):
        with pytest.raises(ValueError):
            Harness(**{**base, **change})
    h = Harness(**base)
    assert h.core.max_blocks_per_seq == 8


def test_finish_reasons_are_exported():
    assert _C.FINISH_REASONS == {1: "stop", 2: "length", 3: "abort", 4: "error"}
    assert _C.NOT_FINISHED == 0


# ----------------------------------------------------------------------------- step fields and binding

FIELD_NAMES = [
    "input_ids", "positions", "slot_mapping", "query_start_loc", "context_lens", "block_tables", "logits_indices",
    "temperature", "top_k", "top_p", "sample_index", "sample_request", "host_sampled_rows", "prompt_logits_indices", "prompt_logits_request",
    "prompt_logits_position", "spec_token", "row_kept", "copy_src", "copy_dst",
]  # fmt: skip


def _scheduler(max_samples: int = 0, **kwargs) -> "_C.Scheduler":
    c = _C.SchedulerConfig()
    c.num_blocks, c.block_size, c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len = 16, 8, 3, 40, 60
    c.max_samples = max_samples
    for k, v in kwargs.items():
        setattr(c, k, v)
    return _C.Scheduler(c)


@pytest.mark.parametrize("max_samples", [0, 3, 7])
def test_step_fields_follow_the_config(max_samples):
    core = _scheduler(max_samples)
    T, R, B = 40, 3, 8  # tokens, rows, ceil(60 / 8) blocks per sequence
    S = max_samples or 2 * R  # by default a row per sequence and as many for n-sample forks
    assert core.config.max_samples == S
    expected = {
        "input_ids": ("int64", (T,), "num_tokens", 0, True),
        "positions": ("int64", (T,), "num_tokens", 0, True),
        "slot_mapping": ("int64", (T,), "num_tokens", 0, True),
        "query_start_loc": ("int32", (R + 1,), "num_rows", 1, True),
        "context_lens": ("int32", (R,), "num_rows", 0, True),
        "block_tables": ("int32", (R, B), "num_rows", 0, True),
        "logits_indices": ("int64", (S,), "num_samples", 0, True),
        "temperature": ("float32", (S,), "num_samples", 0, True),
        "top_k": ("int32", (S,), "num_samples", 0, True),
        "top_p": ("float32", (S,), "num_samples", 0, True),
        "sample_index": ("int32", (S,), "num_samples", 0, False),
        "sample_request": ("int64", (S,), "num_samples", 0, False),
        "host_sampled_rows": ("int32", (S,), "num_host_sampled", 0, False),
        "prompt_logits_indices": ("int64", (S,), "num_prompt_logits", 0, True),
        "prompt_logits_request": ("int64", (S,), "num_prompt_logits", 0, False),
        "prompt_logits_position": ("int32", (S,), "num_prompt_logits", 0, False),
        "spec_token": ("int32", (S,), "num_samples", 0, False),
        "row_kept": ("int32", (S,), "num_samples", 0, False),
        "copy_src": ("int64", (R,), "num_copies", 0, False),
        "copy_dst": ("int64", (R,), "num_copies", 0, False),
    }
    fields = core.step_fields()
    assert [f[0] for f in fields] == FIELD_NAMES
    assert {f[0]: tuple(f[1:]) for f in fields} == expected
    info = _C.StepInfo()
    for _, _, _, count, _, _ in fields:
        assert isinstance(getattr(info, count), int)


def _arrays(core) -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, DTYPES[dtype]) for name, dtype, shape, *_ in core.step_fields()}


def _break(arrays: dict, how: str, name: str) -> None:
    a = arrays[name]
    if how == "missing":
        del arrays[name]
    elif how == "dtype":
        arrays[name] = a.astype(np.int32 if a.dtype != np.int32 else np.int64)
    elif how == "short":
        arrays[name] = a.reshape(-1)[:-1].copy()
    elif how == "strided":
        arrays[name] = np.zeros(2 * a.size, a.dtype)[::2]
    elif how == "read-only":
        a.setflags(write=False)
    elif how == "not-an-array":
        arrays[name] = a.tolist()


@pytest.mark.parametrize("how", ["missing", "dtype", "short", "strided", "read-only", "not-an-array"])
def test_bind_refuses_a_bad_field_naming_it(how, fresh_seed):
    core = _scheduler()
    name = random.Random(fresh_seed).choice(FIELD_NAMES)
    arrays = _arrays(core)
    _break(arrays, how, name)
    with pytest.raises(ValueError, match=name):
        core.bind(arrays)
    core.add_request([1, 2, 3], _C.RequestConfig())
    with pytest.raises(RuntimeError):
        core.schedule()  # nothing was bound


def test_bind_refuses_an_unknown_name():
    core = _scheduler()
    arrays = _arrays(core)
    arrays["sample_seq"] = np.zeros(6, np.int64)
    with pytest.raises(ValueError, match="sample_seq"):
        core.bind(arrays)


def test_a_refused_bind_keeps_the_buffers_bound_before():
    core = _scheduler()
    arrays = _arrays(core)
    core.bind(arrays)
    bad = _arrays(core)
    _break(bad, "short", "input_ids")
    with pytest.raises(ValueError, match="input_ids"):
        core.bind(bad)
    core.add_request([4, 5, 6], _C.RequestConfig())
    info = core.schedule()
    assert arrays["input_ids"][: info.num_tokens].tolist() == [4, 5, 6]
    assert not bad["positions"].any()


def test_bind_by_name_in_any_order(fresh_seed):
    """A dict in shuffled order binds each array to its own field: a run's metadata checks out."""
    h = Harness(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, bind_seed=fresh_seed)
    rng = random.Random(fresh_seed)
    for _ in range(3):
        h.add(_prompt(rng, rng.randint(2, 20)), n=rng.randint(1, 2), max_tokens=6, host_sampled=rng.random() < 0.5)
    h.run_until_done(rng)
    assert h.pool.num_free == h.pool.num_blocks


def test_bound_arrays_live_as_long_as_the_scheduler_writes_them():
    """A dict made on the fly: the scheduler keeps its arrays alive, whatever else holds them."""
    import gc
    import weakref

    core = _scheduler()
    arrays = _arrays(core)
    ref = weakref.ref(arrays["input_ids"])
    core.bind(arrays)
    del arrays
    gc.collect()
    assert ref() is not None
    core.add_request([7, 8, 9], _C.RequestConfig())
    core.schedule()
    assert ref()[:3].tolist() == [7, 8, 9]


def test_schedule_before_bind_is_refused():
    c = _C.SchedulerConfig()
    c.num_blocks, c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len, c.max_samples = 4, 2, 8, 64, 2
    sched = _C.Scheduler(c)
    sched.add_request([1, 2, 3], _C.RequestConfig())
    with pytest.raises(RuntimeError):
        sched.schedule()


# ----------------------------------------------------------------------------- events and text


def test_reported_text_adds_up_to_the_final_text(fresh_seed):
    """report_tokens: each sequence's event bytes, joined, are its final text, and what Python decodes."""
    rng = random.Random(fresh_seed)
    vocab = random_vocab(rng)
    h = Harness(num_blocks=64, block_size=4, max_num_seqs=6, max_num_batched_tokens=32, vocab=vocab, eos=())
    for k in range(8):
        stop = ("a",) if k == 0 else tuple(random_stops(rng))  # "a": one of the eight characters, soon seen
        max_tokens = 40 if k == 0 else rng.randint(1, 40)
        h.add(
            _prompt(rng, rng.randint(1, 12)), n=rng.randint(1, 3), max_tokens=max_tokens, report_tokens=True, stop=stop
        )
    while h.core.has_unfinished():
        st = h.schedule()
        h.update([rng.randrange(1, VOCAB) for _ in st.samples])  # no token ends a sequence but by its text
    stopped = 0
    for rid, req in h.reqs.items():
        for s in req.seqs:
            text = h.core.text(s)
            assert h.reported[s] == text == reference_text(vocab, h.core.output_tokens(s), req.stop)
            stopped += h.core.seq_info(s)["stop_string"] >= 0
    assert stopped > 0  # some text was cut at a stop string
    assert h.pool.num_free == h.pool.num_blocks


def test_a_stop_string_is_never_cut_out_of_reported_text():
    """Text is reported only up to where a stop string could still start; the cut lands after it."""
    vocab = [b"<eos>", b"ab", b"c", b"d", "é".encode()[:1], "é".encode()[1:], b"STO", b"P"]
    h = Harness(num_blocks=16, block_size=16, max_model_len=64, vocab=vocab)
    rid = h.add([1, 2, 3], max_tokens=20, report_tokens=True, stop=("cdSTOP", "é"))
    (s,) = h.reqs[rid].seqs
    news = []
    for tok in [1, 2, 3, 6, 4, 1, 2, 3, 6, 7]:
        h.schedule()
        ((seq, req, index, row, finish, new),) = h.update([tok])
        assert (seq, req, index, row) == (s, rid, 0, 0)
        news.append(new)
        if finish:
            break
    # Held back: len("cdSTOP") - 1 = 5 bytes, and never part of a character. "\xc3" then "a" is invalid:
    # U+FFFD (3 bytes) at 7. The stop string completes at 12, right where the reported text ends.
    fffd = "\ufffd".encode()
    assert news == [b"", b"", b"", b"ab", b"", b"cdSTO", b"", b"", fffd + b"ab", b""]
    assert h.finish[s] == (STOP, -1) and h.core.seq_info(s)["stop_string"] == 0
    assert b"".join(news) == h.core.text(s) == b"abcdSTO" + fffd + b"ab"


def test_requests_without_report_tokens_get_an_event_only_when_they_finish(fresh_seed):
    rng = random.Random(fresh_seed)
    vocab = random_vocab(rng)
    h = Harness(num_blocks=64, block_size=4, max_num_seqs=6, max_num_batched_tokens=32, vocab=vocab, eos=())
    quiet = h.add(_prompt(rng, 5), n=2, max_tokens=6)
    loud = h.add(_prompt(rng, 7), max_tokens=9, report_tokens=True)
    seen = defaultdict(list)  # request -> the finish code of each of its events
    while h.core.has_unfinished():
        st = h.schedule()
        for seq, rid, index, row, finish, new in h.update([rng.randrange(6, VOCAB) for _ in st.samples]):
            assert st.samples[row].request == rid
            seen[rid].append(finish)
    assert seen[quiet] == [LENGTH, LENGTH]  # its two samples, each when it ends
    assert seen[loud] == [NOT_FINISHED] * 8 + [LENGTH]
    for rid in (quiet, loud):
        for s in h.reqs[rid].seqs:
            assert h.reported[s] == h.core.text(s) == reference_text(vocab, h.core.output_tokens(s), [])


# ----------------------------------------------------------------------------- non-finite logits


def test_a_non_finite_row_ends_its_request_with_an_error():
    """n=2 with its fork waiting for a row: the row's sequence and the waiting fork end; the others go on."""
    vocab = random_vocab(random.Random(12))
    h = Harness(num_blocks=32, block_size=4, max_num_seqs=2, max_model_len=64, vocab=vocab)
    rng = random.Random(13)
    other = h.add(_prompt(rng, 6), max_tokens=5, ignore_eos=True)
    bad = h.add(_prompt(rng, 9), n=2, max_tokens=5, ignore_eos=True)
    h.step(tokens=[30, 31, 32])
    s0, fork = h.reqs[bad].seqs
    assert h.core.seq_info(s0)["running"] and h.core.seq_info(fork)["waiting"]  # two rows: no room for the fork
    free_before = h.pool.num_free
    s0_blocks = len(h.core.seq_info(s0)["blocks"])
    st = h.schedule()
    rows = {x.seq: j for j, x in enumerate(st.samples)}
    finite = [x.seq != s0 for x in st.samples]
    events = h.update([40, 41], finite)
    text0 = h.core.text(s0)
    assert events == [(s0, bad, 0, rows[s0], ERROR, text0), (fork, bad, 1, -1, ERROR, h.core.text(fork))]
    # No token appended: each holds the one it had (a character left incomplete becomes U+FFFD).
    assert sorted(h.core.output_tokens(s0) + h.core.output_tokens(fork)) == [31, 32]
    for s in (s0, fork):
        assert h.core.text(s) == reference_text(vocab, h.core.output_tokens(s), [])
    assert [h.core.seq_info(s)["finish"] for s in (s0, fork)] == [ERROR, ERROR]
    new_blocks = h.pool.num_free - free_before  # the other request's decode may have taken one
    assert new_blocks in (s0_blocks, s0_blocks - 1)
    (o,) = h.reqs[other].seqs
    assert h.core.output_tokens(o)[-1] == 40  # the other request took its token
    h.run_until_done()
    assert h.finish[o] == (LENGTH, -1)
    assert h.pool.num_free == h.pool.num_blocks
    h.core.check()


def test_a_non_finite_row_of_a_forking_prompt_ends_every_sample():
    """The rows of an n-sample prompt: forks made before the bad row end too; later rows are skipped."""
    vocab = random_vocab(random.Random(14))
    h = Harness(num_blocks=32, block_size=4, max_num_seqs=8, max_model_len=64, vocab=vocab)
    rng = random.Random(15)
    rid = h.add(_prompt(rng, 6), n=3, max_tokens=5, ignore_eos=True, report_tokens=True)
    other = h.add(_prompt(rng, 6), max_tokens=5, ignore_eos=True, report_tokens=True)
    st = h.schedule()
    assert [x.request for x in st.samples] == [rid, rid, rid, other]
    events = h.update([20, 21, 22, 23], [True, False, True, True])
    s0, f1 = h.reqs[rid].seqs  # row 0 forked f1; row 1 failed; row 2 (s0's own) went nowhere
    (o,) = h.reqs[other].seqs
    assert [e[:5] for e in events] == [
        (f1, rid, 1, 0, NOT_FINISHED),
        (s0, rid, 0, 1, ERROR),
        (f1, rid, 1, -1, ERROR),
        (o, other, 0, 3, NOT_FINISHED),
    ]
    assert h.core.output_tokens(f1) == [20] and h.core.output_tokens(s0) == [] and h.core.output_tokens(o) == [23]
    assert h.reported[f1] == h.core.text(f1) == reference_text(vocab, [20], [])
    h.run_until_done()
    assert h.pool.num_free == h.pool.num_blocks


def test_engine_facade_hands_out_views_of_the_bound_buffers():
    """fastcodegen.scheduler.Scheduler: buffers allocated from the native table and bound by name."""
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
    rid = sched.add(prompt, SamplingParams(n=2, max_tokens=2, ignore_eos=True, seed=3), report_tokens=False)
    step = sched.schedule()
    assert step.input_ids.tolist() == prompt and step.positions.tolist() == list(range(20))
    assert step.query_start_loc.tolist() == [0, 20] and step.context_lens.tolist() == [20]
    table = step.block_tables[0, :2].tolist()
    assert step.slot_mapping.tolist() == [table[p // 16] * 16 + p % 16 for p in range(20)]
    assert step.logits_indices.tolist() == [19, 19]
    assert sorted(step.sample_index.tolist()) == [0, 1] and step.sample_request.tolist() == [rid, rid]
    assert step.host_sampled_rows.tolist() == [0, 1]  # seeded: the engine samples these rows itself
    assert len(step.copy_src) == 0
    assert sched.update(np.array([7, 8], dtype=np.int32), np.ones(2, dtype=bool)) == []
    step = sched.schedule()
    assert step.is_decode and step.num_rows == 2 and len(step.copy_src) == 1
    events = sched.update(np.array([9, 9], dtype=np.int32), np.ones(2, dtype=bool))
    seqs = sorted(e[0] for e in events)
    assert len(seqs) == 2 and all(e[1] == rid and e[4] == LENGTH for e in events)
    assert sorted(sched.output_tokens(s) for s in seqs) == [[7, 9], [8, 9]]
    assert sched.num_free_blocks == 8
