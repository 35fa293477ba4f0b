"""The KV block pool of one data-parallel rank, and its prefix cache.

A block holds the keys and values of `block_size` consecutive tokens of one sequence. The pool
hands out block ids, counts the sequences holding each (its reference count), and remembers which
full blocks hold which tokens: block i of a sequence is named by a hash chained over its parent's
hash, its token ids and the cache key (what else changes the KV: model and dtype),

    hash_i = blake2b(hash_{i-1} || tokens[i*B:(i+1)*B]; key)      16 bytes, hash_{-1} = b""

so equal hashes mean equal prefixes, and a new sequence takes the longest chain of its hashes
that the pool holds (`match`) instead of computing it.

A block is registered (`register`) only once it is full and its KV written, and only if its hash
names no other block yet; a sequence's last, partial block is never shared, and a sequence never
writes into a block it shares (it computes from the first token past its cached blocks). When a
block's count drops to zero it stays cached, free but findable, until the pool needs room: then
free uncached blocks go first, and after them cached ones, least recently freed first (their
hashes forgotten). A block held by a sequence is never handed out.

Rank 0 routes requests from what each pool holds: `take_changes` gives the hashes registered and
evicted since it was last called (a net difference), as 8-byte ints.
"""

from __future__ import annotations

from collections import OrderedDict
from hashlib import blake2b


def cache_key(*parts) -> bytes:
    """A 16-byte key from what changes the KV besides the tokens (e.g. the model config, dtype)."""
    return blake2b(repr(parts).encode(), digest_size=16).digest()


def chain_hashes(tokens, block_size: int, key: bytes, known: list[bytes]) -> list[bytes]:
    """`known` (the hashes of the first blocks of `tokens`) extended with one hash per further
    full block of `tokens`; returns `known`, extended in place."""
    for i in range(len(known), len(tokens) // block_size):
        block = tokens[i * block_size:(i + 1) * block_size]
        data = (known[-1] if known else b"") + b"".join(t.to_bytes(8, "little") for t in block)
        known.append(blake2b(data, key=key, digest_size=16).digest())
    return known


def short(h: bytes) -> int:
    """The 8-byte int by which rank 0 knows a block hash (a routing hint, never a KV lookup)."""
    return int.from_bytes(h[:8], "little")


class BlockPool:
    """`num_blocks` block ids. `caching`: False keeps no hash at all (every freed block is plain)."""

    def __init__(self, num_blocks: int, caching: bool = True):
        self.num_blocks, self.caching = num_blocks, caching
        self.refs = [0] * num_blocks
        self.plain: list[int] = list(range(num_blocks - 1, -1, -1))  # free, uncached: pop() gives 0 first
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # free, cached: oldest first
        self.hash_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.added: set[int] = set()
        self.evicted: set[int] = set()
        self.evictions = 0  # cached blocks evicted, ever

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out (cached free ones included: they are evicted)."""
        return len(self.plain) + len(self.cached_free)

    @property
    def num_cached(self) -> int:
        return len(self.block_of)

    def free_ids(self) -> list[int]:
        return self.plain + list(self.cached_free)

    def match(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest leading run of `hashes` that the pool holds."""
        blocks = []
        for h in hashes if self.caching else ():
            b = self.block_of.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def can_take(self, cached: list[int], new: int) -> bool:
        """Whether `take(cached)` and then `allocate(new)` fit: a cached block nobody holds leaves
        the free blocks when taken."""
        return new + sum(self.refs[b] == 0 for b in cached) <= self.num_free

    def take(self, cached: list[int]) -> None:
        """Hold blocks found by `match`."""
        for b in cached:
            if self.refs[b] == 0:
                del self.cached_free[b]
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int]:
        """`n` blocks for new KV (the caller checked `num_free`): plain ones first, then cached
        ones, least recently freed first, each evicted from the cache."""
        out = []
        for _ in range(n):
            if self.plain:
                b = self.plain.pop()
            else:
                b, _ = self.cached_free.popitem(last=False)
                self._forget(b)
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one hold on each of `blocks`, given last first (so a chain's tail is evicted
        before its head: the head is the part more sequences share)."""
        for b in blocks:
            self.refs[b] -= 1
            assert self.refs[b] >= 0, f"block {b} released more often than held"
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.cached_free[b] = None
                else:
                    self.plain.append(b)

    def register(self, block: int, h: bytes) -> None:
        """`block` is full and holds the KV of the chain named `h`: find it by `h` from now on,
        unless another block already holds that chain."""
        if not self.caching or h in self.block_of or block in self.hash_of:
            return
        self.block_of[h], self.hash_of[block] = block, h
        self._note(short(h), self.added, self.evicted)

    def take_changes(self) -> tuple[list[int], list[int]]:
        """(hashes registered, hashes evicted) since the last call, as `short` ints, net: a hash
        registered and then evicted in between appears in neither."""
        added, evicted = sorted(self.added), sorted(self.evicted)
        self.added, self.evicted = set(), set()
        return added, evicted

    def _forget(self, b: int) -> None:
        h = self.hash_of.pop(b)
        self.evictions += 1
        del self.block_of[h]
        self._note(short(h), self.evicted, self.added)

    @staticmethod
    def _note(h: int, into: set, undo: set) -> None:
        if h in undo:
            undo.discard(h)
        else:
            into.add(h)
