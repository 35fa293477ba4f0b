"""Plays the engine's prefill / decode schedule (engine/runner.py, engine/engine.py) on simulated ranks.

Schedule, as the engine runs it: for each step (0: prefill of the prompt, then one decode
position per step), for each micro-batch m, each pipeline stage s runs its layers once it is free
and, for s > 0, once the hidden states `[b_m, L, D]` of m arrived from stage s - 1; stage 0 of a
decode step also waits for the tokens of m sampled by the last stage. A step's event time is when
the last stage finished its last micro-batch, so the metrics come from `Metrics.from_events` as
for a real run. Inside a stage task the ranks keep their own clocks and meet at collectives
(program.py); the layers of a stage are identical, so two are played and the second's length
repeated for the rest.

Host and device are two timelines per rank: the host issues each op's launches in turn, an op
starts on the device once it is launched and the device is free, so launches hide behind queued
work and a step takes the longer of the two, except where the host waits for the device (a
`host_sync` phase: the EP count exchange), which drains the queue. On a CPU profile the host is
the device (launch cost is part of each op's time). With `cuda_graphs`, a decode step's ops
replay from captured graphs: one launch per stretch between host syncs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from expertmesh.engine.metrics import Metrics
from expertmesh.sim import cost
from expertmesh.sim.bound import Bound, roofline
from expertmesh.sim.memory import MemoryReport, scenario_memory
from expertmesh.sim.program import Exchange, Segment, StageProgram, stage_program
from expertmesh.sim.scenario import Scenario
from expertmesh.split import split_evenly

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
    phases: dict             # phase -> device seconds per rank (mean over ranks) of the traced step
    traced_s: float          # the traced step's length

    def dominant(self) -> tuple[str, float]:
        """The phase that took the largest share of the traced step (a decode step unless only
        one token is generated), with that share; "idle" is device time waiting (for the host,
        a pipeline peer, a slower rank)."""
        name = max(self.phases, key=self.phases.get)
        return name, self.phases[name] / self.traced_s

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def to_dict(self) -> dict:
        """The prediction; a deployment that does not fit gets no metrics (null)."""
        sc, mem = self.scenario, self.memory
        return {"deployment": sc.deployment.name, "gpus": sc.gpus, "replicas": sc.replicas,
                "hardware": sc.hardware.name, "metrics": self.metrics.to_dict() if self.fits else None,
                "memory": {"weights_bytes": mem.weights_bytes, "kv_bytes": mem.kv_bytes,
                           "activation_bytes": mem.activation_bytes, "buffer_bytes": mem.buffer_bytes,
                           "reserve_bytes": mem.reserve_bytes, "total_bytes": mem.total_bytes,
                           "capacity_bytes": mem.capacity_bytes, "fits": mem.fits},
                "bound": self.bound.to_dict(), "busiest": self.busiest,
                "busiest_fraction": self.busiest_fraction, "phases": self.phases,
                "traced_step_s": self.traced_s, "assumptions": sc.assumptions()}


class StageTask:
    """Plays one stage program on `n` ranks, each with a device and a host clock; accumulates
    busy time per rank and resource, and events."""

    def __init__(self, n: int, slow: float, busy: list[dict[str, float]], events: list[Event] | None,
                 launch_s: float, graphs: bool):
        self.n, self.slow, self.busy, self.events = n, slow, busy, events
        self.launch_s, self.graphs = launch_s, graphs

    def _dur(self, c: cost.Cost) -> float:
        return c.seconds * (self.slow if c.resource in _LOCAL else 1.0)

    def _host(self, c: cost.Cost) -> float:
        return 0.0 if self.graphs else c.host_s

    def _log(self, r: int, name: str, start: float, dur: float, c: cost.Cost, times: float):
        self.busy[r][c.resource] += c.seconds * times
        self.busy[r]["launch"] += self._host(c) * times
        if self.events is not None and times:
            self.events.append((r, name, start, dur))

    def play(self, phases, dev: list[float], host: list[float], times: float = 1.0):
        """Play `phases` from the clocks `dev`, `host`; returns the new (dev, host)."""
        dev, host = list(dev), list(host)
        for ph in phases:
            if isinstance(ph, Exchange):
                host = [h + self._host(c) * ph.chunks for h, c in zip(host, ph.experts)]
                end = self._exchange(ph, max(max(d, h) for d, h in zip(dev, host)), times)
                dev = [end] * self.n
                continue
            for r, c in enumerate(ph.costs):
                host[r] += self._host(c)
            if ph.sync:
                start, dur = max(max(d, h) for d, h in zip(dev, host)), max(c.seconds for c in ph.costs)
                for r, c in enumerate(ph.costs):
                    self._log(r, ph.name, start, dur, c, times)
                dev = [start + dur] * self.n
            else:
                for r, c in enumerate(ph.costs):
                    start = max(dev[r], host[r])
                    self._log(r, ph.name, start, self._dur(c), c, times)
                    dev[r] = start + self._dur(c)
            if ph.host_sync:  # the host reads a result: it waits for the device, then relaunches
                host = [d + (self.launch_s if self.graphs else 0.0) for d in dev]
        return dev, host

    def _exchange(self, ex: Exchange, start: float, times: float) -> float:
        """Network order D0, D1, R0, D2, R1, ..., R_{C-1}: chunk i+1 is sent while i is computed;
        not `overlapped`: D0, E0, R0, D1, ... each waited for before the next starts."""
        D = max(c.seconds for c in ex.dispatch)
        R = max(c.seconds for c in ex.combine)
        comp = [self._dur(c) for c in ex.experts]
        net = gpu = start
        d_end, c_end = [], []
        for i in range(ex.chunks + 1):
            if i < ex.chunks:
                net = net if ex.overlapped else max(net, gpu)
                self._log_all(f"dispatch {i}", net, D, ex.dispatch, times)
                net += D
                d_end.append(net)
                gpu = max(gpu, d_end[i])
                for r in range(self.n):
                    self._log(r, f"experts {i}", gpu, comp[r], ex.experts[r], times)
                gpu += max(comp)
                c_end.append(gpu)
                if not ex.overlapped:
                    net = self._combine(ex, i, gpu, R, times)
                    gpu = net
            if i > 0 and ex.overlapped:
                net = self._combine(ex, i - 1, max(net, c_end[i - 1]), R, times)
        return max(net, gpu)

    def _combine(self, ex: Exchange, i: int, start: float, R: float, times: float) -> float:
        self._log_all(f"combine {i}", start, R, ex.combine, times)
        return start + R

    def _log_all(self, name: str, start: float, dur: float, costs, times: float) -> None:
        for r in range(self.n):
            self._log(r, name, start, dur, costs[r], times)

    def run_tbo(self, a: StageProgram, b: StageProgram) -> float:
        """Two-batch overlap of micro-batches a and b through every layer (each layer has one
        Exchange, played as one chunk). The device computes a's combine-and-next-layer
        (post, pre), b's, then a's experts, b's; the network sends a's dispatch, b's, then
        a's combine, b's; each waits for what it needs, so one micro-batch's exchange is in
        flight while the other computes. Every layer is played (no extrapolation)."""
        progs = (a, b)
        cut = next(i for i, ph in enumerate(a.layer) if isinstance(ph, Exchange))
        pre = [p.layer[:cut] for p in progs]
        ex: list[Exchange] = [p.layer[cut] for p in progs]
        post = [p.layer[cut + 1:] for p in progs]
        start_host = self.launch_s if self.graphs else 0.0
        dev, host = self.play(a.embed, [0.0] * self.n, [start_host] * self.n)
        dev, host = self.play(b.embed, dev, host)
        ready = [list(dev), list(dev)]  # when each micro-batch's combine of the last layer ended
        net = 0.0
        for layer in range(a.n_layers + 1):
            sent = [0.0, 0.0]
            for m in (0, 1):
                dev = [max(d, r) for d, r in zip(dev, ready[m])]
                phases = (post[m] if layer else ()) + (pre[m] if layer < a.n_layers else ())
                dev, host = self.play(phases, dev, host)
                if layer == a.n_layers:
                    continue
                net = max(net, max(max(d, h) for d, h in zip(dev, host)))
                D = max(c.seconds for c in ex[m].dispatch)
                self._log_all(f"dispatch {m}", net, D, ex[m].dispatch, 1.0)
                net += D
                sent[m] = net
            if layer == a.n_layers:
                break
            for m in (0, 1):
                host = [h + self._host(c) for h, c in zip(host, ex[m].experts)]
                for r, c in enumerate(ex[m].experts):
                    start = max(dev[r], host[r], sent[m])
                    self._log(r, f"experts {m}", start, self._dur(c), c, 1.0)
                    dev[r] = start + self._dur(c)
                R = max(c.seconds for c in ex[m].combine)
                net = self._combine(ex[m], m, max(net, max(dev)), R, 1.0)
                ready[m] = [net] * self.n
        for p in progs:  # dense layers have no exchange to overlap: one micro-batch after the other
            dev, host = self._layers(p.dense, p.n_dense, dev, host)
        for p in progs:
            dev, host = self.play(p.head, dev, host)
        return max(dev)

    def run(self, prog: StageProgram) -> float:
        """Duration of the whole task: its MoE layers, then its dense ones (`_layers`)."""
        start_host = self.launch_s if self.graphs else 0.0  # one graph launch per step
        dev, host = self.play(prog.embed, [0.0] * self.n, [start_host] * self.n)
        dev, host = self._layers(prog.layer, prog.n_layers, dev, host)
        dev, host = self._layers(prog.dense, prog.n_dense, dev, host)
        dev, _ = self.play(prog.head, dev, host)
        return max(dev)

    def _layers(self, layer: tuple, n: int, dev: list[float], host: list[float]):
        """`n` layers of phases `layer`. Two are played (the host may fall behind or run ahead
        over the first); the second's length stands for each later one, and its events are
        repeated at multiples of it."""
        if n == 0:
            return dev, host
        d1, h1 = self.play(layer, dev, host, times=1.0)
        mark = len(self.events) if self.events is not None else 0
        n_more = n - 1
        d2, h2 = self.play(layer, d1, h1, times=float(n_more)) if n_more else (d1, h1)
        period_d, period_h = max(d2) - max(d1), max(h2) - max(h1)
        if self.events is not None and n_more:
            second = self.events[mark:]
            self.events[mark:] = [(r, name, t + i * period_d, d)
                                  for i in range(n_more) for r, name, t, d in second]
        dev = [d + (n_more - 1) * period_d for d in d2] if n_more else d2
        host = [h + (n_more - 1) * period_h for h in h2] if n_more else h2
        return dev, host


@dataclass
class Clocks:
    """When each part of a replica's pipeline is next ready (seconds from the run's start):
    `free[s]`, stage s; for each micro-batch m of the current step shape, `hidden_at[m]`, its hidden
    states at the next stage, and `tokens_at[m]`, its sampled tokens back at stage 0;
    `step_ends[k]`, when step k ended on the last stage (the engine's event times)."""

    free: list[float]
    hidden_at: list[float] = field(default_factory=list)
    tokens_at: list[float] = field(default_factory=list)
    step_ends: list[float] = field(default_factory=list)

    def begin(self, sc: Scenario, step: int, M: int, control: float) -> None:
        """Step `step` of `M` micro-batches starts once the last one ended and its control
        messages went round (on every stage under the step barrier); a new micro-batch shape
        starts its clocks afresh."""
        begin = (self.step_ends[-1] if self.step_ends else 0.0) + control
        if sc.step_barrier or step == 0:
            self.free = [max(f, begin) for f in self.free]
        if step == 0 or M != len(self.hidden_at):
            self.hidden_at, self.tokens_at = [0.0] * M, [begin] * M

    def ready(self, s: int, m: int, step: int, pp: int, has_rows: bool) -> float:
        """When stage `s` may start micro-batch `m`: once free and, holding rows, once its input
        (the previous stage's hidden states, or at stage 0 of a decode step the sampled tokens) is there."""
        ready = self.free[s]
        if has_rows and s > 0:
            ready = max(ready, self.hidden_at[m])
        if has_rows and s == 0 and step > 0 and pp > 1:
            ready = max(ready, self.tokens_at[m])
        return ready


@dataclass
class Record:
    """What a run leaves besides its times: `busy[rank][resource]` (seconds) and the traced
    step's events."""

    busy: list[dict[str, float]]
    events: list[Event] = field(default_factory=list)


def simulate(sc: Scenario, trace_step: int | None = None) -> SimResult:
    """Predict a run. `trace_step`: the step whose events are traced (default: the first decode
    step, or the prefill when only one token is generated)."""
    dep, w, hw = sc.deployment, sc.replica_workload, sc.hw
    trace_step = (1 if w.gen_len > 1 else 0) if trace_step is None else trace_step
    clocks = Clocks([0.0] * dep.pp)
    record = Record([defaultdict(float) for _ in range(dep.world_size)])
    for step in range(w.gen_len):
        _play_step(sc, step, clocks, record, step == trace_step)
    step_times = clocks.step_ends
    metrics = Metrics.from_events(0.0, step_times, sc.workload.batch_size, w.prompt_len)
    # on a GPU the host's launch time is not a device resource: when it shows, it shows as idle
    resources = [r for r in cost.RESOURCES if r != "launch" or not hw.launch_overlaps]
    resource, seconds = max(((res, max(b[res] for b in record.busy)) for res in resources), key=lambda x: x[1])
    # under a pipeline a step's first micro-batch starts before the previous step's last ends
    events = record.events
    origin = min((t for _, _, t, _ in events), default=0.0)
    traced = step_times[trace_step] - (step_times[trace_step - 1] if trace_step else 0.0)
    return SimResult(sc, metrics, scenario_memory(sc), roofline(sc), resource,
                     seconds / metrics.total_s, chrome_trace(sc, events, origin),
                     phase_seconds(events, dep.world_size, traced), traced)


def _play_step(sc: Scenario, step: int, clocks: Clocks, record: Record, traced: bool) -> None:
    """Step `step` (0: the prefill of the prompt, then one decode position per step): each
    micro-batch through each stage, as soon as both are ready; appends its end to `clocks`."""
    dep, w, hw = sc.deployment, sc.replica_workload, sc.hw
    inner, prefill = dep.inner, step == 0
    M = sc.micro_batches(prefill)
    control = control_seconds(sc)
    clocks.begin(sc, step, M, control)
    rows = [[part.stop - part.start for part in split_evenly(len(dep.rows_of(i, w.batch_size)), M)]
            for i in range(inner)]  # [stage rank][micro]: pipeline peers hold the same rows
    L, start = (w.prompt_len, 0) if prefill else (1, w.prompt_len + step - 1)
    graphs = sc.cuda_graphs and not prefill and hw.launch_overlaps
    slow = host_sharing(sc)
    step_end = 0.0
    for m in range(M):
        b = [rows[i][m] for i in range(inner)]
        has_rows = sum(b) > 0
        for s in range(dep.pp):
            ready = clocks.ready(s, m, step, dep.pp, has_rows)
            log = [] if traced else None
            task = StageTask(inner, slow, record.busy[s * inner:(s + 1) * inner], log, hw.launch_s, graphs)
            end = ready + stage_seconds(sc, s, [((n, L, start),) for n in b], task)
            if log is not None:
                record.events += [(s * inner + r, name, ready + t0, d) for r, name, t0, d in log]
            clocks.free[s] = end
            if s < dep.pp - 1 and has_rows:
                link = cost.link_for(hw, sc.topology, [s * inner, (s + 1) * inner])
                nbytes = max(b) * L * sc.cfg.d_model * sc.itemsize
                clocks.hidden_at[m] = end + cost.send_recv(link, nbytes).seconds
            if s == dep.pp - 1:
                step_end = max(step_end, end)
                if dep.pp > 1:
                    link = cost.link_for(hw, sc.topology, [0, dep.world_size - 1])
                    clocks.tokens_at[m] = end + cost.send_recv(link, max(b) * 8).seconds + control
    clocks.step_ends.append(step_end)


def host_sharing(sc: Scenario) -> float:
    """How much slower a rank computes when the ranks of a node share fewer compute slots than
    they are (a CPU host's cores): ranks computing at once / slots, at least 1. Ranks of every
    replica on the node compute at once; of a pipeline of S stages with M micro-batches per step
    only M / (M + S - 1) of the stages are busy on average (the step's fill and drain)."""
    hw, dep = sc.hw, sc.deployment
    if not hw.compute_slots:
        return 1.0
    M = sc.micro_batches(False)
    busy = min(sc.gpus_per_node, sc.gpus) * M / (M + dep.pp - 1)
    return max(1.0, busy / hw.compute_slots)


def control_seconds(sc: Scenario) -> float:
    """The engine's control path of one step (engine/engine.py, messages.py): rank 0 broadcasts
    the step's requests (one fixed-size broadcast, p - 1 sends) and every rank gathers the
    sampled tokens (one ring all-gather, p - 1 steps), 2 (p - 1) host messages at the link's
    latency, plus the profile's host time per step."""
    hw, ranks = sc.hw, list(range(sc.deployment.world_size))
    messages = cost.host_messages(hw, sc.topology, ranks, 2 * (len(ranks) - 1))
    return messages.seconds + messages.host_s + hw.step_host_s


def halves(work: list[tuple[Segment, ...]]) -> tuple[list, list]:
    """Two-batch overlap's split of a stage's work: each rank's sequences in two halves, as the
    engine cuts them (whole sequences: a lone sequence stays whole and the other half is empty);
    a mean number of sequences (serving) in two equal halves."""
    a, b = [], []
    for segments in work:
        first, second = [], []
        for n, L, start in segments:
            whole = n == int(n)
            first.append((n - n // 2 if whole else n / 2, L, start))
            second.append((n // 2 if whole else n / 2, L, start))
        a.append(tuple(first))
        b.append(tuple(second))
    return a, b


def stage_seconds(sc: Scenario, stage: int, work: list[tuple[Segment, ...]], task: StageTask) -> float:
    """One stage task's length; its work as two overlapped micro-batches when the scenario's
    `--overlap` takes two-batch overlap for it (EP)."""
    if sc.two_batch(max(sum(n * L for n, L, _ in segments) for segments in work)):
        a, b = halves(work)
        return task.run_tbo(stage_program(sc, stage, a), stage_program(sc, stage, b, plan_work=a))
    return task.run(stage_program(sc, stage, work))


def phase_seconds(events: list[Event], ranks: int, step_s: float) -> dict[str, float]:
    """Device seconds per phase (chunk numbers dropped), mean over ranks; the rest is "idle"."""
    out: dict[str, float] = defaultdict(float)
    for _, name, _, d in events:
        out[name.split(" ")[0] if name.split(" ")[-1].isdigit() else name] += d / ranks
    out["idle"] = max(step_s - sum(out.values()), 0.0)
    return dict(out)


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
