"""The prefix cache of the native KV block pool (`fastcodegen._C.BlockPool`), `chain_hash`, and `Utf8Decoder`.

Explicit checks of the documented contract (publish / lookup, collisions
rejected by the stored tokens and parent, evictable blocks counted as free,
plain free blocks handed out before cached ones, eviction least recently
freed first, clear_cache); a hypothesis state machine running random
allocate / incref / decref / release / publish / lookup / clear_cache
sequences against a plain Python model of the reference counts, the free
stack, the LRU order of evictable blocks and the cache's contents; and the
incremental UTF-8 decoder against Python's own incremental decoder with
errors="replace", fed the same chunks.
"""

from __future__ import annotations

import codecs

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fastcodegen._C import BlockPool, Utf8Decoder, chain_hash

ROOT = (0, 0)  # the parent hash of a prompt's first block


def _publish_chain(pool: BlockPool, blocks: list[int], tokens: list[int]) -> list[tuple[int, int]]:
    """Publishes held `blocks` as the consecutive full blocks of `tokens`; their hashes."""
    bs = pool.block_size
    hashes, parent = [], ROOT
    for i, b in enumerate(blocks):
        chunk = tokens[i * bs : (i + 1) * bs]
        h = chain_hash(parent, chunk)
        pool.publish(b, parent, h, chunk)
        hashes.append(h)
        parent = h
    return hashes


# ----------------------------------------------------------------------------- publish / lookup


def test_publish_then_lookup_hits_and_takes_a_holder():
    pool = BlockPool(4, 4)
    b = pool.allocate()
    toks = [5, 6, 7, 8]
    h = chain_hash(ROOT, toks)
    pool.publish(b, ROOT, h, toks)
    assert pool.is_cached(b) and pool.num_cached == 1
    assert pool.refcount(b) == 1
    assert pool.lookup(ROOT, h, toks) == b
    assert pool.refcount(b) == 2
    assert pool.lookup(ROOT, h, toks) == b
    assert pool.refcount(b) == 3
    # Held blocks are not evictable, whatever they hold.
    assert pool.num_evictable == 0 and pool.num_free == 3
    pool.check()


def test_lookup_of_a_collision_or_an_unknown_hash_misses():
    pool = BlockPool(4, 4)
    b0, b1 = pool.allocate(), pool.allocate()
    t0, t1 = [1, 2, 3, 4], [9, 9, 9, 9]
    h0 = chain_hash(ROOT, t0)
    pool.publish(b0, ROOT, h0, t0)
    h1 = chain_hash(h0, t1)
    pool.publish(b1, h0, h1, t1)
    before = [pool.refcount(b) for b in range(4)]
    # Same hash, other tokens: a collision, not this prefix.
    assert pool.lookup(ROOT, h0, [1, 2, 3, 5]) == -1
    assert pool.lookup(ROOT, h0, [4, 3, 2, 1]) == -1
    # Same hash and tokens, another parent.
    assert pool.lookup((1, 0), h0, t0) == -1
    assert pool.lookup(ROOT, h1, t1) == -1  # b1's tokens, but it follows b0, not the root
    # A hash nobody published.
    assert pool.lookup(ROOT, chain_hash(ROOT, [4, 4, 4, 4]), [4, 4, 4, 4]) == -1
    assert pool.lookup(ROOT, (123, 456), t0) == -1
    assert [pool.refcount(b) for b in range(4)] == before
    # The real chain still hits.
    assert pool.lookup(h0, h1, t1) == b1
    assert pool.lookup(ROOT, h0, t0) == b0
    pool.check()


def test_publish_is_first_come_and_needs_a_held_full_block():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(), pool.allocate()
    toks = [3, 4]
    h = chain_hash(ROOT, toks)
    pool.publish(a, ROOT, h, toks)
    pool.publish(b, ROOT, h, toks)  # the same prefix computed twice: the first one stays
    assert pool.is_cached(a) and not pool.is_cached(b) and pool.num_cached == 1
    # A block already cached keeps its first hash.
    other = [7, 7]
    pool.publish(a, ROOT, chain_hash(ROOT, other), other)
    assert pool.num_cached == 1 and pool.lookup(ROOT, chain_hash(ROOT, other), other) == -1
    assert pool.lookup(ROOT, h, toks) == a
    with pytest.raises(ValueError):
        pool.publish(3, ROOT, chain_hash(ROOT, other), other)  # not held
    with pytest.raises(ValueError):
        pool.publish(b, ROOT, h, [1, 2, 3])  # not one block of tokens
    with pytest.raises(ValueError):
        pool.lookup(ROOT, h, [3])
    pool.check()


# ----------------------------------------------------------------------------- eviction


def test_freed_cached_block_is_evictable_and_revived_by_lookup():
    pool = BlockPool(3, 2)
    b = pool.allocate()
    toks = [1, 2]
    h = chain_hash(ROOT, toks)
    pool.publish(b, ROOT, h, toks)
    assert pool.num_free == 2 and pool.num_evictable == 0
    assert pool.decref(b) is True
    assert pool.refcount(b) == 0
    assert pool.num_free == 3  # allocatable...
    assert pool.num_evictable == 1  # ...though it still holds its prefix
    assert pool.num_cached == 1 and pool.is_cached(b)
    pool.check()
    assert pool.lookup(ROOT, h, toks) == b
    assert pool.refcount(b) == 1
    assert pool.num_evictable == 0 and pool.num_free == 2 and pool.num_cached == 1
    pool.check()


def test_plain_free_blocks_go_before_cached_ones():
    pool = BlockPool(4, 2)
    held = pool.allocate_many(4)
    hashes = _publish_chain(pool, held[:2], [1, 2, 3, 4])
    pool.release(held)  # 3, 2 to the free stack; 1, 0 evictable
    assert pool.num_free == 4 and pool.num_evictable == 2
    assert sorted([pool.allocate(), pool.allocate()]) == [2, 3]
    assert pool.num_evictable == 2 and pool.num_cached == 2
    assert pool.lookup(ROOT, hashes[0], [1, 2]) == held[0]
    pool.check()


def test_eviction_takes_the_least_recently_freed_first():
    bs = 2
    pool = BlockPool(6, bs)
    blocks = pool.allocate_many(6)
    # Six unrelated one-block prefixes.
    content = {b: [10 * b + 1, 10 * b + 2] for b in blocks}
    hashes = {b: chain_hash(ROOT, content[b]) for b in blocks}
    for b in blocks:
        pool.publish(b, ROOT, hashes[b], content[b])
    order = [4, 1, 5, 0, 3, 2]  # the order they are let go
    for b in order:
        pool.decref(b)
    assert pool.num_evictable == 6 and pool.num_free == 6
    # A lookup revives 5; freeing it again makes it the most recent.
    assert pool.lookup(ROOT, hashes[5], content[5]) == 5
    pool.decref(5)
    expected = [4, 1, 0, 3, 2, 5]
    got = []
    for k, b in enumerate(expected):
        got.append(pool.allocate())
        assert got[-1] == b
        # Evicted: out of the cache for good, even once freed again.
        assert not pool.is_cached(b)
        assert pool.num_cached == 6 - k - 1 and pool.num_evictable == 6 - k - 1
        assert pool.lookup(ROOT, hashes[b], content[b]) == -1
        pool.check()
    assert got == expected
    with pytest.raises(RuntimeError):
        pool.allocate()
    pool.release(got)
    assert pool.num_free == 6 and pool.num_evictable == 0 and pool.num_cached == 0
    pool.check()


def test_evicted_block_can_be_published_again_under_another_prefix():
    pool = BlockPool(1, 2)
    b = pool.allocate()
    h1 = chain_hash(ROOT, [1, 1])
    pool.publish(b, ROOT, h1, [1, 1])
    pool.decref(b)
    assert pool.allocate() == b  # evicts it
    h2 = chain_hash(ROOT, [2, 2])
    pool.publish(b, ROOT, h2, [2, 2])
    assert pool.num_cached == 1
    assert pool.lookup(ROOT, h1, [1, 1]) == -1
    assert pool.lookup(ROOT, h2, [2, 2]) == b and pool.refcount(b) == 2
    pool.check()


def test_clear_cache_frees_evictable_blocks_and_forgets_every_hash():
    pool = BlockPool(5, 2)
    blocks = pool.allocate_many(4)
    toks = [1, 2, 3, 4, 5, 6, 7, 8]
    hashes = _publish_chain(pool, blocks, toks)
    pool.release(blocks[2:])  # 3 and 2 evictable, 0 and 1 held and cached
    assert pool.num_evictable == 2 and pool.num_cached == 4 and pool.num_free == 3
    pool.clear_cache()
    pool.check()
    assert pool.num_cached == 0 and pool.num_evictable == 0 and pool.num_free == 3
    assert not any(pool.is_cached(b) for b in range(5))
    assert [pool.refcount(b) for b in range(5)] == [1, 1, 0, 0, 0]
    for i, h in enumerate(hashes):
        parent = ROOT if i == 0 else hashes[i - 1]
        assert pool.lookup(parent, h, toks[2 * i : 2 * i + 2]) == -1
    # Held blocks kept their holders; letting go of them now frees them outright.
    pool.release(blocks[:2])
    assert pool.num_free == 5 and pool.num_evictable == 0
    pool.check()


# ----------------------------------------------------------------------------- chain_hash


def test_chain_hash_is_deterministic_and_covers_every_token_its_order_and_the_parent():
    toks = list(range(100, 116))
    h = chain_hash(ROOT, toks)
    assert isinstance(h, tuple) and len(h) == 2
    assert all(isinstance(x, int) and 0 <= x < 2**64 for x in h)
    assert chain_hash(ROOT, list(toks)) == h
    assert chain_hash((0, 0), toks) == h
    seen = {h}
    for i in range(len(toks)):
        for delta in (1, -1, 1 << 20):
            changed = list(toks)
            changed[i] += delta
            seen.add(chain_hash(ROOT, changed))
    assert len(seen) == 1 + 3 * len(toks)
    for i in range(len(toks) - 1):
        swapped = list(toks)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        assert chain_hash(ROOT, swapped) != h
    assert chain_hash(ROOT, toks[::-1]) != h
    parents = [ROOT, (1, 0), (0, 1), h, chain_hash(h, toks)]
    assert len({chain_hash(p, toks) for p in parents}) == len(parents)
    # A chain of two blocks is not the hash of their concatenation in one.
    assert chain_hash(chain_hash(ROOT, toks[:8]), toks[8:]) != chain_hash(ROOT, toks)
    # Nor does a token shift between blocks go unnoticed.
    assert chain_hash(chain_hash(ROOT, [1, 2]), [3, 4]) != chain_hash(chain_hash(ROOT, [1]), [2, 3, 4])


@settings(max_examples=100, deadline=None, database=None)
@given(
    toks=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=32),
    parent=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    data=st.data(),
)
def test_chain_hash_changes_with_any_one_token(toks, parent, data):
    h = chain_hash(parent, toks)
    assert chain_hash(parent, toks) == h
    i = data.draw(st.integers(0, len(toks) - 1))
    new = data.draw(st.integers(0, 2**31 - 1).filter(lambda t: t != toks[i]))
    changed = toks[:i] + [new] + toks[i + 1 :]
    assert chain_hash(parent, changed) != h
    other = data.draw(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)).filter(lambda p: p != parent))
    assert chain_hash(other, toks) != h


# ----------------------------------------------------------------------------- property-based


class PrefixCacheMachine(RuleBasedStateMachine):
    """The pool against a Python model.

    refs: refcounts; free: the free stack (top = next handed out); lru: the
    evictable blocks, least recently freed first; cache: hash -> (block,
    parent, tokens); cached_hash: block -> its hash while it is cached.
    """

    @initialize(n=st.integers(min_value=1, max_value=6), bs=st.sampled_from([1, 2, 3]))
    def setup(self, n, bs):
        self.n, self.bs = n, bs
        self.pool = BlockPool(n, bs)
        self.refs = [0] * n
        self.free = list(range(n - 1, -1, -1))
        self.lru: list[int] = []
        self.cache: dict[tuple[int, int], tuple[int, tuple[int, int], tuple[int, ...]]] = {}
        self.cached_hash: dict[int, tuple[int, int]] = {}
        self.known_hashes: list[tuple[int, int]] = [ROOT]  # parents to chain from

    def _held(self) -> list[int]:
        return [b for b in range(self.n) if self.refs[b] > 0]

    def _uncache(self, b: int) -> None:
        del self.cache[self.cached_hash.pop(b)]

    def _drop(self, b: int) -> bool:
        self.refs[b] -= 1
        if self.refs[b] > 0:
            return False
        if b in self.cached_hash:
            self.lru.append(b)
        else:
            self.free.append(b)
        return True

    def _tokens(self):
        return st.lists(st.integers(0, 3), min_size=self.bs, max_size=self.bs).map(tuple)

    @rule(k=st.integers(1, 3))
    def allocate(self, k):
        for _ in range(k):
            self._allocate()

    def _allocate(self) -> int | None:
        if self.free:
            expect = self.free.pop()
        elif self.lru:
            expect = self.lru.pop(0)
            self._uncache(expect)
        else:
            with pytest.raises(RuntimeError):
                self.pool.allocate()
            return None
        assert self.pool.allocate() == expect
        assert self.refs[expect] == 0
        self.refs[expect] = 1
        return expect

    @precondition(lambda self: self.refs.count(0) > 0)
    @rule(data=st.data())
    def compute_block(self, data):
        """What a sequence does: takes a block, fills it, publishes it after its parent."""
        b = self._allocate()
        assert b is not None
        self._publish(b, data)

    @precondition(lambda self: any(self.refs))
    @rule(data=st.data())
    def incref(self, data):
        b = data.draw(st.sampled_from(self._held()))
        self.pool.incref(b)
        self.refs[b] += 1

    @precondition(lambda self: any(self.refs))
    @rule(data=st.data())
    def decref(self, data):
        b = data.draw(st.sampled_from(self._held()))
        assert self.pool.decref(b) == self._drop(b)

    @precondition(lambda self: any(self.refs))
    @rule(data=st.data())
    def release(self, data):
        table = data.draw(st.lists(st.sampled_from(self._held()), min_size=1, unique=True))
        self.pool.release(table)
        for b in reversed(table):
            self._drop(b)

    @rule(data=st.data())
    def publish(self, data):
        held = self._held()
        # Mostly held blocks (the only ones that can be published); sometimes any.
        if held and data.draw(st.integers(0, 4)) > 0:
            b = data.draw(st.sampled_from(held))
        else:
            b = data.draw(st.integers(0, self.n - 1))
        self._publish(b, data)

    def _publish(self, b, data):
        parent = data.draw(st.sampled_from(self.known_hashes))
        toks = data.draw(self._tokens())
        if data.draw(st.integers(0, 4)) == 0 and self.cache:
            h = data.draw(st.sampled_from(sorted(self.cache)))  # a colliding hash: ignored
        else:
            h = chain_hash(parent, list(toks))
        if self.refs[b] == 0:
            with pytest.raises(ValueError):
                self.pool.publish(b, parent, h, list(toks))
            return
        self.pool.publish(b, parent, h, list(toks))
        if b not in self.cached_hash and h not in self.cache:
            self.cache[h] = (b, parent, toks)
            self.cached_hash[b] = h
        if h not in self.known_hashes:
            self.known_hashes.append(h)

    @rule(data=st.data())
    def lookup(self, data):
        kind = data.draw(st.sampled_from(["hit", "hit", "hit", "tokens", "parent", "unknown"]))
        if kind != "unknown" and self.cache:
            h = data.draw(st.sampled_from(sorted(self.cache)))
            _, parent, toks = self.cache[h]
            if kind == "tokens":
                toks = data.draw(self._tokens())
            elif kind == "parent":
                parent = data.draw(st.sampled_from(self.known_hashes + [(1, 2)]))
        else:
            parent = data.draw(st.sampled_from(self.known_hashes))
            toks = data.draw(self._tokens())
            h = chain_hash(parent, list(toks))
        entry = self.cache.get(h)
        if entry is not None and entry[1] == parent and entry[2] == toks:
            expect = entry[0]
            if self.refs[expect] == 0:
                self.lru.remove(expect)
            self.refs[expect] += 1
        else:
            expect = -1
        assert self.pool.lookup(parent, h, list(toks)) == expect

    @rule(go=st.integers(0, 5))
    def clear_cache(self, go):
        if go:  # now and then: a cleared cache has little left to test
            return
        self.pool.clear_cache()
        self.free.extend(self.lru)
        self.lru = []
        self.cache.clear()
        self.cached_hash.clear()

    @invariant()
    def matches_model(self):
        p = self.pool
        p.check()
        assert [p.refcount(b) for b in range(self.n)] == self.refs
        assert [b for b in range(self.n) if p.is_cached(b)] == sorted(self.cached_hash)
        assert p.num_free == len(self.free) + len(self.lru) == self.refs.count(0)
        assert p.num_evictable == len(self.lru)
        assert p.num_cached == len(self.cache)
        # The model's own partition: free blocks hold nothing, evictable ones are cached.
        assert not set(self.free) & set(self.cached_hash)
        assert set(self.lru) <= set(self.cached_hash)


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_prefix_cache_state_machine = PrefixCacheMachine.TestCase


# ----------------------------------------------------------------------------- UTF-8


def _char(cp: int) -> bytes:
    return chr(cp).encode("utf-8")


# Pieces of byte strings: whole characters of every length, stray lead and
# continuation bytes, characters cut short, surrogates, overlong forms,
# code points past U+10FFFF, and bytes that never occur in UTF-8.
_valid_char = st.one_of(
    st.integers(0x20, 0x7E),
    st.integers(0x80, 0x7FF),
    st.integers(0x800, 0xD7FF),
    st.integers(0xE000, 0xFFFF),
    st.integers(0x10000, 0x10FFFF),
).map(_char)
_piece = st.one_of(
    _valid_char,
    _valid_char.filter(lambda b: len(b) > 1).flatmap(lambda b: st.integers(1, len(b) - 1).map(lambda k: b[:k])),
    st.integers(0x80, 0xBF).map(lambda c: bytes([c])),
    st.sampled_from([0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xF8, 0xFE, 0xFF]).map(
        lambda c: bytes([c])
    ),
    st.sampled_from(
        [
            b"\xed\xa0\x80",  # U+D800
            b"\xed\xbf\xbf",  # U+DFFF
            b"\xed\xa0",
            b"\xed\x9f\xbf",  # U+D7FF, valid
            b"\xc0\x80",  # overlong NUL
            b"\xc1\xbf",
            b"\xe0\x80\x80",
            b"\xe0\x9f\xbf",
            b"\xe0\xa0\x80",  # U+0800, valid
            b"\xf0\x80\x80\x80",
            b"\xf0\x8f\xbf\xbf",
            b"\xf0\x90\x80\x80",  # U+10000, valid
            b"\xf4\x8f\xbf\xbf",  # U+10FFFF, valid
            b"\xf4\x90\x80\x80",  # past U+10FFFF
            b"\xf5\x80\x80\x80",
            b"\xf7\xbf\xbf\xbf",
            b"\xe2\x82",  # cut short
            b"\xf0\x9f\x98",
            b"\xf0\x9f",
        ]
    ),
    st.binary(min_size=1, max_size=3),
)


@st.composite
def _chunked_bytes(draw):
    data = b"".join(draw(st.lists(_piece, max_size=24)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def _check_against_python(chunks: list[bytes]) -> None:
    """Feeds `chunks` to both decoders, the last one final; what each hands out after each chunk must agree."""
    ours = Utf8Decoder()
    ref = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i, chunk in enumerate(chunks):
        final = i == len(chunks) - 1
        got = ours.decode(chunk, final)
        assert isinstance(got, bytes)
        assert got.decode("utf-8") == ref.decode(chunk, final), (i, chunks)  # valid UTF-8, strictly, and equal


@settings(max_examples=400, deadline=None, database=None)
@given(_chunked_bytes())
def test_utf8_decoder_matches_python_chunk_by_chunk(chunks):
    _check_against_python(chunks)


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(_piece, max_size=12).map(b"".join))
def test_utf8_decoder_byte_by_byte(data):
    _check_against_python([data[i : i + 1] for i in range(len(data))] + [b""])


@pytest.mark.parametrize(
    "chunks",
    [
        [b"\xe4", b"\xb8", b"\xad"],  # held back until complete
        [b"\xe4\xb8", b"a"],  # cut short by ASCII
        [b"\xf0\x9f\x98", b"\x80"],
        [b"\xf0\x9f\x98"],  # cut short at the end
        [b"\xed", b"\xa0\x80"],  # a surrogate across chunks
        [b"\xe0", b"\x80"],  # an overlong across chunks
        [b"\xf4", b"\x90"],
        [b"\xc3", b"\xc3\xa9"],
        [b"\xff\xfe", b""],
        [b"", b""],
    ],
)
def test_utf8_decoder_examples(chunks):
    _check_against_python(chunks)


@pytest.mark.parametrize("chunks", [[b"\xed\xa0", b"\x80"], [b"a\xed\xbf", b"b"], [b"\xed", b"\xa0", b"\x80"]])
def test_utf8_decoder_holds_back_a_truncated_surrogate_like_python(chunks):
    """CPython holds back ED A0..BF at the end of a chunk (for its surrogatepass handler); so does the decoder."""
    _check_against_python(chunks)


def test_utf8_decoder_keeps_going_after_final():
    d = Utf8Decoder()
    assert d.decode(b"\xe2\x82", True) == "\ufffd".encode()
    assert d.decode(b"\xe2\x82\xac", False) == "€".encode()  # nothing left over from before
