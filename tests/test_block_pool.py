"""The KV block pool and its prefix cache (engine/block_pool.py), driven by the scheduler without a
model: a shadow of what every block slot holds checks that no block in use is overwritten, that a
block found in the cache holds exactly the KV its hash names, and that every block is free at
the end."""

import random

from hypothesis import example, given, settings
from hypothesis import strategies as st

from expertmesh.engine.block_pool import BlockPool, chain_hashes, short
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig, Scheduler


def next_token(tokens) -> int:
    """The model of this test: a token fixed by everything before it, so sequences that share a
    prefix also share what they generate."""
    return hash(tuple(tokens)) % 3


class Shadow:
    """slots[block][i]: the tokens whose last one's KV the slot holds (its whole prefix: the KV of
    a token depends on every token before it)."""

    def __init__(self, s: Scheduler):
        self.s, self.bs = s, s.cfg.block_size
        self.slots = [[None] * self.bs for _ in range(s.num_blocks)]
        self.evictions = 0

    def forward(self, chosen) -> None:
        holders = {}
        for seq in [*self.s.running, *self.s.waiting]:
            for b in seq.blocks:
                holders.setdefault(b, []).append(seq)
        for seq, n in chosen:
            assert n >= 1  # a step computes at least one token of each sequence it samples
            for p in range(seq.computed, seq.computed + n):
                b = seq.blocks[p // self.bs]
                want = tuple(seq.tokens[:p + 1])
                # writing into a block another sequence holds: only ever the same KV (never happens
                # at all, as the positions a sequence computes lie past its shared blocks)
                assert holders[b] == [seq], f"block {b} written while held by {len(holders[b])}"
                self.slots[b][p % self.bs] = want
            for p in range(seq.computed + n):  # what attention reads
                assert self.slots[seq.blocks[p // self.bs]][p % self.bs] == tuple(seq.tokens[:p + 1])

    def check_pool(self) -> None:
        pool, held = self.s.pool, {}
        for seq in [*self.s.running, *self.s.waiting]:
            assert len(set(seq.blocks)) == len(seq.blocks)
            for b in seq.blocks:
                held[b] = held.get(b, 0) + 1
        assert [pool.refs[b] for b in range(pool.num_blocks)] == [held.get(b, 0) for b in range(pool.num_blocks)]
        free = pool.free_ids()
        assert sorted(free + list(held)) == list(range(pool.num_blocks))
        for h, b in pool.block_of.items():  # a cached block holds the whole chain its hash names
            assert pool.hash_of[b] == h and all(slot is not None for slot in self.slots[b])
            tokens = self.slots[b][-1]
            assert chain_hashes(tokens, self.bs, self.s.key, [])[-1] == h


@settings(max_examples=150, deadline=None)
@given(block_size=st.integers(1, 5), blocks=st.integers(6, 40), budget=st.integers(1, 24),
       max_seqs=st.integers(1, 6), chunked=st.booleans(), seed=st.integers(0, 2**16))
@example(block_size=2, blocks=8, budget=16, max_seqs=4, chunked=True, seed=1)  # evicts and preempts
def test_random_streams_never_overwrite_a_block_in_use_and_free_every_block(
        block_size, blocks, budget, max_seqs, chunked, seed):
    """Random streams of arrivals (prompts from a few shared prefixes plus suffixes), finishes,
    aborts and evictions (pools small enough to evict and preempt). After every step the counts
    are the holds, free and held blocks are the pool, every cached block holds the chain its hash
    names; every token's KV is read from a slot holding it; at the end every block is free."""
    rng = random.Random(seed)
    s = Scheduler(EngineConfig(block_size=block_size, max_batched_tokens=budget, max_seqs=max_seqs,
                               chunked_prefill=chunked), num_blocks=blocks, key=b"k" * 16)
    shadow = Shadow(s)
    prefixes = [tuple(rng.randrange(3) for _ in range(rng.randint(0, 10))) for _ in range(3)]
    for i in range(60):
        if rng.random() < 0.4:
            prompt = rng.choice(prefixes) + tuple(rng.randrange(3) for _ in range(rng.randint(1, 4)))
            request = Request(i, prompt, max_tokens=rng.randint(1, 6))
            try:
                s.check(request)
                s.add(request)
            except ValueError:
                pass
        if s.running and rng.random() < 0.1:
            s.abort(rng.choice(s.running + list(s.waiting)).request.id)
        chosen = s.schedule()
        shadow.forward(chosen)
        s.finish(chosen, {seq.request.id: next_token(seq.tokens) for seq, n in chosen})
        shadow.check_pool()
    while s.has_work:
        chosen = s.schedule()
        shadow.forward(chosen)
        s.finish(chosen, {seq.request.id: next_token(seq.tokens) for seq, n in chosen})
        shadow.check_pool()
    assert s.pool.num_free == blocks and not any(s.pool.refs)


def test_a_repeated_prompt_computes_only_past_its_cached_full_blocks_and_at_least_one_token():
    s = Scheduler(EngineConfig(block_size=4, max_batched_tokens=64), num_blocks=16, key=b"k" * 16)
    computed = []
    for rid, prompt in [("a", tuple(range(10))), ("b", tuple(range(10))), ("c", tuple(range(8))),
                        ("d", tuple(range(9)) + (99,))]:
        s.add(Request(rid, prompt, max_tokens=1))
        chosen = s.schedule()
        computed.append([(seq.computed, n) for seq, n in chosen])
        s.finish(chosen, {seq.request.id: 5 for seq, _ in chosen})
    # b: 2 full blocks found; c: 8 tokens, all cached, but the last is computed again (block 2 of c is
    # its own copy); d: shares 8 tokens with a, then differs in block 2
    assert computed == [[(0, 10)], [(8, 2)], [(4, 4)], [(8, 2)]]
    assert s.stats().prompt_tokens == 38 and s.stats().cached_tokens == 8 + 4 + 8
    assert s.stats().prompt_computed == 10 + 2 + 4 + 2


def test_free_cached_blocks_are_evicted_plain_ones_first_then_least_recently_freed():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    for block, h in ((a, b"A" * 16), (b, b"B" * 16)):
        pool.register(block, h)
    pool.release([b, a])  # a chain's tail first: b is evicted before a
    pool.release([c])     # plain
    assert pool.num_free == 4 and pool.match([b"A" * 16, b"B" * 16]) == [a, b]
    assert pool.allocate(2) == [c, 3]  # the plain ones
    assert pool.match([b"A" * 16, b"B" * 16]) == [a, b]
    assert pool.allocate(1) == [b] and pool.match([b"A" * 16, b"B" * 16]) == [a]
    assert pool.take_changes() == ([short(b"A" * 16)], [])  # B registered, then evicted: net nothing
    pool.take([a])  # held: never evicted
    assert not pool.can_take([], 1)
    assert pool.evictions == 1  # b alone: plain blocks reused are not evictions (blocks_evicted in stats)


def test_without_caching_nothing_is_found():
    pool = BlockPool(2, caching=False)
    (a,) = pool.allocate(1)
    pool.register(a, b"A" * 16)
    pool.release([a])
    assert pool.match([b"A" * 16]) == [] and pool.take_changes() == ([], [])
