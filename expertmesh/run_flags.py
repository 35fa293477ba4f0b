"""The run flags: their definitions, and their translation into a validated `RunSpec`.

`run` and `compare` take all of them; `serve` takes the model, deployment and exchange flags
(`add_exchange_args`) and `--enforce-eager` (`add_eager_arg`), and builds its spec through the
same `spec_from_flags`, so every command checks them alike, before any rank starts.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from expertmesh.checkpoint import config_from_hf, encode
from expertmesh.config import DTYPES, Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.spec import RunSpec, refuse_off_ep
from expertmesh.model.expert_kernels import SETTINGS
from expertmesh.parallel.dispatch import LOW_LATENCY_TOKENS, REPLICA_ROUTINGS
from expertmesh.parallel.expert import OVERLAPS, TWO_BATCH_TOKENS
from expertmesh.parallel.eplb import INTERVAL, EplbConfig
from expertmesh.parallel.eplb_plan import eplb_start
from expertmesh.parallel.placement import balanced_placement, expert_loads, load_placement, load_routing


def _prompt_ids(text: str | None):
    if not text:
        return None
    try:
        return tuple(tuple(int(t) for t in p.split(",") if t.strip()) for p in text.split(";"))
    except ValueError:
        raise ValueError(f"cannot read --prompt-ids {text!r}; give comma-separated integers, "
                         f"prompts separated by ';' (e.g. 1,2,3;4,5,6)") from None


def _chunks(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--a2a-chunks {text!r} must be a positive integer or auto") from None


def _skew(text: str | None) -> tuple[float, int]:
    """`zipf:S` or `zipf:S,shift:N` -> (S, N; 0: the hot experts never move)."""
    if not text:
        return 0.0, 0
    skew, _, shift = text.partition(",")
    kind, _, value = skew.partition(":")
    name, _, steps = shift.partition(":")
    try:
        if kind == "zipf" and float(value) >= 0 and (not shift or (name == "shift" and int(steps) >= 1)):
            return float(value), int(steps) if shift else 0
    except ValueError:
        pass
    raise ValueError(f"--router-skew {text!r}: write zipf:S with S >= 0, e.g. zipf:1.2, and "
                     f"optionally ,shift:N (N >= 1 steps), e.g. zipf:1.2,shift:200")


def spec_from_flags(args, deployment: Deployment, record_logits: bool = False, ep_flags: bool = True) -> RunSpec:
    """The validated plan of `deployment` under the run flags. `ep_flags`: False leaves out the
    options of the token exchange (compare's reference, and its non-EP deployments when another
    is expert-parallel)."""
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {args.dtype!r}; use one of: {', '.join(DTYPES)}")
    if args.model:
        cfg = config_from_hf(args.model, args.dtype)
    else:
        cfg = preset(args.preset, **({"dtype": args.dtype} if args.dtype else {}))
    skew, shift = _skew(args.router_skew)
    cfg = cfg.with_(router_skew=skew, router_skew_shift=shift, capacity_factor=args.capacity_factor,
                    overflow=args.overflow)
    if args.prompt and not args.model:
        raise ValueError("--prompt needs --model PATH, whose tokenizer.json encodes the text; "
                         "with a preset give --prompt-ids")
    if args.prompt and args.batch is not None:
        raise ValueError("--batch does not apply to --prompt, which is one sequence; drop --batch, "
                         "or give a batch of token ids with --prompt-ids 1,2;3,4")
    prompt_ids = (encode(args.model, args.prompt),) if args.prompt else _prompt_ids(args.prompt_ids)
    batch = args.batch if args.batch is not None else args.default_batch
    workload = Workload(batch_size=batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
                        seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                        prompt_ids=prompt_ids)
    placement = None
    eplb = eplb_from_flags(args) if ep_flags else None
    if ep_flags:
        refuse_off_ep("--placement", bool(args.placement), deployment)
        refuse_off_ep("--redundant-experts", bool(args.redundant_experts), deployment)
        refuse_off_ep("--overlap tbo", args.overlap == "tbo", deployment)
        if args.placement:
            placement = load_placement(args.placement, cfg.n_layers, cfg.n_experts, deployment.ep)
        if eplb is not None:
            refuse_off_ep("--eplb-interval", True, deployment)
        if args.redundant_experts and eplb is not None and not args.placement:
            loads = [expert_loads(layer, cfg.n_experts) for layer in load_routing(args.routing)] if args.routing else None
            placement = eplb_start(cfg, deployment.ep, args.redundant_experts, loads)
        elif args.redundant_experts:
            if not args.routing:
                raise ValueError("--redundant-experts needs --routing FILE (from `run "
                                 "--record-routing`) to know which experts are hot")
            placement = balanced_placement(load_routing(args.routing), cfg, deployment.ep,
                                           args.redundant_experts)
    spec = RunSpec(cfg, deployment, workload, seed=args.seed, n_micro=args.micro_batches,
                   record_logits=record_logits, checkpoint=args.model,
                   a2a=args.a2a if ep_flags else "flat",
                   a2a_chunks=_chunks(args.a2a_chunks), overlap=args.overlap if ep_flags else "auto",
                   low_latency_tokens=args.low_latency_tokens,
                   gpus_per_node=args.gpus_per_node if deployment.world_size > 1 else 1,
                   placement=placement, replica_routing=args.replica_routing if ep_flags else "local",
                   record_routing=bool(getattr(args, "record_routing", None)), trace=bool(args.trace),
                   enforce_eager=bool(getattr(args, "enforce_eager", False)), eplb=eplb,
                   expert_kernel=args.expert_kernel)
    spec.validate(deployment.world_size)
    return spec


def add_run_args(p: argparse.ArgumentParser, batch: int, prompt_len: int, gen_len: int) -> None:
    """The flags of `run` and `compare`, with their default batch and lengths."""
    p.add_argument("--preset", default="tiny", help="model preset: tiny, small, paper (default tiny)")
    p.add_argument("--model", default=None, help="a Hugging Face model directory (Mixtral, "
                                                 "Qwen2-MoE, OLMoE; safetensors) instead of a preset")
    p.add_argument("--prompt", default=None, help="prompt text, encoded with --model's tokenizer.json")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: the preset's)")
    p.add_argument("--batch", type=int, default=None, help=f"sequences in the batch (default {batch})")
    p.set_defaults(default_batch=batch)
    p.add_argument("--prompt-len", type=int, default=prompt_len, help="synthetic prompt tokens per sequence")
    p.add_argument("--gen-len", type=int, default=gen_len, help="tokens to generate per sequence")
    p.add_argument("--prompt-ids", default=None, help="explicit prompts: 1,2,3;4,5,6 (overrides batch / prompt-len)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, prompts and sampling")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--micro-batches", type=int, default=None, help="pipeline micro-batches (default: pp)")
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with CUDA, else gloo)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before a stuck run is stopped (positive, finite)")
    p.add_argument("--json", default=None, help="write metrics and generated token ids to this file")
    add_exchange_args(p)
    add_eager_arg(p)
    p.add_argument("--trace", default=None, help="write a Perfetto trace JSON per run to this folder")
    add_balance_args(p)


def add_balance_args(p: argparse.ArgumentParser) -> None:
    """Redundant experts and online rebalancing (`run`, `compare`, `serve`)."""
    p.add_argument("--redundant-experts", type=int, default=0,
                   help="extra replicas of hot experts, planned from --routing statistics; with "
                        "--eplb-interval: spare expert slots per rank that rebalancing refills; with "
                        "serve --elastic: spares copying the next rank's experts, served at once "
                        "when that rank is lost")
    p.add_argument("--routing", default=None, help="routing statistics from `run --record-routing`")
    p.add_argument("--eplb-interval", type=int, nargs="?", const=INTERVAL, default=None,
                   help=f"online expert load balancing: re-place hot experts every K steps (off "
                        f"unless given; given alone: {INTERVAL}); needs --redundant-experts R")
    p.add_argument("--eplb-window", type=int, default=None,
                   help="with --eplb-interval: the last W steps of each interval are measured "
                        "(default: half the interval)")
    p.add_argument("--eplb-layers-per-step", type=int, default=1,
                   help="with --eplb-interval: most layers whose weights start moving per step (default 1)")


def eplb_from_flags(args) -> EplbConfig | None:
    """The online EPLB flags -> its config (validated), or None when `--eplb-interval` is absent."""
    if args.eplb_interval is None:
        for flag, given in (("--eplb-window", args.eplb_window is not None),
                            ("--eplb-layers-per-step", args.eplb_layers_per_step != 1)):
            if given:
                raise ValueError(f"{flag} applies to online rebalancing; add --eplb-interval K")
        return None
    window = args.eplb_window if args.eplb_window is not None else max(1, args.eplb_interval // 2)
    config = EplbConfig(args.eplb_interval, window, args.eplb_layers_per_step)
    config.validate()
    return config


def add_eager_arg(p: argparse.ArgumentParser) -> None:
    """`--enforce-eager` (`run`, `compare`, `serve`): `RunSpec.enforce_eager`."""
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs for decode steps (captured on CUDA by default)")


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """The KV pool's size (`serve`): blocks, else GiB, else the share of a GPU's memory."""
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="on a GPU, without --kv-cache-gb / --num-blocks: the share of the device's "
                        "memory the rank may fill (weights, activations, then KV blocks; default 0.9)")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV cache per rank in GiB (overrides --gpu-memory-utilization; default on "
                        "the CPU: 1)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per rank (overrides both)")


def add_exchange_args(p: argparse.ArgumentParser) -> None:
    """The flags of the token exchange and the experts (`run`, `compare`, `serve`)."""
    p.add_argument("--a2a", default="flat", choices=("flat", "hierarchical"),
                   help="token exchange: flat all-to-all, or hierarchical (cross each node boundary once)")
    p.add_argument("--a2a-chunks", default="auto", help="chunks whose exchange overlaps expert compute (default auto)")
    p.add_argument("--low-latency-tokens", type=int, default=LOW_LATENCY_TOKENS,
                   help="EP: a forward whose every rank has at most N tokens uses the low-latency "
                        f"exchange, one fixed-size message per direction (default {LOW_LATENCY_TOKENS}; 0: never)")
    p.add_argument("--overlap", default="auto", choices=OVERLAPS,
                   help="EP: tbo (two micro-batches take turns, one's exchange in flight while the other "
                        "computes), chunks (--a2a-chunks overlap the exchange with expert compute), none "
                        f"(wait for every exchange at once), auto (tbo from {TWO_BATCH_TOKENS} tokens per "
                        "rank, else chunks; default)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="ranks per node (default: LOCAL_WORLD_SIZE, or one node)")
    p.add_argument("--placement", default=None, help="expert placement JSON from `expertmesh place`")
    p.add_argument("--replica-routing", default="local", choices=REPLICA_ROUTINGS,
                   help="EP with replicated experts: local (each rank's own replica, else one on its "
                        "node; default) or balanced (per layer call, split each replicated expert's "
                        "tokens over its holders so the ranks compute about as many rows: one small "
                        "all-gather per layer)")
    p.add_argument("--expert-kernel", default="auto",
                   help=f"the experts' matmuls ({', '.join(SETTINGS)}): grouped (torch._grouped_mm "
                        "where it applies), loop (one matmul per expert), auto (the faster of the two "
                        "as timed once on this machine for the model's shapes and dtype, cached in "
                        "$EXPERTMESH_CACHE or ~/.cache/expertmesh; default)")
    p.add_argument("--router-skew", default=None, help="bias expert popularity, e.g. zipf:1.2 (experiments)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="cap tokens per expert per call at C x fair share (default: no cap, dropless)")
    p.add_argument("--overflow", default="drop", choices=("drop", "reroute"),
                   help="with --capacity-factor: drop the assignment or reroute it to the next-best expert")


def check_output(flag: str, path: str | None, directory: bool = False) -> None:
    """An output path that cannot be written is an error before the run, not after it."""
    if not path:
        return
    target = Path(path)
    if target.exists() and target.is_dir() != directory:
        raise ValueError(f"{flag} {path} is {'not ' if directory else ''}a directory; give a "
                         f"{'directory' if directory else 'file'} path")
    folder = target if directory else target.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # what will be created in
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory; fix the path")
    if not os.access(existing, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag} {path}: no permission to write there; choose another path")
