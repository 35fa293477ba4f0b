"""The server's Prometheus metrics (`GET /metrics`), shared by every API server process through
prometheus_client's multiprocess mode: each process writes its values to files in
`PROMETHEUS_MULTIPROC_DIR` (set by rank 0, private to the server), and `render` in any of them
sums the counters and histograms of all; gauges show the latest value written.

Request latencies are measured by the HTTP handlers as a client sees them, from the moment a
request is accepted: TTFT to its first token, TPOT the mean gap between its later tokens (the
definitions of `engine/metrics.py`, per request), end-to-end to its last. Queue and KV gauges
follow every engine step and the expert-parallel counters arrive every
`rank_counters.STATS_EVERY` steps; front end 0 alone records those (`engine_metrics`), so that
they count once.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from expertmesh.engine.scheduler import SchedulerStats
from expertmesh.server.ipc import CounterTotals

# Seconds; CPU ranks are slow, GPU ones fast: the buckets span both.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)
OUTCOMES = ("stop", "length", "abort", "error", "rejected", "unauthorized", "queue_full")


class ServerMetrics:
    def __init__(self, engine_metrics: bool):
        # Values live in the multiprocess files; no process registry is needed (`render`).
        r = dict(registry=None)
        self.requests = Counter("expertmesh_requests", "Requests by outcome: stop, length, abort "
                                "(client gone), error (engine failed or shut down), rejected (400), "
                                "unauthorized (401), queue_full (429)", ["outcome"], **r)
        self.ttft = Histogram("expertmesh_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS, **r)
        self.tpot = Histogram("expertmesh_tpot_seconds", "Mean time per output token after the "
                              "first, per request", buckets=LATENCY_BUCKETS, **r)
        self.e2e = Histogram("expertmesh_e2e_seconds", "Request latency, accepted to last token",
                             buckets=LATENCY_BUCKETS, **r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.engine_metrics = engine_metrics
        if not engine_metrics:
            return
        gauge = dict(multiprocess_mode="mostrecent", **r)
        self.waiting = Gauge("expertmesh_requests_waiting", "Requests not yet admitted to a batch", **gauge)
        self.running = Gauge("expertmesh_requests_running", "Requests in the running batch", **gauge)
        self.kv_used = Gauge("expertmesh_kv_blocks_used", "KV cache blocks in use, per data-parallel "
                             "rank (EP rank under epN)", ["dp_rank"], **gauge)
        self.kv_free = Gauge("expertmesh_kv_blocks_free", "Free KV cache blocks, per data-parallel rank",
                             ["dp_rank"], **gauge)
        self.expert_tokens = Counter("expertmesh_expert_tokens", "Token assignments computed by each "
                                     "expert (EP deployments)", ["layer", "expert"], **r)
        self.imbalance = Gauge("expertmesh_load_imbalance", "Max / mean EP rank load of a MoE call, "
                               "averaged over the calls of the last collection", **gauge)
        self.exchanged = Counter("expertmesh_exchanged_bytes", "Bytes of token rows sent by the EP "
                                 "exchange, every rank and layer", **r)
        self.cross_node = Counter("expertmesh_cross_node_bytes", "Of those, bytes sent to another node", **r)
        self.overflow = Counter("expertmesh_capacity_assignments", "Assignments over expert capacity, "
                                "by what happened to them", ["action"], **r)
        for action in ("dropped", "rerouted"):
            self.overflow.labels(action)
        self.eplb_imbalance = Gauge("expertmesh_eplb_window_imbalance", "Online EPLB: max / mean EP "
                                    "rank rows over the last load window, per MoE layer", ["layer"], **gauge)
        self.eplb_rebalances = Counter("expertmesh_eplb_rebalances", "Online EPLB: load windows "
                                       "after which some layer's experts were re-placed", **r)
        self.eplb_stall = Histogram("expertmesh_eplb_step_stall_seconds", "Online EPLB: seconds a step "
                                    "spent planning, waiting for moved weights, switching and posting "
                                    "moves, per rank and step that did any", buckets=LATENCY_BUCKETS, **r)
        self.prefix_queries = Counter("expertmesh_prefix_cache_queries", "Prompt tokens looked up in "
                                      "the prefix cache, per data-parallel rank", ["dp_rank"], **r)
        self.prefix_hits = Counter("expertmesh_prefix_cache_hits", "Prompt tokens found in the prefix "
                                   "cache, per data-parallel rank", ["dp_rank"], **r)
        self.seen: dict[int, tuple[int, int]] = {}  # dp rank -> its (queries, hits) so far
        self.rank_losses = Counter("expertmesh_rank_losses", "Ranks lost and survived (--elastic)", **r)
        self.recovery = Counter("expertmesh_recovery_seconds", "Seconds spent recovering from lost "
                                "ranks (--elastic): failed step to new groups with experts in place", **r)
        self.rank_hangs = Counter("expertmesh_rank_hangs", "Ranks lost because they hung (--elastic "
                                  "--hang-timeout: killed, then survived); also in rank_losses", **r)

    def recovered(self, lost: int, seconds: float, hung: int = 0) -> None:
        """An elastic engine survived `lost` ranks, `hung` of them hung, in `seconds` (0, 0:
        nothing new)."""
        if self.engine_metrics:
            self.rank_losses.inc(lost)
            self.rank_hangs.inc(hung)
            self.recovery.inc(seconds)

    def finished(self, outcome: str, accepted: float, times: list[float]) -> None:
        """A request ended (`times`: when each of its tokens reached the handler)."""
        self.requests.labels(outcome).inc()
        if times:
            self.ttft.observe(times[0] - accepted)
            self.e2e.observe(times[-1] - accepted)
        if len(times) > 1:
            self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))

    def step(self, stats: list[SchedulerStats], counters: CounterTotals | None,
             origin: list[int] | None = None) -> None:
        """An engine step's pool stats (per data-parallel rank) and, every few steps, counters.
        `origin`: each data-parallel rank's original number (an elastic server renumbers the
        survivors), by which it is labelled and its running totals are kept."""
        if not self.engine_metrics:
            return
        self.waiting.set(sum(s.waiting for s in stats))
        self.running.set(sum(s.running for s in stats))
        serving = {origin[i] if origin is not None else i for i in range(len(stats))}
        for dp in self.seen.keys() - serving:  # lost (elastic): it holds no blocks any more;
            self.kv_used.labels(str(dp)).set(0)  # multiprocess mode cannot remove a label
            self.kv_free.labels(str(dp)).set(0)
        for index, s in enumerate(stats):
            dp = origin[index] if origin is not None else index
            self.kv_used.labels(str(dp)).set(s.blocks_used)
            self.kv_free.labels(str(dp)).set(s.blocks_free)
            queries, hits = self.seen.get(dp, (0, 0))
            self.prefix_queries.labels(str(dp)).inc(s.prompt_tokens - queries)
            self.prefix_hits.labels(str(dp)).inc(s.cached_tokens - hits)
            self.seen[dp] = (s.prompt_tokens, s.cached_tokens)
        if counters is None:
            return
        self.exchanged.inc(counters.exchanged_bytes)
        self.cross_node.inc(counters.cross_node_bytes)
        self.overflow.labels("dropped").inc(counters.dropped)
        self.overflow.labels("rerouted").inc(counters.rerouted)
        if counters.imbalance is not None:
            self.imbalance.set(counters.imbalance)
        for layer, x in counters.eplb_imbalance.items():
            self.eplb_imbalance.labels(str(layer)).set(x)
        self.eplb_rebalances.inc(counters.eplb_rebalances)
        for seconds in counters.eplb_stalls:
            self.eplb_stall.observe(seconds)
        for layer, per_expert in counters.expert_tokens.items():
            for expert, n in enumerate(per_expert):
                self.expert_tokens.labels(str(layer), str(expert)).inc(n)


def render() -> bytes:
    """Every API server's metrics, in Prometheus' text format."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)
