"""One rank of `expertmesh serve`: load the shard, then serve the API (global rank 0) or follow.

Rank 0 runs uvicorn in its main thread (which gets SIGINT / SIGTERM) and the `EngineLoop` in a
thread. It warms the engine up with one request before it listens, then prints one line with the
URL. On SIGTERM uvicorn stops accepting connections and gives the open ones `grace_s` to finish;
then the engine ends what is left and tells every rank to stop, and the rank returns. When a
step fails (a dead rank) or outlasts `timeout_s`, every request in flight ends with an error,
uvicorn stops, and the rank raises, so the launcher stops the others and exits non-zero.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
import uvicorn

from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.shard import load_rank
from expertmesh.engine.spec import RunSpec
from expertmesh.server.app import Api, create_app
from expertmesh.server.loop import EngineLoop, follow
from expertmesh.server.metrics import ServerMetrics

WARMUP_PROMPT, WARMUP_TOKENS = 8, 2
WATCH_S = 1.0  # how often rank 0 checks that the step in progress is not stuck


@dataclass(frozen=True)
class ServeOptions:
    """host / port: where the API listens. name: the model's name in the API. tokenizer: the
    checkpoint directory whose tokenizer encodes text (None: token ids only). eos: token ids that
    end a generation. max_waiting: requests waiting for their first token before a 429.
    grace_s: what in-flight requests get after SIGTERM. timeout_s: the longest an engine step
    (or the start-up) may take before the server gives up."""

    host: str
    port: int
    name: str
    tokenizer: str | None = None
    eos: tuple[int, ...] = ()
    max_waiting: int = 256
    grace_s: float = 30.0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port} must be in 0 .. 65535")
        if not (isinstance(self.max_waiting, int) and self.max_waiting >= 0):
            raise ValueError(f"--max-waiting {self.max_waiting} must be an integer >= 0")
        if not self.grace_s >= 0:
            raise ValueError(f"--grace {self.grace_s} must be >= 0 seconds")
        if not 0 < self.timeout_s < float("inf"):
            raise ValueError(f"--timeout {self.timeout_s} must be a positive number of seconds")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"


def serve_rank(spec: RunSpec, engine_cfg: EngineConfig, options: ServeOptions,
               device: torch.device = torch.device("cpu")) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        # Rank 0 alone answers a signal, and then stops every rank through the engine.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    model, links, _ = load_rank(spec, device)
    engine = Engine(model, spec.cfg, spec.deployment, engine_cfg, rank, links, options.eos,
                    n_micro=spec.micro_batches, overlap=spec.overlap, graphs=spec.graphs)
    if rank != 0:
        follow(engine, model)
        return
    _serve_api(engine, model, spec, options)


def _serve_api(engine: Engine, model, spec: RunSpec, options: ServeOptions) -> None:
    stop = threading.Event()  # a signal before uvicorn takes over the handlers
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    dtype_bytes = spec.cfg.torch_dtype.itemsize
    metrics = ServerMetrics(spec.cfg.n_experts, spec.cfg.d_model * dtype_bytes, spec.deployment.tp)
    server: uvicorn.Server | None = None

    def failed(_exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    loop = EngineLoop(engine, model, on_step=metrics.step, on_failure=failed)
    loop.start()
    _warm_up(loop, spec, options.timeout_s)
    api = Api(options.name, spec.cfg, loop, engine.scheduler, metrics, _tokenizer(options.tokenizer),
              options.max_waiting, options.timeout_s, options.grace_s)
    config = uvicorn.Config(create_app(api), host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=options.grace_s, lifespan="off")
    server = uvicorn.Server(config)
    if not stop.is_set():
        asyncio.run(_run(server, loop, options))
    for s, handler in previous.items():
        signal.signal(s, handler)
    if loop.failure is not None:
        raise RuntimeError(f"the engine failed: {loop.failure}") from loop.failure
    loop.stop(options.timeout_s)


async def _run(server: uvicorn.Server, loop: EngineLoop, options: ServeOptions) -> None:
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(f"expertmesh serve: ready at {options.url} (model {options.name!r})", flush=True)
    while not task.done():
        await asyncio.wait([task], timeout=WATCH_S)
        if loop.stuck_for() > options.timeout_s:
            loop.fail(TimeoutError(f"an engine step took over {options.timeout_s:.0f} s (--timeout)"))
            server.should_exit = True
    await task
    if not server.started and loop.failure is None:
        raise RuntimeError(f"could not listen on {options.host}:{options.port}")


def _warm_up(loop: EngineLoop, spec: RunSpec, timeout: float) -> None:
    """One short request through every rank, so that the first client does not pay for it."""
    done = threading.Event()
    outcome: list = []

    def sink(item) -> None:
        if isinstance(item, BaseException) or item.finished:
            outcome.append(item)
            done.set()

    prompt = tuple(range(min(WARMUP_PROMPT, spec.cfg.max_seq_len - WARMUP_TOKENS)))
    loop.submit(Request("warmup", prompt, WARMUP_TOKENS), sink)
    if not done.wait(timeout):
        raise TimeoutError(f"warming up took over {timeout:.0f} s (--timeout)")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]


def _tokenizer(path: str | None):
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
