"""What one data-parallel rank computes at each engine step: continuous batching over a paged
KV cache.

A `Sequence` is a request in flight: its tokens (prompt, then generated), how many of them have
their keys and values in the cache (`computed`), and its block table. Each step the scheduler
picks, under a token budget (`max_batched_tokens`) and a cap on running sequences (`max_seqs`):

  1. running sequences, oldest first: the rest of their prompt (in chunks if `chunked_prefill`)
     or one decode token; when the pool has no block for one, the newest running sequence is
     preempted (its blocks freed, its tokens kept, requeued in arrival order to be recomputed);
  2. then waiting sequences in arrival order (FCFS), admitted while their first chunk's blocks
     are free; the first that does not fit stops admission, so none is overtaken. An admitted
     sequence first takes the longest chain of its full blocks that the pool caches
     (`engine/block_pool.py`) and computes from there; at most all but its last token are found,
     so that the step computes at least one token and samples.

After the forward, `finish` appends the token sampled for each sequence whose chunk reached its
last token, registers the blocks that became full with the pool's prefix cache, and ends those
that stop, freeing their blocks. Nothing here reads tensors, so every
rank that replicates a scheduler (tensor-parallel and pipeline peers) makes the same decisions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter

from expertmesh.engine.block_pool import BlockPool, chain_hashes
from expertmesh.engine.request import Request, RequestError, TokenOutput


@dataclass(frozen=True)
class SchedulerStats:
    """One data-parallel rank's scheduler after a step: what rank 0 places requests by
    (`engine/dp_routing.py`) and bounds decode steps by, `/metrics` shows and a run's JSON sums.
    Crosses the network in the step's all-gather and goes to the API servers over IPC.

    blocks_*: of the KV pool (cached: free but holding a prefix; evicted: cached blocks reused,
    ever); waiting / running: sequences; preemptions: ever; decode_tokens: `decode_tokens()`;
    prompt_tokens / cached_tokens: of requests at their first admission, all / found in the prefix
    cache; prompt_computed: prompt tokens prefilled, recomputation after preemption included;
    queued_tokens: tokens still to compute (prompts and max_tokens) of the requests here."""

    blocks_free: int = 0
    blocks_used: int = 0
    blocks_cached: int = 0
    blocks_evicted: int = 0
    waiting: int = 0
    running: int = 0
    preemptions: int = 0
    decode_tokens: int | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_computed: int = 0
    queued_tokens: int = 0


@dataclass(frozen=True)
class EngineConfig:
    """block_size: tokens per KV block. num_blocks: blocks per pool (None: as many as
    `kv_cache_gb` holds on the rank with the most KV per block; neither given: on a GPU what
    `gpu_memory_utilization` of it leaves (`kv_budget.py`), on the CPU 1 GiB). max_batched_tokens: tokens per
    forward. max_seqs: running sequences per data-parallel rank. chunked_prefill: a prompt may be
    prefilled over several steps (else it must fit `max_batched_tokens` whole). prefix_caching:
    full blocks are kept and reused by hash (`engine/block_pool.py`). dp_routing: how rank 0
    places requests on data-parallel ranks, "cache" or "load" (`engine/dp_routing.py`)."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    max_batched_tokens: int = 512
    max_seqs: int = 64
    chunked_prefill: bool = True
    prefix_caching: bool = True
    dp_routing: str = "cache"

    def __post_init__(self) -> None:
        for name in ("block_size", "max_batched_tokens", "max_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} {value!r} must be a positive integer")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"num-blocks {self.num_blocks!r} must be a positive integer")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ValueError(f"kv-cache-gb {self.kv_cache_gb} must be > 0")
        if self.dp_routing not in ("cache", "load"):
            raise ValueError(f"unknown --dp-routing {self.dp_routing!r}; use cache or load")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu-memory-utilization {self.gpu_memory_utilization} must be in (0, 1]")


@dataclass(eq=False)
class Sequence:
    request: Request
    arrival: int
    tokens: list[int]
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of the full blocks of `tokens`
    registered: int = 0  # leading blocks offered to the prefix cache (found there or registered)
    cached: int | None = None  # prompt tokens found cached at its first admission

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)

    @property
    def pending(self) -> int:
        """Tokens without keys and values in the cache yet."""
        return len(self.tokens) - self.computed


_ARRIVAL = attrgetter("arrival")


class Scheduler:
    """`key`: what changes the KV besides the tokens (`block_pool.cache_key`)."""

    def __init__(self, cfg: EngineConfig, num_blocks: int, eos: tuple[int, ...] = (), key: bytes = b""):
        self.cfg, self.num_blocks, self.eos, self.key = cfg, num_blocks, frozenset(eos), key
        self.pool = BlockPool(num_blocks, cfg.prefix_caching)
        self.prompt_tokens = self.cached_tokens = self.prompt_computed = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.arrivals = 0
        self.preemptions = 0

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.cfg.block_size)

    def check(self, request: Request) -> None:
        """Requests this scheduler could never finish, whatever else runs."""
        longest = len(request.prompt) + request.max_tokens - 1  # tokens whose KV is ever cached
        if self.blocks_for(longest) > self.num_blocks:
            raise RequestError(request.id, "prompt", f"it needs {self.blocks_for(longest)} KV blocks but the "
                               f"pool has {self.num_blocks}; raise --kv-cache-gb or shorten the request")
        if not self.cfg.chunked_prefill and longest > self.cfg.max_batched_tokens:
            raise RequestError(request.id, "prompt", f"{longest} tokens may need one prefill, over "
                               f"--max-batched-tokens {self.cfg.max_batched_tokens}; raise it or enable "
                               f"chunked prefill")

    def add(self, request: Request) -> None:
        self.waiting.append(Sequence(request, self.arrivals, list(request.prompt + request.generated)))
        self.arrivals += 1

    def abort(self, request_id) -> bool:
        """Drop the request if it is here, freeing its blocks at once."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request.id == request_id:
                    queue.remove(seq)
                    self._release(seq)
                    return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> SchedulerStats:
        free = self.pool.num_free
        queued = 0
        for q in (self.waiting, self.running):
            for s in q:
                queued += len(s.request.prompt) + s.request.max_tokens - s.computed
        return SchedulerStats(
            blocks_free=free, blocks_used=self.num_blocks - free, blocks_cached=self.pool.num_cached,
            blocks_evicted=self.pool.evictions, waiting=len(self.waiting), running=len(self.running),
            preemptions=self.preemptions, decode_tokens=self.decode_tokens(), prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens, prompt_computed=self.prompt_computed, queued_tokens=queued)

    def decode_tokens(self) -> int | None:
        """The tokens of the next `schedule()` when no request arrives before it and that step can
        only decode: nothing waiting, one token to compute per running sequence, and a free block
        for each that needs a new one (so none is preempted). None when it may do anything else.
        An abort before that step only lowers it."""
        if self.waiting:
            return None
        s, new_blocks = self.cfg.block_size, 0
        for seq in self.running:  # one pass: this runs every step
            if len(seq.tokens) - seq.computed != 1:
                return None
            new_blocks += seq.computed // s >= len(seq.blocks)  # position `computed` needs a new block
        if new_blocks > self.pool.num_free:
            return None
        return len(self.running)  # every running sequence is chosen: running <= the budget

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's work: (sequence, new tokens) in the order of the forward's batch."""
        budget = self.cfg.max_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        self.running.sort(key=_ARRIVAL)
        preempted = self.preemptions
        for seq in list(self.running):
            # preempted for an older sequence in this loop (a membership test only after a
            # preemption: one per sequence would cost the host O(S^2) every step)
            if self.preemptions != preempted and seq not in self.running:
                continue
            pending = len(seq.tokens) - seq.computed
            n = pending if pending < budget else budget
            if n == 0 or (n < pending and not self.cfg.chunked_prefill):
                continue
            kept = True
            while kept and not self._reserve(seq, n):
                victim = self.running[-1]  # the newest
                self._preempt(victim)
                kept = victim is not seq
            if kept:
                chosen.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_seqs:
            seq = self.waiting[0]
            hit = self.pool.match(self._hashes(seq, len(seq.tokens) - 1))
            start = len(hit) * self.cfg.block_size
            n = min(len(seq.tokens) - start, budget)
            new = self.blocks_for(start + n) - len(hit)
            if (n < len(seq.tokens) - start and not self.cfg.chunked_prefill) or not self.pool.can_take(hit, new):
                break
            self.pool.take(hit)
            seq.blocks, seq.computed, seq.registered = hit + self.pool.allocate(new), start, len(hit)
            if seq.cached is None:
                seq.cached = start
                self.prompt_tokens += len(seq.request.prompt)
                self.cached_tokens += start
            self.running.append(self.waiting.popleft())
            chosen.append((seq, n))
            budget -= n
        return chosen

    def finish(self, chosen: list[tuple[Sequence, int]], tokens: dict) -> list[TokenOutput]:
        """Record the step: `tokens[request id]` is the token sampled for each sequence whose
        chunk reached its last token. Returns the outputs, and ends the sequences that stop."""
        outputs = []
        caching, s = self.cfg.prefix_caching, self.cfg.block_size
        for seq, n in chosen:  # Python per sequence kept short: 128 of them every decode step
            req, computed = seq.request, seq.computed
            prompt = len(req.prompt)
            if computed < prompt:
                self.prompt_computed += min(computed + n, prompt) - computed
            seq.computed = computed = computed + n
            if caching and computed // s > seq.registered:
                self._register(seq)
            if computed < len(seq.tokens):
                continue  # a prefill chunk short of the end: nothing sampled
            token = tokens[req.id]
            seq.tokens.append(token)
            generated = computed + 1 - prompt
            finished = ("stop" if (token in self.eos and not req.ignore_eos) or token in req.stop else
                        "length" if generated >= req.max_tokens else None)
            outputs.append(TokenOutput(req.id, token, generated - 1, finished,
                                       cached=seq.cached if generated == 1 else None))
            if finished:
                self.running.remove(seq)
                self._release(seq)
        return outputs

    def sampled(self, chosen: list[tuple[Sequence, int]]) -> list[bool]:
        """Which of `chosen` get a token this step (their chunk reaches their last token)."""
        return [n == len(seq.tokens) - seq.computed for seq, n in chosen]

    def _reserve(self, seq: Sequence, n: int) -> bool:
        need = self.blocks_for(seq.computed + n) - len(seq.blocks)
        if need <= 0:  # a decode step, 15 times in 16 with blocks of 16
            return True
        if need > self.pool.num_free:
            return False
        seq.blocks.extend(self.pool.allocate(need))
        return True

    def _hashes(self, seq: Sequence, n_tokens: int) -> list[bytes]:
        """The chain hashes of the full blocks among `seq`'s first `n_tokens` tokens."""
        if not self.cfg.prefix_caching:
            return []
        return chain_hashes(seq.tokens, self.cfg.block_size, self.key, seq.hashes)[:n_tokens // self.cfg.block_size]

    def _register(self, seq: Sequence) -> None:
        """Offer the prefix cache each block of `seq` that its KV now fills (`finish` calls it
        only when caching and a block filled: a decode step fills one every block_size steps,
        and the chain of hashes grows with the context)."""
        full = seq.computed // self.cfg.block_size
        hashes = self._hashes(seq, seq.computed)
        for i in range(seq.registered, full):
            self.pool.register(seq.blocks[i], hashes[i])
        seq.registered = full

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.computed = 0
        self.preemptions += 1
        i = 0
        while i < len(self.waiting) and self.waiting[i].arrival < seq.arrival:
            i += 1
        self.waiting.insert(i, seq)

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks[::-1])
        seq.blocks, seq.registered = [], 0
