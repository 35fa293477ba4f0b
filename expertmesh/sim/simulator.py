"""Plays the engine's prefill / decode schedule (engine/generate.py) on simulated ranks.

Schedule, as the engine runs it: for each step (0: prefill of the prompt, then one decode
position per step), for each micro-batch m, each pipeline stage s runs its layers once it is free
and, for s > 0, once the hidden states `[b_m, L, D]` of m arrived from stage s - 1; stage 0 of a
decode step also waits for the tokens of m sampled by the last stage. A step's event time is when
the last stage finished its last micro-batch, so the metrics come from `Metrics.from_events` as
for a real run. Inside a stage task the ranks keep their own clocks and meet at collectives
(program.py); the layers of a stage are identical, so one is played and its length repeated.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from expertmesh.engine.generate import micro_batches
from expertmesh.engine.metrics import Metrics
from expertmesh.sim import cost
from expertmesh.sim.bound import Bound, roofline
from expertmesh.sim.memory import MemoryReport, memory_report
from expertmesh.sim.program import Exchange, Phase, StageProgram, stage_program
from expertmesh.sim.scenario import Scenario

_LOCAL = ("compute", "hbm", "launch")  # resources a rank shares with others on a CPU host

# one traced op: (stage rank index, name, start s, duration s)
Event = tuple[int, str, float, float]


@dataclass(frozen=True)
class SimResult:
    scenario: Scenario
    metrics: Metrics
    memory: MemoryReport
    bound: Bound
    busiest: str             # the resource busiest on its busiest rank
    busiest_fraction: float  # its busy time / the run's time
    trace: dict              # Chrome / Perfetto trace-event JSON of one step

    def to_dict(self) -> dict:
        sc = self.scenario
        return {"deployment": sc.deployment.name, "gpus": sc.gpus, "replicas": sc.replicas,
                "hardware": sc.hardware.name, "metrics": self.metrics.to_dict(),
                "memory": {"weights_bytes": self.memory.weights_bytes, "kv_bytes": self.memory.kv_bytes,
                           "capacity_bytes": self.memory.capacity_bytes, "fits": self.memory.fits},
                "bound": self.bound.to_dict(), "busiest": self.busiest,
                "busiest_fraction": self.busiest_fraction, "assumptions": sc.assumptions()}


class _Task:
    """Plays one stage program; accumulates busy time per rank and resource, and events."""

    def __init__(self, n: int, slow: float, busy: list[dict[str, float]], events: list[Event] | None):
        self.n, self.slow, self.busy, self.events = n, slow, busy, events

    def _dur(self, c: cost.Cost) -> float:
        return c.seconds * (self.slow if c.resource in _LOCAL else 1.0)

    def _log(self, r: int, name: str, start: float, dur: float, c: cost.Cost, times: float = 1.0):
        self.busy[r][c.resource] += c.seconds * times
        if self.events is not None:
            self.events.append((r, name, start, dur))

    def play(self, phases, clocks: list[float], times: float = 1.0) -> list[float]:
        for ph in phases:
            if isinstance(ph, Exchange):
                clocks = self._exchange(ph, max(clocks), times)
            elif ph.sync:
                start, dur = max(clocks), max(c.seconds for c in ph.costs)
                for r, c in enumerate(ph.costs):
                    self._log(r, ph.name, start, dur, c, times)
                clocks = [start + dur] * self.n
            else:
                clocks = list(clocks)
                for r, c in enumerate(ph.costs):
                    self._log(r, ph.name, clocks[r], self._dur(c), c, times)
                    clocks[r] += self._dur(c)
        return clocks

    def _exchange(self, ex: Exchange, start: float, times: float) -> list[float]:
        """Network order D0, D1, R0, D2, R1, ..., R_{C-1}: chunk i+1 is sent while i is computed."""
        D = max(c.seconds for c in ex.dispatch)
        R = max(c.seconds for c in ex.combine)
        comp = [self._dur(c) for c in ex.experts]
        net = gpu = start
        d_end, c_end = [], []
        for i in range(ex.chunks + 1):
            if i < ex.chunks:
                for r in range(self.n):
                    self._log(r, f"dispatch {i}", net, D, ex.dispatch[r], times)
                net += D
                d_end.append(net)
                gpu = max(gpu, d_end[i])
                for r in range(self.n):
                    self._log(r, f"experts {i}", gpu, comp[r], ex.experts[r], times)
                gpu += max(comp)
                c_end.append(gpu)
            if i > 0:
                net = max(net, c_end[i - 1])
                for r in range(self.n):
                    self._log(r, f"combine {i - 1}", net, R, ex.combine[r], times)
                net += R
        return [net] * self.n

    def run(self, prog: StageProgram) -> float:
        """Duration of the whole task; layer events are repeated at multiples of one layer."""
        clocks = self.play(prog.embed, [0.0] * self.n)
        origin = max(clocks)
        first = len(self.events) if self.events is not None else 0
        layer = max(self.play(prog.layer, [0.0] * self.n, times=prog.n_layers))
        if self.events is not None:
            one = self.events[first:]
            self.events[first:] = [(r, name, origin + i * layer + s, d)
                                   for i in range(prog.n_layers) for r, name, s, d in one]
        clocks = self.play(prog.head, [origin + prog.n_layers * layer] * self.n)
        return max(clocks)


def simulate(sc: Scenario, trace_step: int | None = None) -> SimResult:
    """Predict a run. `trace_step`: the step whose events are traced (default: the first decode
    step, or the prefill when only one token is generated)."""
    dep, w, hw = sc.deployment, sc.replica_workload, sc.hardware
    M, P, G, inner = sc.micro_batches, w.prompt_len, w.gen_len, dep.inner
    trace_step = (1 if G > 1 else 0) if trace_step is None else trace_step
    topo = sc.topology
    rows = [[part.stop - part.start for part in micro_batches(len(dep.rows_of(i, w.batch_size)), M)]
            for i in range(inner)]  # [stage rank][micro]: pipeline peers hold the same rows
    on_node = min(topo.gpus_per_node, dep.world_size)
    slow = max(1.0, on_node / hw.compute_slots) if hw.compute_slots else 1.0
    busy = [defaultdict(float) for _ in range(dep.world_size)]
    stage_link = [cost.link_for(hw, topo, [s * inner, (s + 1) * inner]) for s in range(dep.pp - 1)]
    token_link = cost.link_for(hw, topo, [0, dep.world_size - 1])
    events: list[tuple[int, str, float, float]] = []

    free = [0.0] * dep.pp
    hidden_at = [0.0] * M
    tokens_at = [0.0] * M
    step_times = []
    for step in range(G):
        L, start = (P, 0) if step == 0 else (1, P + step - 1)
        step_end = 0.0
        for m in range(M):
            b = [rows[i][m] for i in range(inner)]
            has_rows = sum(b) > 0
            for s in range(dep.pp):
                ready = free[s]
                if has_rows and s > 0:
                    ready = max(ready, hidden_at[m])
                if has_rows and s == 0 and step > 0 and dep.pp > 1:
                    ready = max(ready, tokens_at[m])
                log = [] if step == trace_step else None
                task = _Task(inner, slow, busy[s * inner:(s + 1) * inner], log)
                end = ready + task.run(stage_program(sc, s, b, L, start))
                if log is not None:
                    events += [(s * inner + r, name, ready + t0, d) for r, name, t0, d in log]
                free[s] = end
                if s < dep.pp - 1 and has_rows:
                    nbytes = max(b) * L * sc.cfg.d_model * sc.itemsize
                    hidden_at[m] = end + cost.send_recv(stage_link[s], nbytes).seconds
                if s == dep.pp - 1:
                    step_end = max(step_end, end)
                    if dep.pp > 1:
                        tokens_at[m] = end + cost.send_recv(token_link, max(b) * 8).seconds
        step_times.append(step_end)

    metrics = Metrics.from_events(0.0, step_times, sc.workload.batch_size, P)
    resource, seconds = max(((res, max(b[res] for b in busy)) for res in cost.RESOURCES),
                            key=lambda x: x[1])
    # under a pipeline a step's first micro-batch starts before the previous step's last ends
    origin = min((t for _, _, t, _ in events), default=0.0)
    return SimResult(sc, metrics, memory_report(sc.cfg, dep, w, hw.hbm_bytes), roofline(sc),
                     resource, seconds / metrics.total_s, chrome_trace(sc, events, origin))


def chrome_trace(sc: Scenario, events: list[Event], origin: float) -> dict:
    """Trace-event JSON (chrome://tracing, ui.perfetto.dev): one track per rank, "X" events in us."""
    topo, dep = sc.topology, sc.deployment
    meta = [{"ph": "M", "name": "thread_name", "pid": 0, "tid": r,
             "args": {"name": f"rank {r} (stage {dep.coords(r)[0]}, node {topo.node_of(r)})"}}
            for r in range(dep.world_size)]
    spans = [{"ph": "X", "name": name, "pid": 0, "tid": r, "ts": (t - origin) * 1e6, "dur": d * 1e6}
             for r, name, t, d in events]
    return {"traceEvents": meta + spans, "displayTimeUnit": "ms",
            "otherData": {"deployment": dep.name, "hardware": sc.hardware.name}}
