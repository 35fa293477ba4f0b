"""`expertmesh serve` (the OpenAI-compatible server) and `expertmesh bench serve` (its load test).

Everything the user can get wrong (model, deployment, engine budget, address) is checked here,
before any rank starts. `single` serves in this process; other deployments start one process per
rank (or join torchrun), and this process forwards SIGINT / SIGTERM to them as SIGTERM, which
rank 0 answers with a graceful shutdown and the other ranks ignore.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing as mp
import ipaddress
import os
import signal
import socket
import sys

import torch

from expertmesh.checkpoint import has_tokenizer
from expertmesh.checkpoint.hf_config import eos_ids
from expertmesh.deployment import Deployment
from expertmesh.elastic import elastic_spec
from expertmesh.engine.engine import pool_blocks
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.spec import RunSpec
from expertmesh.heartbeat import DEFAULT_HANG_S, check_hang_timeout
from expertmesh.launch import launch, local_device, under_torchrun
from expertmesh.run_flags import (add_balance_args, add_eager_arg, add_exchange_args, add_memory_args,
                                  spec_from_flags)

# The launcher bounds a whole run; a server runs until it is stopped, and `--timeout` bounds
# each engine step instead (server/engine_process.py).
SERVE_LIFETIME_S = 10 * 365 * 86400.0
API_KEY_ENV = "EXPERTMESH_API_KEY"
LISTEN_BACKLOG = 2048  # connections the kernel queues before an API server accepts them


def serve_plan(args) -> tuple[RunSpec, EngineConfig]:
    """The validated spec and engine budget of `serve`'s flags; raises ValueError (one line) on a
    bad one."""
    deployment = Deployment.parse(args.deployment)
    if args.redundant_experts and not (args.elastic or args.routing or args.eplb_interval is not None):
        raise ValueError("--redundant-experts needs --routing FILE, --eplb-interval K or --elastic "
                         "to say what the spare slots hold")
    if args.elastic and (args.eplb_interval is not None or args.routing):
        raise ValueError("--elastic places its own spare replicas (--redundant-experts R); "
                         "drop --eplb-interval and --routing")
    # --elastic lays out --redundant-experts itself (elastic_spec), after the run flags' checks
    spares = dict(redundant_experts=0, routing=None) if args.elastic else {}
    run_args = argparse.Namespace(**{**vars(args), **dict(
        prompt=None, prompt_ids=None, batch=1, prompt_len=1, gen_len=1, temperature=0.0, top_p=1.0,
        record_routing=None, trace=None), **spares})
    spec = spec_from_flags(run_args, deployment)
    engine = EngineConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                          kv_cache_gb=args.kv_cache_gb, gpu_memory_utilization=args.gpu_memory_utilization,
                          max_batched_tokens=args.max_batched_tokens,
                          max_seqs=args.max_seqs, prefix_caching=args.prefix_caching,
                          dp_routing=args.dp_routing)
    pool_blocks(spec.cfg, deployment, engine)
    if args.elastic:
        spec = elastic_spec(spec, args.redundant_experts, args.backend)
    return spec, engine


def cmd_serve(args) -> int:
    if args.join is not None:
        return cmd_join(args)
    spec, engine = serve_plan(args)
    deployment = spec.deployment
    try:
        from expertmesh.server.app import Limits
        from expertmesh.server.connections import ConnectionLimits
        from expertmesh.server.engine_process import ServeOptions, serve_rank
    except ImportError as exc:
        raise ValueError(f"expertmesh serve needs the serve extra ({exc.name} is missing): "
                         f"pip install -e '.[serve]'") from None
    tokenizer = args.model if args.model and has_tokenizer(args.model) else None
    options = ServeOptions(host=args.host, port=args.port, name=args.served_model_name or spec.cfg.name,
                           tokenizer=tokenizer, eos=eos_ids(args.model) if args.model else (),
                           max_waiting=args.max_waiting, grace_s=args.grace, timeout_s=args.timeout,
                           api_servers=args.api_server_count,
                           limits=Limits(int(args.max_body_mb * 2**20), args.max_stops, args.max_stop_chars),
                           connections=ConnectionLimits(args.max_connections, args.header_timeout,
                                                        args.body_timeout, args.keep_alive_timeout),
                           elastic=args.elastic,
                           api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV))
    hang_s = hang_timeout(args)
    if not under_torchrun() or os.environ.get("RANK") == "0":
        # Bound and listening before any rank loads: a second server on this port fails here.
        options = dataclasses.replace(options, fd=_listen(args.host, args.port))
        if options.api_key is None and not _loopback(args.host):
            print(f"warning: listening on {args.host} without an API key: anyone who can reach this "
                  f"machine can use the server; set --api-key (or {API_KEY_ENV})", file=sys.stderr, flush=True)
    fn = functools.partial(serve_rank, spec, engine, options)
    try:
        if deployment.world_size == 1 and not under_torchrun():
            if "OMP_NUM_THREADS" not in os.environ:  # else torch took it at start-up
                torch.set_num_threads(max(1, os.cpu_count() or 1))
            fn(local_device(1, args.backend))
            return 0
        if under_torchrun():  # this process is a rank: rank 0 answers the signals itself
            launch(fn, deployment.world_size, backend=args.backend, timeout=SERVE_LIFETIME_S)
            return 0
        # The ranks inherit the listening socket: this process lets go of it once they stop.
        listening = [options.fd]

        def forward(_signum, _frame) -> None:
            _let_go(listening)
            for child in mp.active_children():
                os.kill(child.pid, signal.SIGTERM)
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            launch(fn, deployment.world_size, backend=args.backend, timeout=SERVE_LIFETIME_S,
                   elastic=args.elastic, hang_s=hang_s)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _let_go(listening)
    except RuntimeError as exc:  # the in-process server's failure (the launcher's is a RankFailure)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def hang_timeout(args) -> float | None:
    """`--hang-timeout`, checked: None without --elastic (a hung rank then ends the server at
    --timeout); by default `DEFAULT_HANG_S`, or half of a shorter --timeout."""
    if not args.elastic:
        if args.hang_timeout is not None:
            raise ValueError("--hang-timeout needs --elastic (a hung rank is killed and survived); "
                             "without it a hung step ends the server at --timeout")
        return None
    hang_s = args.hang_timeout if args.hang_timeout is not None else min(DEFAULT_HANG_S, args.timeout / 2)
    check_hang_timeout(hang_s, args.timeout)
    return hang_s


def cmd_join(args) -> int:
    """`serve --join URL`: this process becomes a rank of the degraded elastic server at URL
    (`elastic/join.py`), on this machine, and serves until the server stops it."""
    try:
        from expertmesh.elastic.join import join
        from expertmesh.server.engine_process import serve_follower
    except ImportError as exc:
        raise ValueError(f"expertmesh serve needs the serve extra ({exc.name} is missing): "
                         f"pip install -e '.[serve]'") from None
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    try:
        engine, model, elastic = join(args.join, api_key)
        serve_follower(engine, model, elastic)
    except RuntimeError as exc:  # the server went away, or failed, while this rank ran
        print(f"error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    print("expertmesh serve --join: stopped with the server", file=sys.stderr, flush=True)
    os._exit(0)  # as the launcher's ranks: skip a teardown that could wait on peers gone


def _loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (OSError, ValueError):
        return False


def _let_go(fds: list[int]) -> None:
    """Close the file descriptors in `fds` (once: the list is emptied)."""
    while fds:
        os.close(fds.pop())


def _listen(host: str, port: int) -> int:
    """The file descriptor of a socket listening on host:port (its ranks inherit it; rank 0's API
    servers accept on it). Fails now, not on rank 0 after loading, if another process has it."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind((host, port))
            s.listen(LISTEN_BACKLOG)
        except OSError:
            s.close()
            raise
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another "
                         f"--port or --host") from None
    return s.detach()


def cmd_bench_serve(args) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from expertmesh.server.bench import BenchConfig, parse_range, plot, run_bench, write_json

    def ids(text: str | None, flag: str) -> tuple[int, int] | None:
        return None if text is None else parse_range(text, flag, "token ids")

    cfg = BenchConfig(url=args.url, num_prompts=args.num_prompts, rate=args.rate,
                      input_len=parse_range(args.input_len, "--input-len"),
                      output_len=parse_range(args.output_len, "--output-len"), seed=args.seed,
                      model=args.model, endpoint=args.endpoint, tokenizer=args.tokenizer, vocab=args.vocab,
                      ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo, timeout=args.timeout,
                      dataset=args.dataset, prefix_len=args.prefix_len, num_prefixes=args.num_prefixes,
                      switch_every=args.switch_every, prompts_a=args.prompts_a, prompts_b=args.prompts_b,
                      tokens_a=ids(args.tokens_a, "--tokens-a"), tokens_b=ids(args.tokens_b, "--tokens-b"))
    console = Console()
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"{cfg.num_prompts} requests at {cfg.rate} req/s", total=cfg.num_prompts)
        result = run_bench(cfg, on_done=lambda: progress.advance(task))
    table = Table(title=f"expertmesh bench serve: {result['model']} at {cfg.url}, {cfg.num_prompts} "
                        f"requests at {cfg.rate} req/s")
    for col in ("metric", "mean", "p50", "p90", "p99"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name in ("ttft", "tpot", "itl", "e2e"):
        row = result[f"{name}_s"]
        table.add_row(f"{name.upper()} (ms)", *["-" if row[k] is None else f"{row[k] * 1e3:.1f}"
                                                for k in ("mean", "p50", "p90", "p99")])
    console.print(table)
    console.print(f"completed {result['completed']} / {cfg.num_prompts} in {result['duration_s']:.2f} s: "
                  f"{result['request_throughput']:.2f} req/s, {result['output_token_throughput']:.1f} "
                  f"output tok/s, {result['total_token_throughput']:.1f} total tok/s" +
                  (f", goodput {result['goodput']:.2f} req/s" if result["goodput"] is not None else "") +
                  f"; prefix cache hit rate {result['prefix_hit_rate']:.1%} of prompt tokens")
    for error in result["errors"]:
        console.print(f"[red]failed request: {error}[/red]")
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return 1 if result["failed"] else 0


def add_commands(sub) -> None:
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over the serving engine")
    serve.add_argument("--preset", default="tiny", help="model preset (token-id prompts only)")
    serve.add_argument("--model", default=None, help="a Hugging Face model directory (Mixtral, "
                       "Qwen2-MoE, OLMoE; safetensors), with a tokenizer for text and chat")
    serve.add_argument("--served-model-name", default=None,
                       help="the model's name in the API (default: the preset's or the directory's)")
    serve.add_argument("--dtype", default=None, help="fp32 or bf16 (default: the model's)")
    serve.add_argument("--deployment", default="single", help="single, ep2, tp2, ep8pp2, ...")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default loopback only; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--seed", type=int, default=0, help="seed of a preset's synthetic weights")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    add_memory_args(serve)
    serve.add_argument("--max-batched-tokens", type=int, default=512, help="tokens per engine step")
    serve.add_argument("--max-seqs", type=int, default=64, help="running sequences per data-parallel rank")
    serve.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                       help="recompute every prompt (default: reuse cached KV blocks of shared prefixes)")
    serve.add_argument("--dp-routing", default="cache",
                       help="how rank 0 places requests on data-parallel ranks: cache (where the "
                       "prefix is cached, balanced against queued tokens) or load (default cache)")
    serve.add_argument("--micro-batches", type=int, default=None,
                       help="pipeline micro-batches per engine step (default: pp)")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="requests waiting for their first token before new ones get 429")
    serve.add_argument("--grace", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM / SIGINT")
    serve.add_argument("--timeout", type=float, default=600.0,
                       help="seconds one engine step (or the start-up) may take before the server gives up")
    serve.add_argument("--api-server-count", type=int, default=1,
                       help="API server processes (HTTP, tokenization, detokenization) sharing the port")
    serve.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on every "
                       f"/v1 route (default: ${API_KEY_ENV}, else no key)")
    serve.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (MiB); "
                       "larger ones get 413")
    serve.add_argument("--max-stops", type=int, default=64,
                       help="most stop strings, and most stop token ids, in one request")
    serve.add_argument("--max-stop-chars", type=int, default=4096,
                       help="most characters of all the stop strings of one request")
    serve.add_argument("--max-connections", type=int, default=1024, help="open HTTP connections "
                       "(all API servers together); past it a new connection gets 503 and is closed")
    serve.add_argument("--header-timeout", type=float, default=30.0,
                       help="seconds a request's headers may take to arrive (else 408 and close)")
    serve.add_argument("--body-timeout", type=float, default=60.0,
                       help="seconds a request's body may take once its headers are in (else 408)")
    serve.add_argument("--keep-alive-timeout", type=float, default=5.0,
                       help="seconds an idle connection is kept open between requests")
    serve.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with CUDA, else gloo)")
    serve.add_argument("--elastic", action="store_true", help="survive the loss of an EP rank other "
                       "than 0 (epN or epNppM, local CPU ranks): its experts and requests move to the others")
    serve.add_argument("--hang-timeout", type=float, default=None, help="--elastic: seconds a rank "
                       f"may go without a heartbeat, or compute without finishing a layer, before it "
                       f"is killed as hung and survived (default {DEFAULT_HANG_S:g}; waiting on "
                       f"other ranks, start-up and recovery do not count)")
    serve.add_argument("--join", default=None, metavar="URL", help="join the degraded --elastic "
                       "server at URL (e.g. http://127.0.0.1:8000) as a new rank, in place of a lost "
                       "one (plain epN only, no pipeline stages): on the server's machine, as its user; it takes experts and a "
                       "data-parallel rank and serves until the server stops (the model and the "
                       "deployment are the server's; --api-key is sent if it has one)")
    add_exchange_args(serve)
    add_eager_arg(serve)
    add_balance_args(serve)
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks against a running server")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    load = bench_sub.add_parser("serve", help="a load test of an OpenAI-compatible server: Poisson "
                                "arrivals, streamed answers, TTFT / TPOT / ITL percentiles, goodput")
    load.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's base URL")
    load.add_argument("--num-prompts", type=int, default=100)
    load.add_argument("--rate", type=float, default=float("inf"),
                      help="requests per second, Poisson arrivals (inf: all at once)")
    load.add_argument("--input-len", default="128", help="prompt tokens: N or LOW:HIGH")
    load.add_argument("--output-len", default="64", help="generated tokens: N or LOW:HIGH")
    load.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    load.add_argument("--model", default=None, help="model name (default: the server's first)")
    load.add_argument("--endpoint", default="completions", choices=("completions", "chat"))
    load.add_argument("--tokenizer", default=None,
                      help="a tokenizer directory: send the text of the random ids instead of ids")
    load.add_argument("--vocab", type=int, default=100, help="prompt ids are drawn from 1 .. vocab-1")
    load.add_argument("--dataset", default="random",
                      help="random; shared-prefix: one of --num-prefixes prefixes of --prefix-len "
                      "tokens, then --input-len tokens of its own; alternating: prompts from two "
                      "distributions, A and B, switching every --switch-every requests")
    load.add_argument("--prefix-len", type=int, default=0, help="shared-prefix: tokens per prefix")
    load.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: how many prefixes")
    load.add_argument("--switch-every", type=int, default=0,
                      help="alternating: requests per phase (A, then B, then A, ... in send order)")
    load.add_argument("--tokens-a", default=None, help="alternating: phase A's prompt ids, LOW:HIGH "
                      "inclusive (default 1 .. vocab/2 - 1)")
    load.add_argument("--tokens-b", default=None, help="alternating: phase B's prompt ids, LOW:HIGH "
                      "inclusive (default vocab/2 .. vocab - 1); disjoint from A's")
    load.add_argument("--prompts-a", default=None, help="alternating: a text file of phase A's "
                      "prompts, one per line (with --prompts-b; instead of token ids)")
    load.add_argument("--prompts-b", default=None, help="alternating: a text file of phase B's prompts")
    load.add_argument("--ttft-slo", type=float, default=None, help="seconds, for goodput")
    load.add_argument("--tpot-slo", type=float, default=None, help="seconds, for goodput")
    load.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    load.add_argument("--json", default=None, help="write the summary and every request's times here")
    load.add_argument("--plot", default=None, help="write CDFs of TTFT, TPOT and ITL to this PNG")
    load.set_defaults(func=cmd_bench_serve)
