"""What one EP rank's loss costs a `serve --elastic` deployment (`expertmesh simulate-failure`).

The engine's recovery (`expertmesh/elastic/`), one term each, every rank stalled through all four:

  detect     the launcher sees the dead process (it polls every `launch.POLL_S`) and marks it
             dead; a survivor sees the mark (every `recovery.WATCH_S`) or its collective fails
             first: at most POLL_S + WATCH_S = 0.07 s (`detect_s`). A rank that hangs without
             dying is killed once its heartbeat is `--hang-timeout` old (`heartbeat.py`,
             default 4 s), then found as a dead one: give that plus 0.07 s instead.
  regroup    the survivors leave the old groups and meet in a fresh store: `regroup_s_per_rank`
             per survivor (every survivor connects to every other).
  reload     each MoE layer's placement without the dead rank, as the engine computes it
             (`elastic.experts`: `spare_placement` for `--redundant-experts R`, rank r's spares
             holding the first experts of rank r + 1; then `survivor_placement`): an expert a
             survivor holds a replica of costs nothing; each other one goes to the survivor
             holding the fewest experts, which reads only that expert's rows from storage at
             `reload_bw` bytes/s, every survivor its own stream, in parallel, then copies them
             to its device at the profile's `h2d_bw` (none on a CPU profile): the survivor with
             the most bytes sets the time, bytes / reload_bw + bytes / h2d_bw.
  recompute  the dead rank's data-parallel share of the batch lost its KV cache: re-queued on
             the survivors and prefilled again from prompt + the `generated` tokens already
             streamed (default half the generation: a loss at a uniformly random step), costed
             as one prefill step of the simulator on the survivors' placement.

Their sum is the longest gap a streaming client sees (the step in flight at the loss, at most one
TPOT more, is not counted). After the recovery the survivors serve the same batch as ep(N-1) on
that placement, a survivor that took an expert taking its tokens too; the decode throughput is
compared with ep(N)'s. When ep(N-1)'s fullest rank no longer fits in device memory the survivors
cannot hold the experts and the server ends (issue 30: "the experts no longer fit: then end
cleanly"; the engine's CPU-only recovery does not check this ahead).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from expertmesh.config import Workload
from expertmesh.deployment import Deployment
from expertmesh.elastic.experts import spare_placement, survivor_placement
from expertmesh.elastic.recovery import WATCH_S
from expertmesh.launch import POLL_S
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.simulator import SimResult, simulate

# benchmarks/elastic_gap.py, replicas mode: 0.19 s logged from the failed step to the new groups
# with nothing to load, 3 survivors (ep4, gloo on 2 shared cores at load 20-28): 0.063 s each.
REGROUP_S_PER_RANK = 0.063
# An assumption: one NVMe SSD's sequential read (PCIe Gen4 drives read 5-7 GB/s), each survivor
# its own; give a parallel file system's per-client figure instead where the checkpoint lives there.
RELOAD_BW = 5e9


@dataclass(frozen=True)
class FailureModel:
    """The recovery's constants: seconds to notice a loss, seconds per survivor to regroup,
    bytes/s each survivor reads the checkpoint at, tokens each request had generated at the loss
    (None: half of the workload's `gen_len`)."""

    detect_s: float = POLL_S + WATCH_S
    regroup_s_per_rank: float = REGROUP_S_PER_RANK
    reload_bw: float = RELOAD_BW
    generated: int | None = None

    def validate(self, gen_len: int) -> None:
        if self.detect_s < 0 or self.regroup_s_per_rank < 0:
            raise ValueError(f"detection {self.detect_s} s and regrouping {self.regroup_s_per_rank} s "
                             f"per rank must be >= 0")
        if not self.reload_bw > 0:
            raise ValueError(f"--reload-bandwidth {self.reload_bw / 1e9:g} GB/s must be > 0")
        if self.generated is not None and not 0 <= self.generated < gen_len:
            raise ValueError(f"--generated {self.generated} must be in [0, {gen_len}): tokens a "
                             f"request of --gen-len {gen_len} has before the loss")


@dataclass(frozen=True)
class RankLoss:
    """One rank's loss: of the experts in its slots, per MoE layer, those loaded anew and those
    a survivor still holds (a replica, or a spare's owner), bytes read in all and by the survivor
    reading most, the four terms in seconds, whether ep(N-1)
    fits, and decode tokens/s before and after (None after when it does not fit)."""

    lost: int
    loaded: int
    covered: int
    reload_bytes: int
    slowest_bytes: int
    detect_s: float
    regroup_s: float
    reload_s: float
    recompute_s: float
    fits: bool
    tps_before: float
    tps_after: float | None

    @property
    def gap_s(self) -> float | None:
        """Seconds a client waits for its next token (None: the server ends)."""
        return self.detect_s + self.regroup_s + self.reload_s + self.recompute_s if self.fits else None

    @property
    def throughput_loss(self) -> float | None:
        """1 - decode tokens/s after / before (None: the server ends)."""
        return 1 - self.tps_after / self.tps_before if self.fits else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "gap_s": self.gap_s, "throughput_loss": self.throughput_loss}


def expert_bytes(sc: Scenario) -> int:
    """Bytes of one expert's weights in one layer (its matrices `[d_model, expert_hidden]`)."""
    cfg = sc.cfg
    return cfg.matrices_per_expert * cfg.d_model * cfg.expert_hidden * sc.weight_itemsize


def start(sc: Scenario, redundant: int) -> Scenario:
    """`sc` (plain EP) on the placement `serve --elastic --redundant-experts redundant` starts from."""
    dep = sc.deployment
    if dep.ep < 2 or dep.world_size != dep.ep:
        stages = (" (serve --elastic survives a loss with pipeline stages; its cost, a broken "
                  "pipeline's recompute included, is not modelled)" if dep.pp > 1 and dep.tp == 1 else "")
        raise ValueError(f"simulate-failure models plain expert parallelism (ep2, ep4, ...), not "
                         f"{dep.name}{stages}")
    layer = spare_placement(sc.cfg.n_experts, dep.ep, redundant)
    return dataclasses.replace(sc, placement=tuple(map(tuple, layer)))


def rank_loss(before: SimResult, lost: int, model: FailureModel) -> RankLoss:
    """The loss of rank `lost` (not 0) of `before`'s scenario (a `start` placement)."""
    sc = before.scenario
    ep, cfg, w = sc.deployment.ep, sc.cfg, sc.replica_workload
    placement, moved = survivor_placement(sc.expert_placement, {lost})
    moe_layers = cfg.n_layers - len(cfg.dense_layers)
    per_survivor = [list(moved.values()).count(i) * expert_bytes(sc) * moe_layers for i in range(ep - 1)]
    slowest = max(per_survivor)
    reload_s = slowest / model.reload_bw + (slowest / sc.hw.h2d_bw if sc.hw.h2d_bw else 0.0)
    after_sc = dataclasses.replace(sc, deployment=Deployment(ep=ep - 1), gpus=None,
                                   placement=tuple(map(tuple, placement)))
    after = simulate(after_sc)
    generated = w.gen_len // 2 if model.generated is None else model.generated
    dead_rows = len(sc.deployment.rows_of(lost, w.batch_size))
    recompute = Workload(batch_size=dead_rows, prompt_len=w.prompt_len + generated, gen_len=1)
    prefill = simulate(dataclasses.replace(after_sc, workload=recompute))
    return RankLoss(lost, len(moved), len(sc.expert_placement[lost]) - len(moved), sum(per_survivor), slowest,
                    model.detect_s, model.regroup_s_per_rank * (ep - 1), reload_s, prefill.metrics.ttft_s,
                    after.fits, before.metrics.decode_tps, after.metrics.decode_tps if after.fits else None)


def simulate_failure(sc: Scenario, redundant: int, model: FailureModel,
                     lost: list[int] | None = None) -> tuple[SimResult, list[RankLoss]]:
    """ep(N) before any loss (on the `start` placement), and the loss of each rank of `lost`
    (default: every rank but 0) on its own."""
    model.validate(sc.workload.gen_len)
    if sc.workload.gen_len < 2:
        raise ValueError(f"--gen-len {sc.workload.gen_len} must be at least 2: the throughput "
                         f"compared is a decode throughput")
    first = start(sc, redundant)
    ep = sc.deployment.ep
    for rank in lost or ():
        if not 0 < rank < ep:
            raise ValueError(f"--lost-rank {rank}: ranks 1 .. {ep - 1} can be lost (rank 0's loss ends the server)")
    before = simulate(first)
    return before, [rank_loss(before, r, model) for r in (lost or range(1, ep))]
