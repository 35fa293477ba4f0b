"""The `n` choices of one OpenAI request, and their logprobs in OpenAI's bodies.

A request with `n` choices is `n` engine requests of the same prompt (`requests`), each with a
seed of its own, `choice_seed(seed, index)`: choice 0 keeps the request's seed (so it draws what
the same request with n = 1 draws), choice i > 0 takes 63 bits of a BLAKE2b hash of (seed, i).
Without a seed, every choice gets a random one. Their tokens arrive interleaved; `Choices.pieces`
yields them with their choice's index, and keeps each choice's text, finish reason and logprobs
for the whole (non-streamed) body. Usage counts the prompt once and every choice's tokens.
With prefix caching and a prompt of at least one full KV block, choices 1.. are sent to the
engine when choice 0's first token arrives (`server/app.py: _start`): the prompt's blocks are
cached then, and they take them instead of computing the prompt again.

Logprobs (`engine/logprobs.py`: raw, before any processing), per token, as OpenAI writes them:
completions `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}] (the drawn token
and the k most likely), "text_offset"}`; chat `{"content": [{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}]}]}`. A token is its own decoding, or
`token_id:N` for a model without a tokenizer (vLLM's spelling).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct

from expertmesh.engine.request import Request
from expertmesh.server.protocol import ApiError, chat_choice, completion_choice, usage

_MASK64 = (1 << 64) - 1


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded `seed`: the seed itself for choice 0, else a
    non-negative 63-bit hash of (seed mod 2^64, index)."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(struct.pack("<QQ", seed & _MASK64, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def requests(rid: str, ids: list[int], max_tokens: int, n: int, seed: int | None, **fields) -> list[Request]:
    """The engine requests of `n` choices (ids `rid` for one choice, `rid-i` for several);
    `fields`: `Request`'s other fields. Raises ValueError as `Request` does."""
    seeds = [choice_seed(seed, i) if seed is not None else random.getrandbits(31) for i in range(n)]
    return [Request(rid if n == 1 else f"{rid}-{i}", tuple(ids), max_tokens, seed=s, **fields)
            for i, s in enumerate(seeds)]


class Choices:
    """The choices of request `id` in flight: `gens` are `server/generation.py: Generation`s (one per
    choice, in index order); `tokenizer` names tokens in logprobs; `chat`: which body format."""

    def __init__(self, id: str, gens: list, tokenizer, chat: bool):
        self.id, self.gens, self.tokenizer, self.chat = id, gens, tokenizer, chat
        self.asked = gens[0].request.logprobs is not None
        self.texts = [[] for _ in gens]
        self.reasons: list[str | None] = [None] * len(gens)
        self.logprobs = [self._logprobs([], 0) for _ in gens]
        self.offsets = [0] * len(gens)

    async def pieces(self):
        """(choice index, text delta, new token ids, finish reason or None, logprobs of the new
        tokens or None) as tokens arrive, from every choice; raises ApiError as `Generation.pieces`."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, gen) -> None:
            try:
                async for piece in gen.pieces():
                    queue.put_nowait((index, piece))
                queue.put_nowait((index, None))
            except ApiError as exc:
                queue.put_nowait((index, exc))
        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(self.gens)]
        try:
            left = len(tasks)
            while left:
                index, piece = await queue.get()
                if index == 0:  # choice 0's prompt is in the prefix cache now: the others may go
                    for gen in self.gens[1:]:
                        if not gen.submitted:
                            gen.submit()
                if piece is None:
                    left -= 1
                    continue
                if isinstance(piece, ApiError):
                    raise piece
                delta, new, reason, entry = piece
                self.texts[index].append(delta)
                self.reasons[index] = reason
                lps = None
                if self.asked:
                    lps = self._logprobs([(t, entry) for t in new], index)
                    for key, value in lps.items():
                        self.logprobs[index][key] += value
                yield index, delta, new, reason, lps
        finally:
            for task in tasks:
                task.cancel()

    def close(self, error: bool = False) -> None:
        for gen in self.gens:
            gen.close(error)

    def usage(self) -> dict:
        # the prompt is counted once, as choice 0's, and so are its tokens found in the prefix cache
        return usage(len(self.gens[0].request.prompt), sum(len(g.text.ids) for g in self.gens),
                     self.gens[0].cached)

    def chunk_choice(self, index: int, delta: str, new: list[int], reason: str | None, lps: dict | None) -> dict:
        if self.chat:
            return chat_choice(index, delta, new, reason, lps, chunk=True)
        return completion_choice(index, delta, new, reason, lps)

    def first_choices(self) -> list[dict]:
        """A chat stream's first chunk: the role of every choice."""
        return [chat_choice(i, "", [], None, None, chunk=True, first=True) for i in range(len(self.gens))]

    def whole_choices(self) -> list[dict]:
        """Every choice of the non-streamed body, once `pieces` is done."""
        out = []
        for i, gen in enumerate(self.gens):
            text, lps = "".join(self.texts[i]), self.logprobs[i] if self.asked else None
            out.append(chat_choice(i, text, gen.text.ids, self.reasons[i], lps, chunk=False) if self.chat
                       else completion_choice(i, text, gen.text.ids, self.reasons[i], lps))
        return out

    def _token(self, token: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token])

    def _logprobs(self, entries: list[tuple[int, tuple]], index: int) -> dict:
        """OpenAI's logprobs of `entries` (token, (its logprob, ((id, logprob), ...))) of choice
        `index`, in the request's format; their text offsets continue the choice's."""
        if self.chat:
            return {"content": [{**self._named(t, lp), "top_logprobs": [self._named(i, v) for i, v in top]}
                                for t, (lp, top) in entries]}
        tokens = [self._token(t) for t, _ in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(token)
        return {"tokens": tokens, "token_logprobs": [lp for _, (lp, _) in entries],
                "top_logprobs": [{self._token(t): lp, **{self._token(i): v for i, v in top}}
                                 for t, (lp, top) in entries],
                "text_offset": offsets}

    def _named(self, token: int, logprob: float) -> dict:
        text = self._token(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}
