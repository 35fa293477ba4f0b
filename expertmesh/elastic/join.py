"""`expertmesh serve --join URL`: a new process joins a degraded elastic server (`serve --elastic`
that lost a rank) and takes experts and a data-parallel rank at a step boundary.

It runs on the server's machine, as its user: the ranks meet through the launcher's file store,
in a private folder, and gloo on loopback (no torchrun). The protocol:
  1. `GET URL/health`: the server must answer, be elastic (the body lists `ranks`) and be
     `degraded` (fewer ranks than it started with); else a one-line error, exit 2.
  2. `GET URL/admin/join` (the API key, if the server has one): the path of the ticket rank 0
     left beside the store (`Elastic.write_ticket`): the run's spec, engine budget, eos ids,
     `--timeout`, the store's path and the launcher's pid.
  3. This process writes `join-request-<pid>` beside the store. Rank 0 sees it between two steps
     (`Elastic.join_request`), writes `joined-<rank>` (this pid: the launcher watches it from then
     on, marks it dead if it ends, and kills it when the run ends) and the answer
     (`join-answer-<pid>`: this process's rank number, the next unused one, and a fresh store),
     and sends the next step as a bare boundary (`Engine.joined`; new requests wait one step).
  4. Every rank leaves its groups and meets in the fresh store, this one last (`Elastic.admit`);
     rank 0 broadcasts the placements, pids and kernel plan; every rank moves to
     `join_placement` (the ranks holding the most experts give one each until the counts are
     even: they drop those weights, this process reads them from the checkpoint or rebuilds them
     from the seed); one all-gather of the schedulers' stats; the engines resume as ep<N+1>.
  5. It then steps with rank 0 as any other rank (`server/engine_process.py: serve_follower`,
     surviving another loss) until rank 0 stops every rank; new requests go to its
     data-parallel rank as to the others.

What crosses: two HTTP requests on loopback, files beside the store, the new group's
rendezvous, one broadcast (placements: a few integers per expert and layer) and one all-gather of
stats; no weights.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import torch
import torch.distributed as dist

from expertmesh.checkpoint.loader import load_checkpoint
from expertmesh.deployment import Deployment
from expertmesh.elastic.experts import join_placement, local_dispatcher
from expertmesh.elastic.recovery import JOIN_ANSWER, JOIN_REQUEST, Elastic
from expertmesh.engine.engine import Engine
from expertmesh.engine.shard import shard_model
from expertmesh.launch import process_running, init_group, write_marker
from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import materialize
from expertmesh.parallel.expert import dispatchers
from expertmesh.parallel.mesh import stage_group
from expertmesh.rank_env import prepare_local_rank

HTTP_S = 10.0  # what the server gets to answer each of the two requests
POLL_S = 0.01  # how often this process looks for rank 0's answer
LAUNCHER_POLL_S = 0.5  # how often it checks that the server's launcher still runs


def ticket(url: str, api_key: str | None) -> dict:
    """The server's ticket, once its health says a rank may join; ValueError (one line) when
    there is no server, it is not elastic, not degraded, runs pipeline stages (a joining rank
    would have to take a stage's layers and a pipeline's place: not built), or the ticket cannot
    be read here."""
    base = url.rstrip("/").removesuffix("/v1")
    health = _get(f"{base}/health", None, url)
    if "ranks" not in health:
        raise ValueError(f"the server at {url} is not elastic (start it with --elastic); no rank can join it")
    if not health.get("degraded"):
        ok = sum(r["state"] == "ok" for r in health["ranks"])
        raise ValueError(f"the server at {url} is not degraded: its {ok} ranks are all up; --join "
                         f"only replaces a lost rank")
    path = _get(f"{base}/admin/join", api_key, url)["ticket"]
    try:
        with open(path, "rb") as f:
            t = pickle.load(f)
    except OSError:
        raise ValueError(f"cannot read the server's join ticket ({path}): --join must run on the "
                         f"server's machine, as the user that started it") from None
    if (dep := t["spec"].deployment).pp > 1:
        raise ValueError(f"the server at {url} runs pipeline stages ({dep.name}); --join replaces a "
                         f"lost rank of plain expert parallelism (ep2, ep4, ...) only")
    return t


def _get(address: str, api_key: str | None, url: str) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(address, headers=headers), timeout=HTTP_S) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        raise ValueError(f"the server at {url} refused: {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"no expertmesh server answers at {url} ({reason})") from None


def ask(store: str, timeout: float) -> tuple[int, str, int]:
    """Ask rank 0 to admit this process; (its rank number, the joined group's store, its size).
    ValueError (one line) when refused; RuntimeError when no answer comes within `timeout`."""
    folder = os.path.dirname(store)
    pid = os.getpid()
    write_marker(os.path.join(folder, f"{JOIN_REQUEST}{pid}"), b"")
    answer = os.path.join(folder, f"{JOIN_ANSWER}{pid}")
    deadline = time.monotonic() + timeout
    while not os.path.exists(answer):
        if not os.path.isdir(folder):
            raise RuntimeError("the server stopped before it admitted this process")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not admit this process within {timeout:.0f} s (--timeout)")
        time.sleep(POLL_S)
    with open(answer, "rb") as f:
        reply = pickle.load(f)
    os.remove(answer)
    if reply[0] != "admitted":
        raise ValueError(f"the server refused: {reply[1]}")
    return reply[1], reply[2], reply[3]


def build_rank(spec, state: dict, group, rank: int, device: torch.device):
    """This process's shard as rank `rank` (the last) of the joined group: its experts those of
    `join_placement` of the placements rank 0 sent, read or rebuilt as the other ranks' are, the
    dense weights all of them; the group's kernel plan, and dispatchers as the others have."""
    placements = {i: join_placement(p)[0] for i, (p, _) in state["placements"].items()}
    any_layer = next(iter(placements.values()))
    layers = [placements.get(i, any_layer) for i in range(spec.cfg.n_layers)]
    spec = replace(spec, deployment=Deployment(ep=rank + 1), placement=layers)
    model = shard_model(spec, rank, group)
    if spec.checkpoint:
        load_checkpoint(model, spec.checkpoint, spec.cfg.torch_dtype, device)
    else:
        model = materialize(model, spec.seed, spec.cfg.torch_dtype, device)
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.kernels = state["kernels"]
    for index in dispatchers(model):
        model.layers[str(index)].moe.dispatcher = local_dispatcher(
            group, placements[index], spec.cfg.n_experts, rank, state["placements"][index][1])
    return model


def join(url: str, api_key: str | None) -> tuple[Engine, torch.nn.Module, Elastic]:
    """Steps 1 to 4 of the module's docstring: this process's engine, model and elastic state,
    as a rank of the joined group, ready to step with rank 0 (`server/cli.py` then runs
    `serve_follower`)."""
    t = ticket(url, api_key)
    spec, timeout, store = t["spec"], t["timeout_s"], t["store"]
    threading.Thread(target=_die_with_launcher, args=(t["launcher"],), daemon=True).start()
    torch.set_num_threads(1)  # as the launcher's ranks: they share the cores
    prepare_local_rank("gloo")
    device = torch.device("cpu")
    rank_number, joined_store, size = ask(store, timeout)
    started = time.monotonic()
    rank = size - 1  # the new rank is the joined group's last
    init_group("gloo", dist.FileStore(joined_store, size), rank, size, timeout, device)
    group = stage_group(Deployment(ep=size), rank)
    box = [None]
    dist.broadcast_object_list(box, src=0)
    state = box[0]
    model = build_rank(spec, state, group, rank, device)
    engine = Engine(model, spec.cfg, Deployment(ep=size), t["engine_cfg"], rank, None, t["eos"],
                    n_micro=spec.micro_batches, overlap=spec.overlap, graphs=spec.graphs)
    everyone: list = [None] * size
    dist.all_gather_object(everyone, engine.scheduler.stats())
    elastic = Elastic(Deployment(ep=size), store, device, timeout, spec.checkpoint, spec.seed, spec.cfg.torch_dtype, joined=state)
    print(f"expertmesh serve --join: joined as rank {rank_number} (pid {os.getpid()}) of ep{size} "
          f"in {time.monotonic() - started:.2f} s", file=sys.stderr, flush=True)
    return engine, model, elastic


def _die_with_launcher(pid: int) -> None:
    """This process is not the launcher's child (no parent-death signal): it goes when the
    launcher goes, as the launcher's own ranks do."""
    while process_running(pid):
        time.sleep(LAUNCHER_POLL_S)
    print("error: the server's launcher is gone; exiting", file=sys.stderr, flush=True)
    os._exit(1)
