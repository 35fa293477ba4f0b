"""A simulated run: the engine's plan (ModelConfig + Deployment + Workload) on a cluster.

When the cluster has more GPUs than the deployment needs, it runs data-parallel replicas of the
deployment: `replicas = gpus // deployment.world_size`, each serving its share of the batch (the
largest share sets the step times). Replica 0 occupies ranks 0 .. world_size - 1 of the topology.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property

from expertmesh.config import ModelConfig, Workload
from expertmesh.deployment import Deployment
from expertmesh.parallel.dispatch import LOW_LATENCY_TOKENS
from expertmesh.parallel.expert import OVERLAPS, TWO_BATCH_TOKENS
from expertmesh.parallel.placement import contiguous_placement, planned_rank_loads, validate_placement
from expertmesh.sim.hardware import HardwareProfile
from expertmesh.sim.routing import Routing
from expertmesh.topology import Topology


A2A_KERNELS = ("nccl", "low-latency")


# How decode attention reads the paged KV cache (the engine's attention backends):
# `flashinfer` reads the cached K and V in place, once; `torch` (the engine without FlashInfer)
# gathers each sequence's blocks into a copy and attends over the copy: read, written, read again.
ATTENTION_BACKENDS = ("flashinfer", "torch")


@dataclass(frozen=True)
class Scenario:
    """`gpus` None: exactly the deployment's ranks. `gpus_per_node` None: the hardware's.
    `a2a_chunks`: chunks an EP exchange is split into, the exchange of one overlapping the expert
    compute of the previous (1: one chunk, what the engine's auto choice gives a decode step).
    `low_latency_tokens` (the engine's `--low-latency-tokens`): a forward whose every EP rank has
    at most this many tokens takes the low-latency exchange, one fixed-size message per direction
    with its counts inside, no count exchange and no host sync; larger ones the standard exchange
    (a count exchange the host waits for, then uneven all-to-alls); 0: never.
    `a2a_kernel`: how the low-latency exchange runs on a GPU: `nccl` (the engine's: one
    all_to_all_single of fixed-size buffers, padding included) or `low-latency` (a DeepEP-style
    RDMA kernel, at its published latency and bandwidth, sending only the real rows).
    `overlap` (the engine's `--overlap`): `chunks` (the exchange of chunk i+1 in flight while chunk
    i computes), `none` (every exchange waited for at once), `tbo` (two-batch overlap: the
    step's sequences in two micro-batches, one's exchange in flight while the other's attention,
    routing or experts run; decode and prefill), `auto` (the engine's default: `tbo` for a
    forward whose busiest EP rank has at least TWO_BATCH_TOKENS tokens, else `chunks`; a
    two-batch forward plays each exchange as one chunk). `attn_dp` (EP only; None: ep): attention
    data-parallel size; the ep / attn_dp ranks of an attention group split its sequences'
    heads (attention TP), reduce-scatter the attention output so each rank dispatches 1/attn_tp
    of the group's tokens, and all-gather them back after the combine.
    `prefill_micro` / `decode_micro` None: one micro-batch per pipeline stage, as the engine.
    `step_barrier`: a step starts when the previous one ended on every stage, as the engine's
    (it gathers each step's tokens on every rank); False: a pipeline stage starts a micro-batch
    of the next step as soon as its tokens are back (a what-if for pipelined engines). `cuda_graphs`: decode steps replay captured graphs, one launch per stretch between
    host syncs instead of one per op. `fp8`: FP8 weights, KV cache and EP dispatch, FP8 GEMMs
    (as TensorRT-LLM's FP8 mode); activations and the combine stay 16-bit. `attention_backend`:
    how decode attention reads the KV cache (`ATTENTION_BACKENDS`). `placement` (plain EP only;
    None: contiguous, E / ep experts each): the experts each rank holds in every MoE layer, as
    many as it likes, an expert held by several ranks splitting its tokens evenly over them
    (`planned_rank_loads`), e.g. spare replicas or the uneven layout left after a rank's loss."""

    cfg: ModelConfig
    deployment: Deployment
    workload: Workload
    hardware: HardwareProfile
    gpus: int | None = None
    gpus_per_node: int | None = None
    a2a_chunks: int = 1
    hierarchical_a2a: bool = False
    routing: Routing = field(default_factory=Routing)
    prefill_micro: int | None = None
    decode_micro: int | None = None
    a2a_kernel: str = "nccl"
    cuda_graphs: bool = False
    fp8: bool = False
    low_latency_tokens: int = LOW_LATENCY_TOKENS
    overlap: str = "auto"
    attn_dp: int | None = None
    step_barrier: bool = True
    attention_backend: str = "flashinfer"
    placement: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if self.placement is None:
            self.deployment.validate(self.cfg)
        elif self.deployment.world_size != self.deployment.ep:
            raise ValueError(f"a placement is simulated on plain EP only, not {self.deployment.name}")
        else:
            validate_placement([self.placement], 1, self.cfg.n_experts, self.deployment.ep)
        self.workload.validate_for(self.cfg)
        ws = self.deployment.world_size
        if self.gpus is None:
            object.__setattr__(self, "gpus", ws)
        if self.gpus_per_node is None:
            object.__setattr__(self, "gpus_per_node", self.hardware.gpus_per_node)
        if self.gpus % ws:
            raise ValueError(f"{self.gpus} GPUs do not hold whole replicas of {self.deployment.name} "
                             f"({ws} ranks); use a multiple of {ws} GPUs")
        if self.workload.batch_size < self.replicas:
            raise ValueError(f"batch {self.workload.batch_size} is smaller than the {self.replicas} "
                             f"replicas of {self.deployment.name} on {self.gpus} GPUs; use at most "
                             f"{self.workload.batch_size * ws} GPUs or a larger batch")
        if self.a2a_chunks < 1:
            raise ValueError(f"a2a_chunks={self.a2a_chunks} must be at least 1")
        for name in ("prefill_micro", "decode_micro"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.a2a_kernel not in A2A_KERNELS:
            raise ValueError(f"a2a kernel {self.a2a_kernel!r}; use one of: {', '.join(A2A_KERNELS)}")
        if self.a2a_kernel == "low-latency" and self.hardware.low_latency_a2a is None:
            raise ValueError(f"{self.hardware.name} has no low-latency all-to-all figures; "
                             f"use --a2a-kernel nccl")
        if self.fp8 and self.hardware.fp8_flops is None:
            raise ValueError(f"{self.hardware.name} has no FP8 matmul figure; drop --fp8")
        if self.low_latency_tokens < 0:
            raise ValueError(f"--low-latency-tokens {self.low_latency_tokens} must be >= 0 (0: never)")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"--overlap {self.overlap!r}; use one of: {', '.join(OVERLAPS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend {self.attention_backend!r}; use one of: "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        self._check_attn_dp()

    def _check_attn_dp(self) -> None:
        if self.attn_dp is None:
            return
        ep, cfg = self.deployment.ep, self.cfg
        if ep == 1:
            raise ValueError(f"--attn-dp acts on expert-parallel deployments only and "
                             f"{self.deployment.name} has no EP axis; drop it or use epN")
        fits = [n for n in range(1, ep + 1) if ep % n == 0
                and cfg.n_heads % (ep // n) == 0 and cfg.n_kv_heads % (ep // n) == 0]
        if self.attn_dp not in fits:
            raise ValueError(f"--attn-dp {self.attn_dp} must divide ep={ep} into attention groups "
                             f"whose size divides the {cfg.n_heads} heads and {cfg.n_kv_heads} KV "
                             f"heads; use one of {', '.join(map(str, fits))}")

    @property
    def name(self) -> str:
        """The deployment's name, with its attention split when that is not plain EP's."""
        if self.deployment.ep > 1 and self.attn_tp > 1:
            return f"{self.deployment.name} (attn dp{self.attn_dp} x tp{self.attn_tp})"
        return self.deployment.name

    def with_attn_dp(self, attn_dp: int | None) -> "Scenario":
        """This scenario with attention data-parallel size `attn_dp` (at most its EP size) if it
        is expert-parallel; others have no EP axis to split and are returned as they are."""
        if attn_dp is None or self.deployment.ep == 1:
            return self
        return dataclasses.replace(self, attn_dp=min(attn_dp, self.deployment.ep))

    @property
    def expert_placement(self) -> list[list[int]]:
        """The experts each EP rank holds (`placement`, or the contiguous one)."""
        if self.placement is not None:
            return [list(experts) for experts in self.placement]
        return contiguous_placement(self.cfg.n_experts, max(self.deployment.ep, 1))

    @property
    def slots(self) -> list[int] | None:
        """Experts each rank holds where `placement` sets it (None: E / ep each)."""
        return [len(experts) for experts in self.placement] if self.placement is not None else None

    def rank_shares(self) -> list[float]:
        """Each EP rank's expected share of the token-expert assignments (they sum to 1)."""
        shares = self.routing.shares(self.cfg.n_experts, self.cfg.top_k)
        return planned_rank_loads(self.expert_placement, shares)

    @property
    def attn_tp(self) -> int:
        """Ranks that split one attention group's heads: ep / attn_dp under EP, else the TP size."""
        if self.deployment.ep > 1 and self.attn_dp is not None:
            return self.deployment.ep // self.attn_dp
        return self.deployment.tp

    def low_latency(self, tokens_per_rank: float) -> bool:
        """Whether a forward whose busiest EP rank has this many tokens takes the low-latency
        exchange (as the engine's ExchangeChoice decides)."""
        return self.deployment.ep > 1 and 0 < tokens_per_rank <= self.low_latency_tokens

    @property
    def replicas(self) -> int:
        return self.gpus // self.deployment.world_size

    def micro_batches(self, prefill: bool) -> int:
        """Micro-batches of a prefill step or of a decode step."""
        return (self.prefill_micro if prefill else self.decode_micro) or self.deployment.pp

    @property
    def topology(self) -> Topology:
        return Topology.for_gpus(self.gpus, self.gpus_per_node)

    def network_users(self, node: int) -> int:
        """GPUs of `node` that use the network: those whose replica spans nodes. Replicas run
        the same schedule, so they send at the same moments."""
        ws, per = self.deployment.world_size, self.gpus_per_node
        return sum(1 for g in range(node * per, min((node + 1) * per, self.gpus))
                   if (g // ws * ws) // per != (g // ws * ws + ws - 1) // per)

    @cached_property
    def net_bw_per_gpu(self) -> float:
        """Network bandwidth one GPU gets when every GPU of its node that uses the network sends at
        once: its own port's, or the node's ports shared (`nics_per_node`)."""
        hw = self.hardware
        busiest = max(self.network_users(n) for n in range(self.topology.nodes))
        if hw.nics_per_node is None or busiest <= hw.nics_per_node:
            return hw.net_bw
        return hw.net_bw * hw.nics_per_node / busiest

    @cached_property
    def hw(self) -> HardwareProfile:
        """The hardware as each GPU of this cluster sees it (the network as shared on its node)."""
        bw = self.net_bw_per_gpu
        return self.hardware if bw == self.hardware.net_bw else self.hardware.with_(net_bw=bw)

    @property
    def replica_workload(self) -> Workload:
        """What the busiest replica serves: ceil(batch / replicas) sequences."""
        batch = -(-self.workload.batch_size // self.replicas)
        return dataclasses.replace(self.workload, batch_size=batch, prompt_ids=None)

    @property
    def itemsize(self) -> int:
        """Bytes per activation element."""
        return 2 if self.cfg.dtype == "bf16" or self.fp8 else 4

    @property
    def compute_dtype(self) -> str:
        """The GEMMs' dtype: `fp8`, or the model's."""
        return "fp8" if self.fp8 else self.cfg.dtype

    @property
    def weight_itemsize(self) -> int:
        return 1 if self.fp8 else self.itemsize

    @property
    def kv_itemsize(self) -> int:
        return 1 if self.fp8 else self.itemsize

    @property
    def dispatch_itemsize(self) -> int:
        """Bytes per element an EP dispatch sends (the combine sends activations)."""
        return 1 if self.fp8 else self.itemsize

    @property
    def decode_low_latency(self) -> bool:
        """Whether a static decode step (one micro-batch's share per EP rank) is low-latency."""
        return self.low_latency(self._rank_sequences(False))

    @property
    def prefill_low_latency(self) -> bool:
        return self.low_latency(self._rank_sequences(True) * self.replica_workload.prompt_len)

    def _rank_sequences(self, prefill: bool) -> int:
        """Sequences of the busiest EP rank in one forward (micro-batch, or half of it under
        two-batch overlap) of a static step."""
        per_rank = -(-self.replica_workload.batch_size // max(self.deployment.ep, 1))
        per_micro = -(-per_rank // self.micro_batches(prefill))
        tokens = per_micro * (self.replica_workload.prompt_len if prefill else 1)
        halves = 2 if self.two_batch(tokens) and per_micro > 1 else 1
        return -(-per_micro // halves)

    def two_batch(self, tokens: float) -> bool:
        """Whether a forward whose busiest EP rank has `tokens` tokens runs as two micro-batches
        taking turns, as the engine's `--overlap` decides it."""
        return self.deployment.ep > 1 and (
            self.overlap == "tbo" or (self.overlap == "auto" and tokens >= TWO_BATCH_TOKENS))

    @property
    def host_syncs(self) -> str:
        """Where the host waits for the device inside a step, as the engine runs this plan."""
        if self.deployment.ep == 1:
            return "none inside a step (kernels queue ahead of the device)"
        where = [name for name, low in (("prefill", self.prefill_low_latency),
                                        ("decode", self.decode_low_latency)) if not low]
        if not where:
            return ("none inside a step: every forward has at most --low-latency-tokens "
                    f"{self.low_latency_tokens} tokens per EP rank and takes the low-latency exchange")
        return (f"every MoE layer of {' and '.join(where)} steps (over --low-latency-tokens "
                f"{self.low_latency_tokens} tokens per EP rank: the count exchange is read on the "
                f"host to size the dispatch)")

    def sharing(self) -> str:
        """What the GPUs of a node share, in words."""
        hw, per = self.hardware, self.gpus_per_node
        users = max(self.network_users(n) for n in range(self.topology.nodes))
        ports = f"{hw.nics_per_node} network ports" if hw.nics_per_node else "a network port per GPU"
        text = (f"NVLink: each GPU its own ports into a non-blocking switch; network: {ports} of "
                f"{hw.net_bw / 1e9:.0f} GB/s per node of {per}")
        if not users:
            return text + "; no replica spans nodes, so none uses the network"
        share = self.net_bw_per_gpu
        return text + (f"; {users} GPUs of a node (every replica that spans nodes) send at once: "
                       f"{share / 1e9:.1f} GB/s each" + (" (shared)" if share < hw.net_bw else " (no sharing)"))

    def exchange(self) -> str:
        """The EP exchange as this scenario runs it, in words."""
        low = (f"forwards with at most {self.low_latency_tokens} tokens per EP rank "
               f"({'decode' if self.decode_low_latency else 'none of this run'}"
               f"{' and prefill' if self.prefill_low_latency else ''}) take the low-latency exchange "
               f"({'a DeepEP-style kernel, real rows only' if self.a2a_kernel == 'low-latency' else 'fixed-size all_to_all_single, padding included'}), "
               f"larger ones the count exchange + uneven all-to-all"
               if self.low_latency_tokens else "every forward takes the count exchange + uneven all-to-all")
        tbo = "two-batch overlap (each step's sequences in two micro-batches, one's exchange in flight while the other computes)"
        overlap = {"tbo": tbo, "auto": f"{tbo} from {TWO_BATCH_TOKENS} tokens per EP rank, else one batch",
                   "chunks": f"{self.a2a_chunks} chunk(s)"
                             + (" overlapped with expert compute" if self.a2a_chunks > 1 else ", no overlap"),
                   "none": f"{self.a2a_chunks} chunk(s), each exchange waited for at once"}[self.overlap]
        return (f"EP exchange: {low}; --overlap {self.overlap}: {overlap}"
                f"{'; hierarchical' if self.hierarchical_a2a else ''}")

    def attention(self) -> str:
        dep = self.deployment
        if dep.ep > 1 and self.attn_tp > 1:
            return (f"data-parallel over {self.attn_dp} groups of {self.attn_tp} ranks; a group's "
                    f"ranks split its sequences' heads, reduce-scatter the output before the MoE "
                    f"and all-gather it after")
        if dep.ep > 1:
            return f"data-parallel over the {dep.ep} EP ranks (each its sequences and KV cache)"
        return f"tensor-parallel over {dep.tp} rank(s) per stage" if dep.tp > 1 else "one rank per stage"

    def assumptions(self) -> dict[str, str]:
        """Every assumption behind a prediction, for printing beside it."""
        cfg, w, t = self.cfg, self.workload, self.topology
        return {
            "model": f"{cfg.name}: {cfg.n_layers} layers, {cfg.n_experts} experts, top-{cfg.top_k}, "
                     f"d_model {cfg.d_model}, {cfg.n_heads}x{cfg.head_dim} heads "
                     f"({cfg.n_kv_heads} KV), expert hidden {cfg.expert_hidden}, {cfg.dtype}",
            "workload": f"batch {w.batch_size}, prompt {w.prompt_len} + generate {w.gen_len} tokens "
                        f"(context up to {w.total_len})",
            "hardware": f"{self.hardware.name} ({self.hardware.source}), {t.gpus_per_node} per node",
            "gpus": f"{self.gpus} = {self.replicas} replica(s) x {self.deployment.world_size} ranks "
                    f"of {self.deployment.name}; each replica serves <= {self.replica_workload.batch_size} "
                    f"sequences; {self.sharing()}",
            "schedule": f"{self.micro_batches(True)} prefill / {self.micro_batches(False)} decode "
                        f"micro-batch(es); "
                        + ("a step starts when the previous one ended on every stage (the engine "
                           "gathers each step's tokens on every rank)" if self.step_barrier else
                           "a stage starts a micro-batch of the next step once its tokens are back "
                           "(pipelined steps: not what the engine does)")
                        + (f"; {self.exchange()}" if self.deployment.ep > 1 else "")
                        + f"; routing {self.routing.name}",
            "attention": self.attention(),
            "host": f"launches {'hidden behind' if self.hardware.launch_overlaps else 'added to'} "
                    f"device work; decode {'in CUDA graphs' if self.cuda_graphs else 'launches every op'}; "
                    f"host syncs: {self.host_syncs}; per step, the engine's control messages "
                    f"(2 x (ranks - 1) host messages at the link latency) and "
                    + (f"{self.hardware.step_host_s * 1e3:.2f} ms of host work (fitted)" if self.hardware.step_host_s
                       else "no other host work (the engine's scheduling time per step is not "
                            "measured on this hardware: a lower bound)"),
            "precision": ("FP8 weights, KV cache, dispatch and GEMMs; 16-bit activations"
                          if self.fp8 else f"{self.cfg.dtype} throughout"),
            "memory": "weights + KV cache for the whole context + peak prefill activations and "
                      "communication buffers + runtime reserve",
        }
