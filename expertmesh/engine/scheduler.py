"""What one data-parallel rank computes at each engine step: continuous batching over a paged
KV cache.

A `Sequence` is a request in flight: its tokens (prompt, then generated), how many of them have
their keys and values in the cache (`computed`), and its block table. Each step the scheduler
picks, under a token budget (`max_batched_tokens`) and a cap on running sequences (`max_seqs`):

  1. running sequences, oldest first: the rest of their prompt (in chunks if `chunked_prefill`)
     or one decode token; when the pool has no block for one, the newest running sequence is
     preempted (its blocks freed, its tokens kept, requeued in arrival order to be recomputed);
  2. then waiting sequences in arrival order (FCFS), admitted while their first chunk's blocks
     are free; the first that does not fit stops admission, so none is overtaken.

After the forward, `finish` appends the token sampled for each sequence whose chunk reached its
last token, and ends those that stop, freeing their blocks. Nothing here reads tensors, so every
rank that replicates a scheduler (tensor-parallel and pipeline peers) makes the same decisions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from expertmesh.engine.request import Request, TokenOutput


@dataclass(frozen=True)
class EngineConfig:
    """block_size: tokens per KV block. num_blocks: blocks per pool (None: as many as
    `kv_cache_gb` holds on the rank with the most KV per block; neither given: on a GPU what
    `gpu_memory_utilization` of it leaves (`kv_budget.py`), on the CPU 1 GiB). max_batched_tokens: tokens per
    forward. max_seqs: running sequences per data-parallel rank. chunked_prefill: a prompt may be
    prefilled over several steps (else it must fit `max_batched_tokens` whole)."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    max_batched_tokens: int = 512
    max_seqs: int = 64
    chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "max_batched_tokens", "max_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} {value!r} must be a positive integer")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"num-blocks {self.num_blocks!r} must be a positive integer")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ValueError(f"kv-cache-gb {self.kv_cache_gb} must be > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu-memory-utilization {self.gpu_memory_utilization} must be in (0, 1]")


@dataclass(eq=False)
class Sequence:
    request: Request
    arrival: int
    tokens: list[int]
    computed: int = 0
    blocks: list[int] = field(default_factory=list)

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)

    @property
    def pending(self) -> int:
        """Tokens without keys and values in the cache yet."""
        return len(self.tokens) - self.computed


class Scheduler:
    def __init__(self, cfg: EngineConfig, num_blocks: int, eos: tuple[int, ...] = ()):
        self.cfg, self.num_blocks, self.eos = cfg, num_blocks, frozenset(eos)
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))
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
            raise ValueError(f"request {request.id!r} needs {self.blocks_for(longest)} KV blocks but the "
                             f"pool has {self.num_blocks}; raise --kv-cache-gb or shorten the request")
        if not self.cfg.chunked_prefill and longest > self.cfg.max_batched_tokens:
            raise ValueError(f"request {request.id!r}: {longest} tokens may need one prefill, over "
                             f"--max-batched-tokens {self.cfg.max_batched_tokens}; raise it or enable "
                             f"chunked prefill")

    def add(self, request: Request) -> None:
        self.waiting.append(Sequence(request, self.arrivals, list(request.prompt)))
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

    def stats(self) -> dict:
        return {"blocks_free": len(self.free_blocks), "blocks_used": self.num_blocks - len(self.free_blocks),
                "waiting": len(self.waiting), "running": len(self.running), "preemptions": self.preemptions,
                "decode_tokens": self.decode_tokens()}

    def decode_tokens(self) -> int | None:
        """The tokens of the next `schedule()` when no request arrives before it and that step can
        only decode: nothing waiting, one token to compute per running sequence, and a free block
        for each that needs a new one (so none is preempted). None when it may do anything else.
        An abort before that step only lowers it."""
        if self.waiting or any(seq.pending != 1 for seq in self.running):
            return None
        new_blocks = sum(self.blocks_for(seq.computed + 1) > len(seq.blocks) for seq in self.running)
        if new_blocks > len(self.free_blocks):
            return None
        return len(self.running)  # every running sequence is chosen: running <= the budget

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's work: (sequence, new tokens) in the order of the forward's batch."""
        budget = self.cfg.max_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        self.running.sort(key=lambda s: s.arrival)
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted for an older sequence in this loop
            n = min(seq.pending, budget)
            if n == 0 or (n < seq.pending and not self.cfg.chunked_prefill):
                continue
            while not self._reserve(seq, n):
                victim = self.running[-1]  # the newest
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                chosen.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_seqs:
            seq = self.waiting[0]
            n = min(seq.pending, budget)
            if (n < seq.pending and not self.cfg.chunked_prefill) or not self._reserve(seq, n):
                break
            self.running.append(self.waiting.popleft())
            chosen.append((seq, n))
            budget -= n
        return chosen

    def finish(self, chosen: list[tuple[Sequence, int]], tokens: dict) -> list[TokenOutput]:
        """Record the step: `tokens[request id]` is the token sampled for each sequence whose
        chunk reached its last token. Returns the outputs, and ends the sequences that stop."""
        outputs = []
        for seq, n in chosen:
            seq.computed += n
            if seq.pending:
                continue  # a prefill chunk short of the end: nothing sampled
            token = tokens[seq.request.id]
            seq.tokens.append(token)
            req = seq.request
            finished = ("stop" if (token in self.eos and not req.ignore_eos) or token in req.stop else
                        "length" if seq.generated >= req.max_tokens else None)
            outputs.append(TokenOutput(req.id, token, seq.generated - 1, finished))
            if finished:
                self.running.remove(seq)
                self._release(seq)
        return outputs

    def sampled(self, chosen: list[tuple[Sequence, int]]) -> list[bool]:
        """Which of `chosen` get a token this step (their chunk reaches their last token)."""
        return [n == seq.pending for seq, n in chosen]

    def _reserve(self, seq: Sequence, n: int) -> bool:
        need = self.blocks_for(seq.computed + n) - len(seq.blocks)
        if need > len(self.free_blocks):
            return False
        for _ in range(need):
            seq.blocks.append(self.free_blocks.pop())
        return True

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
        self.free_blocks.extend(reversed(seq.blocks))
        seq.blocks = []
