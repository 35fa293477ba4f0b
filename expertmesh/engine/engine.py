"""The serving engine: requests in, tokens out, on every deployment.

Each rank holds an `Engine`; rank 0's is the API (`add_request`, `abort`, `step`, `shutdown`),
the others follow (`follow`). One engine step on every rank:

  1. control: rank 0 broadcasts the step's new requests (each with the data-parallel rank it
     goes to), aborts, and whether to stop (one broadcast over a gloo group, `messages.py`);
  2. each rank adds its data-parallel rank's requests to its scheduler replica and schedules;
  3. each rank runs one forward of that batch (`Runner`; zero tokens if idle);
  4. the last stage's first rank of each data-parallel rank samples and records the step; one
     all-gather (`messages.py`) gives every rank those outputs and scheduler stats, so every replica
     (TP and pipeline peers) records the same tokens, and rank 0 streams them out.

Data-parallel ranks: under `epN` each EP index is one (its own scheduler and KV pool, replicated
on its pipeline peers); otherwise there is one. Rank 0 places a new request by
`engine/dp_routing.py`'s rule (by default, where its prefix is cached, balanced against queued
tokens), as of the last step's stats, whose all-gather also carries each pool's newly cached and
evicted block hashes. A request stays on its rank.

Under `serve --elastic` a recovery renumbers the ranks, may empty a scheduler (`restart`) or
finish here a step that was cut short after the last stage recorded it (`catch_up`), and may
leave a rank with no data-parallel rank (`self.dp` None: it serves experts only, with
zero-token forwards); `resume` says so. Rank 0 may send a step as a bare boundary (`join` in the
control message, no work: its new requests and aborts wait for the next step) at which every rank
regroups with a process that joins (`elastic/recovery.py: Elastic.admit`); `resume` then makes
this engine a rank of the larger group, the joined rank a new data-parallel rank.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from expertmesh import faults
from expertmesh.config import ModelConfig
from expertmesh.deployment import Deployment
from expertmesh.engine.block_pool import cache_key
from expertmesh.engine.block_tables import BlockTables
from expertmesh.engine.dp_routing import DpRouter
from expertmesh.engine.kv_budget import activation_reserve, kv_blocks_from_memory
from expertmesh.engine.messages import Messages
from expertmesh.engine.request import Request, TokenOutput
from expertmesh.engine.runner import Runner
from expertmesh.engine.scheduler import EngineConfig, Scheduler, SchedulerStats
from expertmesh.engine.stages import StageLinks
from expertmesh.model.transformer import MoETransformer, parameter_bytes
from expertmesh.parallel.expert import ExchangeChoice
from expertmesh.parallel.mesh import new_group


CPU_KV_CACHE_GB = 1.0  # a CPU rank's pool when no size is given: a host has no "free device memory"


def pool_blocks(cfg: ModelConfig, deployment: Deployment, engine_cfg: EngineConfig,
                device: torch.device = torch.device("cpu"), weights: int = 0) -> int:
    """Blocks per pool: `engine_cfg.num_blocks`, else as many as `kv_cache_gb` holds on the rank with
    the most KV bytes per block (most layers; per token and layer `kv_elements_per_token`: K and V
    of the KV heads / tp, or the latent once), else on a GPU what `gpu_memory_utilization` leaves
    of it with `weights` bytes loaded (`kv_budget.py`; the caller takes the minimum over the
    ranks), else `CPU_KV_CACHE_GB`."""
    if engine_cfg.num_blocks is not None:
        return engine_cfg.num_blocks
    layers = max(len(r) for r in deployment.stage_layers(cfg.n_layers))
    per_token = cfg.kv_elements_per_token(deployment.tp) * cfg.torch_dtype.itemsize
    per_block = engine_cfg.block_size * per_token * layers
    if engine_cfg.kv_cache_gb is None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserve = activation_reserve(cfg, deployment, engine_cfg.max_batched_tokens, engine_cfg.max_seqs)
        return kv_blocks_from_memory(free, total, weights, reserve, per_block,
                                     engine_cfg.gpu_memory_utilization)
    gb = CPU_KV_CACHE_GB if engine_cfg.kv_cache_gb is None else engine_cfg.kv_cache_gb
    blocks = int(gb * 2**30) // per_block
    if blocks < 1:
        raise ValueError(f"--kv-cache-gb {gb} holds no KV block of {per_block} bytes; "
                         f"raise it")
    return blocks


class Engine:
    """`graphs`: the decode graph mode (`engine/graphs.py`): "auto" (CUDA graphs on CUDA), "padded",
    "graphs" or "off"."""

    def __init__(self, model: MoETransformer, cfg: ModelConfig, deployment: Deployment,
                 engine_cfg: EngineConfig, rank: int = 0, links: StageLinks | None = None,
                 eos: tuple[int, ...] = (), record_logits: bool = False, n_micro: int = 1,
                 overlap: str = "auto", graphs: str = "auto", eplb=None):
        self.cfg, self.deployment, self.rank = cfg, deployment, rank
        self.distributed = dist.is_initialized()
        self.group = None
        if self.distributed and dist.get_backend() != "gloo":
            self.group = new_group(backend="gloo")  # the control path stays on the CPU
        self.num_blocks = self._agreed_blocks(model, engine_cfg)
        key = cache_key(cfg, deployment.tp)  # what a block's KV depends on besides its tokens
        self.scheduler = Scheduler(engine_cfg, self.num_blocks, eos, key)
        self.router = DpRouter.for_engine(deployment.dp, engine_cfg, key)
        self.runner = Runner(model, self.num_blocks, engine_cfg.block_size, links, record_logits, n_micro,
                             overlap, engine_cfg.max_seqs, graphs, eos)
        inner = deployment.coords(rank)[1]
        self.dp = inner if deployment.ep > 1 else 0
        # this rank samples for its data-parallel rank and sends the step's outputs and stats in
        # the all-gather (the last stage's first TP rank); its peers record what it sent
        self.reports = deployment.reports(rank)
        self.messages = Messages(self.group) if self.distributed else None
        # rank 0's view of the front
        self.new: list[Request] = []
        self.aborts: list = []
        self.live: set = set()
        self.dp_stats = [self.scheduler.stats() for _ in range(deployment.dp)]
        self.stopped = False
        self.join = None  # rank 0: a rank to admit at the next step (`elastic/recovery.py`)
        self.joined = None  # every rank: the admission the last step carried instead of work
        self.eplb = eplb  # online expert load balancing (`parallel/eplb.py`), or None
        # elastic (`elastic/slots.py: Copy`): the steps finished since the last regrouping, the
        # step scheduled and not finished yet, and on the reporting rank the last one finished
        self.finished = 0
        self.open: list | None = None
        self.last: tuple | None = None

    def _agreed_blocks(self, model: MoETransformer, engine_cfg: EngineConfig) -> int:
        """`pool_blocks` on this rank; sized from device memory, the smallest over the ranks
        (one all-reduce over the gloo group), so that every replica of a scheduler agrees."""
        device = next(model.parameters()).device
        weights = parameter_bytes(model, self.cfg.torch_dtype)
        blocks = pool_blocks(self.cfg, self.deployment, engine_cfg, device, weights)
        sized_by_memory = engine_cfg.num_blocks is None and engine_cfg.kv_cache_gb is None
        if self.distributed and sized_by_memory and device.type == "cuda":
            agreed = torch.tensor([blocks])
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.group)
            blocks = int(agreed)
        return blocks

    # ---- rank 0's API ----
    def add_request(self, request: Request) -> None:
        """Queue a request for the next step; a bad one raises ValueError and changes nothing."""
        request.check_for(self.cfg.vocab_size, self.cfg.max_seq_len)
        self.scheduler.check(request)
        if request.id in self.live:
            raise ValueError(f"request id {request.id!r} is already in flight; use a new id")
        self.live.add(request.id)
        self.new.append(request)

    def abort(self, request_id) -> None:
        """End a request at the next step; its KV blocks are freed then. Unknown ids are ignored."""
        if request_id in self.live:
            self.live.discard(request_id)
            self.new = [r for r in self.new if r.id != request_id]
            self.aborts.append(request_id)

    @property
    def has_work(self) -> bool:
        """Rank 0: something is queued or running on some data-parallel rank."""
        return bool(self.new) or any(s.waiting or s.running for s in self.dp_stats)

    def stats(self) -> list[SchedulerStats]:
        """Rank 0: per data-parallel rank, KV blocks used / free, waiting and running sequences."""
        return self.dp_stats

    def shutdown(self) -> None:
        """Rank 0: tell every rank to stop (after the work it wants done)."""
        self._control(stop=True)
        self.runner.close()
        if self.eplb:
            self.eplb.close()

    def requeue(self, requests: list[Request], drop: list = ()) -> None:
        """Rank 0, after `resume`: `requests` in flight again at the next step, ahead of new
        ones, each with the tokens already streamed (`Request.generated`); the ids `drop`, which
        some scheduler still holds but which are no longer in flight, are aborted then."""
        self.new[:0] = requests
        self.aborts.extend(drop)

    # ---- every rank ----
    def resume(self, rank: int, slot: int | None, kept: list[int | None], stats: list[SchedulerStats],
               links: StageLinks | None = None) -> None:
        """After elastic recovery or a join (`elastic/recovery.py`): this rank is `rank` of the
        new default group and serves data-parallel rank `slot` (None: experts only, its forwards
        carry no tokens); `kept`: per new data-parallel rank, the old index whose scheduler and
        KV pool it keeps (a step cut short left a pipeline's copies consistent where they agree:
        `Scheduler.finish` alone advances a sequence), None where it starts empty (`restart`
        this rank first then); `stats`: every data-parallel rank's scheduler stats, in the new
        order; `links`: its new pipeline neighbours (None: one stage, no neighbours)."""
        self.router.views = [set() if i is None else self.router.views[i] for i in kept]
        if links is not None:
            self.runner.links = links
        self.rank, self.dp = rank, slot
        self.reports = slot is not None and self.runner.links.is_last
        self.messages = Messages(self.group)
        self.runner.exchange = ExchangeChoice(self.runner.model, self.runner.exchange.overlap)
        self.dp_stats = list(stats)
        self.aborts = []
        self.finished, self.open, self.last = 0, None, None

    def catch_up(self, outputs: list[TokenOutput]) -> None:
        """Elastic, before `resume`: finish the step that was cut short here after this
        pipeline's last stage finished it, with that stage's `outputs` (`elastic/slots.py`).
        This rank's forward of it ran (the last stage could not sample before it), so its KV is
        written; only the scheduler's record is missing."""
        self.scheduler.finish(self.open, {o.request_id: o.token for o in outputs})
        self.scheduler.pool.take_changes()  # the same as the reporting replica's
        self.open = None

    def restart(self) -> None:
        """An empty scheduler and KV pool (elastic: this rank's pipeline is new, or its copies
        disagreed); rank 0 re-queues what the old one held (`elastic/ledger.py`)."""
        old = self.scheduler
        self.scheduler = Scheduler(old.cfg, old.num_blocks, tuple(old.eos), old.key)
        self.runner.block_tables = BlockTables()

    def follow(self) -> None:
        """Ranks other than 0: run steps until rank 0 says stop."""
        while not self.stopped:
            self.step()

    def step(self) -> list[TokenOutput]:
        """One engine step on this rank (collective); rank 0 returns the step's tokens, in order."""
        message = self._control()
        self.joined = message.get("join")
        if self.joined is not None:  # a step boundary for the ranks to regroup at; no work
            return []
        if message["stop"]:
            self.stopped = True
            self.runner.close()
            if self.eplb:
                self.eplb.close()
            return []
        for request_id in message["aborts"]:  # before the new ones, which may reuse an aborted id
            self.scheduler.abort(request_id)
        for dp, request in message["new"]:
            if dp == self.dp:
                self.scheduler.add(request)
        faults.at_step(self.runner.steps, self.runner.model)  # test-only; nothing unless asked
        chosen = self.open = self.scheduler.schedule()
        if self.eplb:
            self.eplb.begin_step()
        sampled = self.runner.forward(chosen, self.scheduler.sampled(chosen), message["decode_tokens"])
        mine = None
        if self.reports:
            tokens = {rid: t for rid, (t, _, _) in sampled.items()}
            outputs = self.scheduler.finish(chosen, tokens)
            extra = {rid: (row, lp) for rid, (_, row, lp) in sampled.items() if row is not None or lp is not None}
            if extra:
                outputs = [replace(o, logits=extra[o.request_id][0], logprobs=extra[o.request_id][1])
                           if o.request_id in extra else o for o in outputs]
            self.finished, self.open, self.last = self.finished + 1, None, (chosen, outputs)
            faults.after_sampling(outputs)  # test-only; nothing unless asked
            # the stats, and the block hashes the pool cached and evicted since the last report
            mine = (self.dp, outputs, self.scheduler.stats(), self.scheduler.pool.take_changes())
        everyone = self._gather((mine, self.eplb.payload() if self.eplb else None))
        if self.eplb:
            self.eplb.end_step([extra for _, extra in everyone])
        everyone = [report for report, _ in everyone]
        if not self.reports and self.dp is not None:
            column = next(p for p in everyone if p is not None and p[0] == self.dp)
            self.scheduler.finish(chosen, {o.request_id: o.token for o in column[1]})
            self.scheduler.pool.take_changes()  # the same as the reporting replica's
            self.finished, self.open = self.finished + 1, None
        if self.rank != 0:
            return []
        result = []
        for dp, outputs, stats, (added, evicted) in (p for p in everyone if p is not None):
            self.router.learn(dp, added, evicted)
            self.dp_stats[dp] = stats
            for out in outputs:
                if out.request_id in self.live:
                    result.append(out)
                    if out.finished:
                        self.live.discard(out.request_id)
        return result

    def _control(self, stop: bool = False) -> dict:
        message = None
        if self.rank == 0 and self.join is not None and not stop:
            # the new requests and aborts wait for the step after, on the joined group
            message = {"new": [], "aborts": [], "stop": False, "decode_tokens": None, "join": self.join}
            self.join = None
        elif self.rank == 0:
            new = self._assign()
            message = {"new": new, "aborts": self.aborts, "stop": stop, "decode_tokens": self._decode_bound(new)}
            self.new, self.aborts = [], []
        if self.distributed:
            message = self.messages.broadcast(message, src=0)
        return message

    def _decode_bound(self, new: list) -> int | None:
        """The most tokens any data-parallel rank computes this step, when every one of them only
        decodes (as of its last report, `Scheduler.decode_tokens`) and none gets a new request;
        else None. Rank 0 sends it with the step, so the ranks need not agree on it themselves."""
        bounds = [s.decode_tokens for s in self.dp_stats]
        return None if new or None in bounds else max(bounds)

    def _assign(self) -> list[tuple[int, Request]]:
        return list(zip(self.router.assign(self.new, self.dp_stats), self.new))

    def _gather(self, mine):
        if not self.distributed:
            return [mine]
        return self.messages.all_gather(mine)

