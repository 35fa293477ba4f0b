"""`expertmesh bench serve`: the client side of a load test against any OpenAI-compatible server.

`num_prompts` requests with random prompts of `input_len` tokens (fixed, or drawn from a range)
asking for exactly `output_len` tokens (greedy), sent at Poisson arrivals of `rate` requests/s
(inf: all at once), each streamed so that every token is timed where the client receives it:

- TTFT: request sent -> first token; E2E: request sent -> last token;
- ITL: the gaps between consecutive chunks of a request;
- TPOT: per request, (last - first token) / (tokens - 1) (`engine/metrics.py`'s definition);
  tokens are the server's `usage` count when it sends one, else the chunks' `token_ids`, else
  one per chunk with text;
- throughput: completed requests and output (and prompt + output) tokens per second of the run;
- goodput: completed requests per second whose TTFT <= `ttft_slo` and TPOT <= `tpot_slo`.

`dataset` "shared-prefix": each prompt is one of `num_prefixes` random prefixes of `prefix_len`
tokens (drawn uniformly per request) followed by a suffix of its own of `input_len` tokens,
like chat requests sharing a system prompt; the server's `usage.prompt_tokens_details
.cached_tokens` (when it sends them) give the prefix cache's hit rate over the prompt tokens.

`dataset` "alternating": traffic whose hot experts move, for online expert load balancing with a
real checkpoint. Requests come in phases of `switch_every` requests (counted in send order, so the
phases follow from the config alone, whatever the server's speed): A, then B, then A, ... A phase
draws its prompts from its own distribution: ids drawn uniformly from its own range of token ids
(`tokens_a`, `tokens_b`; by default the two halves of [1, vocab)), or the lines of its own file
of prompts (`prompts_a`, `prompts_b`: text, one prompt per line, drawn uniformly per request).

Prompts are token ids, or, given a tokenizer directory, the text of random ids decoded, or the
lines of prompt files (a server with its own tokenizer encodes text; a request's prompt tokens are
the count the server's `usage` reports, where it sends one).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PERCENTILES = (50, 90, 99)
DATASETS = ("random", "shared-prefix", "alternating")
ALTERNATING_FLAGS = ("switch_every", "tokens_a", "tokens_b", "prompts_a", "prompts_b")


@dataclass(frozen=True)
class BenchConfig:
    """input_len / output_len: (low, high) token counts, drawn uniformly per request (low == high:
    fixed). vocab: prompt ids are drawn from [1, vocab). endpoint: completions or chat. dataset:
    random, shared-prefix (then `input_len` is each suffix's) or alternating (then `tokens_a` /
    `tokens_b`: inclusive (low, high) ranges of the two phases' ids, or `prompts_a` / `prompts_b`:
    their prompt files)."""

    url: str
    num_prompts: int
    rate: float
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int = 0
    model: str | None = None
    endpoint: str = "completions"
    tokenizer: str | None = None
    vocab: int = 100
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    timeout: float = 600.0
    dataset: str = "random"
    prefix_len: int = 0
    num_prefixes: int = 1
    switch_every: int = 0
    tokens_a: tuple[int, int] | None = None
    tokens_b: tuple[int, int] | None = None
    prompts_a: str | None = None
    prompts_b: str | None = None

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts {self.num_prompts} must be at least 1")
        if not self.rate > 0:
            raise ValueError(f"--rate {self.rate} must be > 0 requests/s (inf: all at once)")
        for name in ("input_len", "output_len"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"--{name.replace('_', '-')} {low}:{high} must be 1 <= low <= high")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"--endpoint {self.endpoint!r}: use completions or chat")
        if self.vocab < 2:
            raise ValueError(f"--vocab {self.vocab} must be at least 2")
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset {self.dataset!r}: use {' or '.join(DATASETS)}")
        if self.dataset == "shared-prefix" and not (self.prefix_len >= 1 and self.num_prefixes >= 1):
            raise ValueError(f"--dataset shared-prefix needs --prefix-len >= 1 and --num-prefixes >= 1 "
                             f"(got {self.prefix_len} and {self.num_prefixes})")
        if self.dataset == "alternating":
            self._check_alternating()
        else:
            for name in ALTERNATING_FLAGS:
                if getattr(self, name):
                    raise ValueError(f"{_flag(name)} applies to --dataset alternating only")

    def _check_alternating(self) -> None:
        if self.switch_every < 1:
            raise ValueError(f"--dataset alternating needs --switch-every >= 1 requests per phase "
                             f"(got {self.switch_every})")
        if (self.prompts_a is None) != (self.prompts_b is None):
            raise ValueError("--prompts-a and --prompts-b go together: one file of prompts per phase")
        if self.prompts_a is not None:
            if self.tokens_a or self.tokens_b:
                raise ValueError("--tokens-a / --tokens-b do not apply with --prompts-a / --prompts-b, "
                                 "whose files give the prompts")
            read_prompts(self.prompts_a, "--prompts-a")
            read_prompts(self.prompts_b, "--prompts-b")
            return
        if not (self.tokens_a and self.tokens_b) and self.vocab < 4:
            raise ValueError(f"--dataset alternating splits --vocab {self.vocab} in two halves, which "
                             f"needs --vocab >= 4 (or give --tokens-a and --tokens-b)")
        a, b = token_ranges(self)
        for name, (low, high) in (("tokens_a", a), ("tokens_b", b)):
            if not 0 <= low <= high:
                raise ValueError(f"{_flag(name)} {low}:{high} must be 0 <= low <= high (token ids)")
        if a[0] <= b[1] and b[0] <= a[1]:
            raise ValueError(f"--tokens-a {a[0]}:{a[1]} and --tokens-b {b[0]}:{b[1]} overlap; the two "
                             f"phases need disjoint token ids")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def token_ranges(cfg: BenchConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """The alternating dataset's inclusive ranges of prompt ids, phase A's then B's: as given, else
    [1, vocab/2) and [vocab/2, vocab)."""
    half = cfg.vocab // 2
    return cfg.tokens_a or (1, half - 1), cfg.tokens_b or (half, cfg.vocab - 1)


def phase(cfg: BenchConfig, i: int) -> int:
    """The alternating dataset's phase of the i-th request sent: 0 (A) or 1 (B)."""
    return i // cfg.switch_every % 2


def read_prompts(path: str, flag: str) -> list[str]:
    """A prompt file's prompts: its lines that are not blank."""
    try:
        prompts = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path} is not UTF-8 text") from None
    if not prompts:
        raise ValueError(f"{flag} {path} has no prompt (give one per line)")
    return prompts


def parse_range(text: str, flag: str, what: str = "token counts") -> tuple[int, int]:
    """"128" -> (128, 128); "64:256" -> (64, 256)."""
    try:
        low, _, high = text.partition(":")
        return int(low), int(high or low)
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give N or LOW:HIGH ({what})") from None


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds since the run started."""

    sent: float
    prompt_tokens: int  # as sent (0 for a prompt file's text), then as the server's usage counts them
    times: list[float] = field(default_factory=list)  # when each chunk with tokens arrived
    tokens: int = 0
    error: str | None = None
    cached: int = 0  # prompt tokens the server found in its prefix cache (its usage says)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def tpot(self) -> float | None:
        return (self.times[-1] - self.times[0]) / (self.tokens - 1) if self.tokens > 1 else None


def workload(cfg: BenchConfig) -> list[tuple[float, list[int] | str, int]]:
    """(send time, prompt ids or text, max tokens) per request, from the config and seed alone."""
    rng = random.Random(cfg.seed)
    prefixes = [[rng.randrange(1, cfg.vocab) for _ in range(cfg.prefix_len)] for _ in range(cfg.num_prefixes)]
    texts = (read_prompts(cfg.prompts_a, "--prompts-a"), read_prompts(cfg.prompts_b, "--prompts-b")) \
        if cfg.prompts_a else None
    at, out = 0.0, []
    for i in range(cfg.num_prompts):
        if cfg.dataset != "alternating":
            prefix = rng.choice(prefixes) if cfg.dataset == "shared-prefix" else []
            prompt = prefix + [rng.randrange(1, cfg.vocab) for _ in range(rng.randint(*cfg.input_len))]
        elif texts:
            prompt = rng.choice(texts[phase(cfg, i)])
        else:
            low, high = token_ranges(cfg)[phase(cfg, i)]
            prompt = [rng.randint(low, high) for _ in range(rng.randint(*cfg.input_len))]
        out.append((at, prompt, rng.randint(*cfg.output_len)))
        if math.isfinite(cfg.rate):
            at += rng.expovariate(cfg.rate)
    return out


async def _one(client, cfg: BenchConfig, model: str, prompt, max_tokens: int, start: float,
               outcome: Outcome, progress) -> None:
    kwargs = dict(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                  stream_options={"include_usage": True})
    try:
        if cfg.endpoint == "chat":
            text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": text}], **kwargs)
        else:
            stream = await client.completions.create(prompt=prompt, **kwargs)
        counted = None
        async for chunk in stream:
            now = time.perf_counter() - start
            if chunk.usage is not None:
                counted = chunk.usage.completion_tokens
                outcome.prompt_tokens = chunk.usage.prompt_tokens
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                outcome.cached = getattr(details, "cached_tokens", None) or 0
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            piece = c.delta.content if cfg.endpoint == "chat" else c.text
            ids = getattr(c, "token_ids", None)
            k = len(ids) if ids is not None else int(bool(piece))
            if k:
                outcome.times.append(now)
                outcome.tokens += k
        if counted is not None:
            outcome.tokens = counted
    except Exception as exc:  # a failed request is counted and reported, not fatal to the run
        outcome.error = f"{type(exc).__name__}: {exc}"
    progress()


async def _run(cfg: BenchConfig, on_done) -> tuple[list[Outcome], float, str]:
    import openai

    client = openai.AsyncOpenAI(base_url=cfg.url, api_key="none", max_retries=0, timeout=cfg.timeout)
    model = cfg.model or (await client.models.list()).data[0].id
    tokenizer = None
    if cfg.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    jobs = workload(cfg)
    start = time.perf_counter()
    outcomes, tasks = [], []
    for at, ids, max_tokens in jobs:
        delay = at - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        text = isinstance(ids, str)
        prompt = tokenizer.decode(ids) if tokenizer is not None and not text else ids
        outcome = Outcome(time.perf_counter() - start, 0 if text else len(ids))
        outcomes.append(outcome)
        tasks.append(asyncio.create_task(_one(client, cfg, model, prompt, max_tokens, start, outcome, on_done)))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    await client.close()
    return outcomes, duration, model


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    if len(values) == 1:
        return {"mean": values[0], **{f"p{p}": values[0] for p in PERCENTILES}}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"mean": statistics.fmean(values), **{f"p{p}": cuts[p - 1] for p in PERCENTILES}}


def summarize(cfg: BenchConfig, outcomes: list[Outcome], duration: float) -> dict:
    done = [o for o in outcomes if o.ok]
    itl = [b - a for o in done for a, b in zip(o.times, o.times[1:])]
    output = sum(o.tokens for o in done)
    good = [o for o in done if (cfg.ttft_slo is None or o.ttft <= cfg.ttft_slo)
            and (cfg.tpot_slo is None or o.tpot is None or o.tpot <= cfg.tpot_slo)]
    return {
        "config": asdict(cfg), "duration_s": duration, "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "request_throughput": len(done) / duration,
        "output_token_throughput": output / duration,
        "total_token_throughput": (output + sum(o.prompt_tokens for o in done)) / duration,
        "prefix_hit_rate": sum(o.cached for o in done) / max(1, sum(o.prompt_tokens for o in done)),
        "goodput": len(good) / duration if cfg.ttft_slo or cfg.tpot_slo else None,
        "ttft_s": _percentiles([o.ttft for o in done]),
        "tpot_s": _percentiles([o.tpot for o in done if o.tpot is not None]),
        "itl_s": _percentiles(itl),
        "e2e_s": _percentiles([o.times[-1] - o.sent for o in done]),
        "requests": [asdict(o) for o in outcomes],
    }


def run_bench(cfg: BenchConfig, on_done=lambda: None) -> dict:
    outcomes, duration, model = asyncio.run(_run(cfg, on_done))
    result = summarize(cfg, outcomes, duration)
    result["model"] = model
    return result


def plot(result: dict, path: str) -> None:
    """Empirical CDFs of TTFT, TPOT and ITL (ms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in result["requests"] if r["error"] is None and r["times"]]
    series = {
        "TTFT": [r["times"][0] - r["sent"] for r in done],
        "TPOT": [(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in done if r["tokens"] > 1],
        "ITL": [b - a for r in done for a, b in zip(r["times"], r["times"][1:])],
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, values) in zip(axes, series.items()):
        values = sorted(v * 1e3 for v in values)
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of " + ("gaps" if name == "ITL" else "requests"))
        ax.grid(alpha=0.3)
    c = result["config"]
    fig.suptitle(f"{result['model']} at {c['rate']} req/s, {c['num_prompts']} requests")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
