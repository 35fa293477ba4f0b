"""The engine side of `expertmesh serve`: every rank loads its shard; rank 0 runs the engine loop
and nothing else, the other ranks step with it.

Rank 0 warms the engine up with one request, binds the HTTP port, starts `api_server_count` API
server processes (`server/frontend.py`, which share that listening socket) and then loops:
take what the front ends sent (`server/ipc.py`: new requests, aborts), step, send each front end
its requests' tokens. It prints the ready line once every front end accepts connections. With
nothing to do it waits for a message at most `IDLE_S` and steps anyway (an empty step), so the
other ranks, blocked in the step's broadcast, always hear from rank 0 well within the
collectives' timeout, and a dead rank is noticed within that time.

Ending:
- SIGTERM / SIGINT: rank 0 sends SIGTERM to the front ends, which stop accepting and give open
  requests `grace_s`; the engine keeps stepping for them until every front end has exited, then
  stops every rank, and the rank returns (exit 0).
- A step fails (a dead rank): every front end gets the failure (its requests end with an error,
  it exits 1), and rank 0 raises, so that the launcher stops the other ranks and exits non-zero.
- A step outlasts `timeout_s`: a watchdog thread says so and ends rank 0 (exit 1).
- A front end dies: rank 0 stops the others and every rank, and raises.
- Rank 0 dies: its front ends see their parent gone, answer 503 and exit.
- `--elastic` (`options.elastic`): a step that fails because another rank died is survived
  instead (`elastic/recovery.py`): every survivor regroups, rank 0 re-queues the requests in
  flight (`elastic/ledger.py`), logs the recovery and sends the front ends every rank's state
  (rank 0's part: `server/elastic_serving.py`).
  A rank that hangs is killed by the launcher (`heartbeat.py`: every rank's step loop marks its
  progress, `--hang-timeout`), and survived the same way; rank 0 hung and killed ends the server.
  Between steps rank 0 looks for a process asking to join (`serve --join`, `elastic/join.py`);
  it sends the next step as a bare step boundary at which every rank regroups with it.

Every `STATS_EVERY` steps, every rank sends rank 0 its expert-parallel counters since the last
time, which rank 0 sums for front end 0's `/metrics` (`server/rank_counters.py`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from expertmesh import heartbeat
from expertmesh.elastic.recovery import Elastic
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.shard import load_rank
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import eplb_controller
from expertmesh.model.transformer import MoETransformer
from expertmesh.server.app import Limits
from expertmesh.server.connections import ConnectionLimits
from expertmesh.server.elastic_serving import ElasticServing
from expertmesh.server.frontend import FRONTEND_ENV, FrontendOptions
from expertmesh.launch import local_store_path
from expertmesh.server.ipc import EngineChannel, FromEngine, Token
from expertmesh.server.rank_counters import STATS_EVERY, counter_totals, share_counters

IDLE_S = 0.5  # the longest rank 0 waits, idle, before an empty step
WATCH_S = 1.0  # how often the watchdog looks at the step in progress
FRONTEND_EXIT_S = 10.0  # what a front end gets to exit once the engine failed or stopped
WARMUP_PROMPT, WARMUP_TOKENS = 8, 2


@dataclass(frozen=True)
class ServeOptions:
    """host / port: where the API listens. name: the model's name in the API. tokenizer: the
    checkpoint directory whose tokenizer encodes text (None: token ids only). eos: token ids that
    end a generation. max_waiting: requests waiting for their first token before a 429 (split
    evenly over the API servers). grace_s: what in-flight requests get after SIGTERM. timeout_s:
    the longest an engine step (or the start-up) may take before the server gives up.
    api_servers: front-end processes. api_key: required of every /v1 request when set.
    limits: what one request may hold. connections: bounds on the HTTP connections (all API
    servers together). fd: the socket listening on host:port, bound by the CLI before any rank
    started; every rank inherits it, rank 0 hands it to the API servers and closes its own.
    elastic: survive the loss of a rank other than 0."""

    host: str
    port: int
    name: str
    tokenizer: str | None = None
    eos: tuple[int, ...] = ()
    max_waiting: int = 256
    grace_s: float = 30.0
    timeout_s: float = 600.0
    api_servers: int = 1
    api_key: str | None = None
    limits: Limits = Limits()
    connections: ConnectionLimits = ConnectionLimits()
    fd: int | None = None
    elastic: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port} must be in 0 .. 65535")
        if not (isinstance(self.max_waiting, int) and self.max_waiting >= 0):
            raise ValueError(f"--max-waiting {self.max_waiting} must be an integer >= 0")
        if not self.grace_s >= 0:
            raise ValueError(f"--grace {self.grace_s} must be >= 0 seconds")
        if not 0 < self.timeout_s < float("inf"):
            raise ValueError(f"--timeout {self.timeout_s} must be a positive number of seconds")
        if not (isinstance(self.api_servers, int) and 1 <= self.api_servers <= 64):
            raise ValueError(f"--api-server-count {self.api_servers} must be an integer in 1 .. 64")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty; give a key or leave it (and EXPERTMESH_API_KEY) unset")


def serve_rank(spec: RunSpec, engine_cfg: EngineConfig, options: ServeOptions,
               device: torch.device = torch.device("cpu")) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        # Rank 0 alone answers a signal, and then stops every rank through the engine.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if options.fd is not None:
            os.close(options.fd)  # rank 0's API servers alone accept
    model, links, _ = load_rank(spec, device)
    engine = Engine(model, spec.cfg, spec.deployment, engine_cfg, rank, links, options.eos,
                    n_micro=spec.micro_batches, overlap=spec.overlap, graphs=spec.graphs,
                    eplb=eplb_controller(spec, model, rank))
    elastic = None
    if options.elastic:
        elastic = Elastic(spec.deployment, local_store_path(), device, options.timeout_s, spec.checkpoint, spec.seed,
                          spec.cfg.torch_dtype)
    if (beat := heartbeat.mine()) is not None:  # watched for hangs: a layer's end is progress
        model.after_layer.append(beat.mark)
    if rank != 0:
        serve_follower(engine, model, elastic)
        return
    ticket = None
    if elastic is not None:  # what `serve --join` needs (`elastic/join.py`); the launcher's pid
        ticket = elastic.write_ticket(dict(spec=spec, engine_cfg=engine_cfg, eos=options.eos,
                                           timeout_s=options.timeout_s, store=local_store_path(),
                                           launcher=os.getppid()))
    EngineServer(engine, model, spec, options, elastic, ticket).run()


def serve_follower(engine: Engine, model: MoETransformer, elastic: Elastic | None = None) -> None:
    """A rank other than 0: step with rank 0 until it says stop (surviving a lost peer when
    `elastic`)."""
    steps = 0
    beat = heartbeat.mine()
    while True:
        try:
            engine.step()
            if engine.stopped:
                return
            if beat is not None:
                beat.arm()
            if engine.joined is not None:  # a rank joins (`serve --join`)
                elastic.admit(engine, model, engine.joined)
                steps = 0
                continue
            steps += 1
            if steps % STATS_EVERY == 0:
                share_counters(engine, model)
        except RuntimeError as exc:  # what gloo raises when a peer is gone
            if elastic is None:
                raise
            elastic.recover(engine, model, exc)
            steps = 0


class FrontendDied(RuntimeError):
    pass


class EngineServer:
    """Rank 0 (see the module's docstring)."""

    def __init__(self, engine: Engine, model: MoETransformer, spec: RunSpec, options: ServeOptions,
                 elastic: Elastic | None = None, ticket: str | None = None):
        self.engine, self.model, self.spec, self.options = engine, model, spec, options
        self.elastic = ElasticServing(engine, model, elastic, ticket) if elastic is not None else None
        self.step_started: float | None = None  # monotonic time of the step in progress
        self.beat = heartbeat.mine()  # watched for hangs by the launcher (--hang-timeout)
        self.steps = 0  # warm-up included: the other ranks count those too (`follow`)
        self.signalled = False
        self.owners: dict[str, int] = {}  # request id -> the front end that sent it
        self.frontends: list[subprocess.Popen] = []
        self.listening = options.fd  # until the front ends have it

    def run(self) -> None:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        done = threading.Event()
        threading.Thread(target=self._watch, args=(done,), name="watchdog", daemon=True).start()
        private = tempfile.TemporaryDirectory(prefix="expertmesh-serve-")
        channel = None
        try:
            self._warm_up()
            if self.signalled:
                self.engine.shutdown()
                return
            channel = EngineChannel(os.path.join(private.name, "engine.sock"))
            url = self._start_frontends(private.name)
            self._loop(channel, url)
        finally:
            done.set()
            for p in self.frontends:
                if p.poll() is None:
                    p.kill()
                p.wait()
            if channel is not None:
                channel.close()
            private.cleanup()
            if self.listening is not None:
                os.close(self.listening)
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, *_) -> None:
        self.signalled = True

    def _watch(self, done: threading.Event) -> None:
        timeout = self.options.timeout_s
        while not done.wait(WATCH_S):
            started = self.step_started
            if started is not None and time.monotonic() - started > timeout:
                print(f"error: an engine step took over {timeout:.0f} s (--timeout); stopping",
                      file=sys.stderr, flush=True)
                os._exit(1)

    def _step(self):
        self.step_started = time.monotonic()
        outputs = self.engine.step()
        self.step_started = None
        if self.beat is not None:
            self.beat.arm()
        self.steps += 1
        return outputs

    def _warm_up(self) -> None:
        """One short request through every rank, so that the first client does not pay for it."""
        prompt = tuple(range(min(WARMUP_PROMPT, self.spec.cfg.max_seq_len - WARMUP_TOKENS)))
        self.engine.add_request(Request("warmup", prompt, WARMUP_TOKENS))
        while self.engine.has_work:
            self._step()

    def _start_frontends(self, private: str) -> str:
        """Start the front ends on the listening socket, then close this process's copy; the URL
        they serve."""
        o = self.options
        fd, self.listening = self.listening, None
        with socket.socket(fileno=fd) as listener:
            port = listener.getsockname()[1]
            metrics_dir = os.path.join(private, "metrics")
            os.mkdir(metrics_dir)
            waiting = -(-o.max_waiting // o.api_servers)
            for i in range(o.api_servers):
                fe = FrontendOptions(
                    index=i, socket_path=os.path.join(private, "engine.sock"), fd=listener.fileno(),
                    name=o.name, tokenizer=o.tokenizer, vocab_size=self.spec.cfg.vocab_size,
                    max_len=self.spec.cfg.max_seq_len, engine=asdict(self.engine.scheduler.cfg),
                    num_blocks=self.engine.num_blocks, max_waiting=waiting, grace_s=o.grace_s,
                    timeout_s=o.timeout_s, limits=asdict(o.limits),
                    connections=asdict(replace(o.connections, max_connections=-(
                        -o.connections.max_connections // o.api_servers))))
                env = {**os.environ, FRONTEND_ENV: json.dumps(asdict(fe)),
                       "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
                if o.api_key is not None:
                    env["EXPERTMESH_API_KEY"] = o.api_key
                self.frontends.append(subprocess.Popen(
                    [sys.executable, "-m", "expertmesh.server.frontend"], env=env,
                    pass_fds=(listener.fileno(),), start_new_session=True))
        host = f"[{o.host}]" if ":" in o.host else o.host
        return f"http://{host}:{port}/v1"

    def _loop(self, channel: EngineChannel, url: str) -> None:
        n = len(self.frontends)
        started: set[int] = set()
        startup_deadline = time.monotonic() + self.options.timeout_s
        stopping = False
        while True:
            rejected: list[dict[str, str]] = [{} for _ in range(n)]
            for index, message in channel.receive(0.0 if self.engine.has_work else IDLE_S):
                self._take(index, message, rejected[index])
                if message.started and index not in started:
                    started.add(index)
                    if len(started) == n:
                        print(f"expertmesh serve: ready at {url} (model {self.options.name!r}, "
                              f"{n} API server{'s' if n > 1 else ''})", flush=True)
            if len(started) < n and time.monotonic() > startup_deadline:
                raise RuntimeError(f"the API servers did not start within {self.options.timeout_s:.0f} s "
                                   f"(--timeout)")
            exited = [i for i, p in enumerate(self.frontends) if p.poll() is not None]
            if self.signalled and not stopping:
                stopping = True
                for p in self.frontends:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            if exited and not stopping:
                code = self.frontends[exited[0]].returncode
                self._stop_all()
                raise FrontendDied(f"API server {exited[0]} exited with code {code}; the engine stopped")
            if stopping and len(exited) == n:
                self._stop_all()
                return
            if self.elastic is not None:
                self.elastic.ask_join()
            outputs, totals = [], None
            try:
                outputs = self._step_and_record()
                totals = self._count()
            except BaseException as exc:
                self.step_started = None
                try:
                    if self.elastic is None or not isinstance(exc, RuntimeError):
                        raise
                    # the step's tokens when the counters' collective failed after it: recorded
                    # as streamed, so sent now (they were lost once, a token missing mid-stream)
                    outputs = outputs + self.elastic.recover(exc)
                    self.steps = 0
                except BaseException:
                    for i in range(n):
                        channel.send(i, FromEngine(failure=f"the engine failed ({type(exc).__name__})"))
                    self._await_frontends()
                    raise
            tokens: list[list[Token]] = [[] for _ in range(n)]
            for out in outputs:
                owner = self.owners.get(out.request_id)
                if owner is not None:
                    tokens[owner].append(Token(out.request_id, out.token, out.finished, out.cached,
                                               out.logprobs))
                    if out.finished:
                        del self.owners[out.request_id]
            stats = self.engine.stats()
            for i in range(n):
                channel.send(i, FromEngine(tokens[i], rejected[i], stats, totals if i == 0 else None,
                                           **(self.elastic.news(i) if self.elastic is not None else {})))
            if self.elastic is not None:
                self.elastic.sent()

    def _step_and_record(self) -> list:
        """A step's outputs, recorded in the ledger as streamed (elastic)."""
        outputs = self._step()
        if self.elastic is not None and self.elastic.after_step(outputs):
            self.steps = 0  # the step was the boundary a rank joined at
        return outputs

    def _count(self):
        """Every `STATS_EVERY` steps (not the step a rank joined at) the ranks' counters, else None."""
        if self.steps % STATS_EVERY or self.steps == 0:
            return None
        cfg = self.spec.cfg
        ranks = share_counters(self.engine, self.model)
        return counter_totals(ranks, cfg.n_experts, cfg.d_model * cfg.torch_dtype.itemsize,
                              self.spec.deployment.tp)

    def _take(self, index: int, message, rejected: dict[str, str]) -> None:
        for request_id in message.aborts:
            if self.owners.pop(request_id, None) is not None:
                self.engine.abort(request_id)
                if self.elastic is not None:
                    self.elastic.ledger.drop(request_id)
        for r in message.new:
            try:
                request = Request(r.id, tuple(r.prompt), r.max_tokens, tuple(r.stop), r.temperature,
                                  r.top_p, r.seed, **r.options)
                self.engine.add_request(request)
                self.owners[r.id] = index
                if self.elastic is not None:
                    self.elastic.ledger.add(request)
            except ValueError as exc:  # the front end checked what it could; the pool is ours
                rejected[r.id] = str(exc)

    def _stop_all(self) -> None:
        """End what is left, stop every rank and every front end."""
        for request_id in list(self.owners):
            self.engine.abort(request_id)
        self.owners.clear()
        for p in self.frontends:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        self.engine.shutdown()
        self._await_frontends()

    def _await_frontends(self) -> None:
        deadline = time.monotonic() + FRONTEND_EXIT_S
        for p in self.frontends:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
