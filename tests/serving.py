"""A mixed serving workload and its independent reference, shared by the engine tests.

The reference generates each request alone with the single-device model and no cache: every
token is the argmax of a forward over the whole sequence so far.
"""

import random
from collections import Counter

import torch

from expertmesh.engine.request import Request


def naive_tokens(model, prompt: tuple[int, ...], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.inference_mode():
        for _ in range(n):
            token = int(model(ids, all_logits=True)[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out


def truncate(tokens: list[int], stop: set[int]) -> list[int]:
    """The tokens up to and including the first stop token."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i + 1]
    return tokens


class Mixed:
    """`n` requests with prompts of 1 .. max_prompt tokens, max_tokens 1 .. max_new, arriving over
    `spread` steps; a quarter stop at a token of their own; the engine's EOS is the token the
    reference outputs most often; `n_aborts` are aborted a few steps after they arrive."""

    def __init__(self, model, n: int, max_prompt: int, max_new: int, spread: int, n_aborts: int, seed: int):
        rng = random.Random(seed)
        vocab = model.cfg.vocab_size
        lengths = [1, max_prompt] + [rng.randint(1, max_prompt) for _ in range(n - 2)]
        self.arrivals, self.full = [], {}
        for i, length in enumerate(lengths):
            prompt = tuple(rng.randrange(vocab) for _ in range(length))
            max_tokens = rng.randint(1, max_new)
            self.full[i] = naive_tokens(model, prompt, max_tokens)
            stop = (rng.choice(self.full[i]),) if i % 4 == 3 else ()
            self.arrivals.append((rng.randint(0, spread), Request(i, prompt, max_tokens, stop=stop)))
        self.eos = Counter(t for toks in self.full.values() for t in toks).most_common(1)[0][0]
        self.aborted = {r.id: at + rng.randint(0, 3)
                        for at, r in rng.sample(self.arrivals, n_aborts)}
        self.aborts = [(at, rid) for rid, at in self.aborted.items()]

    def expected(self, request: Request) -> list[int]:
        return truncate(self.full[request.id], {self.eos, *request.stop})

    def check(self, transcript, num_blocks_free: int) -> None:
        """Every request's tokens equal the reference's (a prefix for aborted ones), finished ones
        say why, and every rank's pool is entirely free at the end."""
        assert not transcript.rejected
        for _, request in self.arrivals:
            got, want = transcript.tokens[request.id], self.expected(request)
            if request.id in self.aborted:
                assert got == want[:len(got)], f"request {request.id} (aborted)"
                continue
            assert got == want, f"request {request.id}: prompt length {len(request.prompt)}"
            reason = "stop" if want[-1] in {self.eos, *request.stop} else "length"
            assert transcript.finished[request.id] == reason
        for stats in transcript.rank_stats:
            assert stats.blocks_free == num_blocks_free and stats.blocks_used == 0
            assert stats.running == stats.waiting == 0
