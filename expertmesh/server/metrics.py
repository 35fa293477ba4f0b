"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own.

Request latencies are measured by the HTTP handlers as a client sees them, from the moment a
request is accepted: TTFT to its first token, TPOT the mean gap between its later tokens (the
definitions of `engine/metrics.py`, per request), end-to-end to its last. Queue and KV gauges
follow every engine step; the expert-parallel counters arrive every `loop.STATS_EVERY` steps.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from expertmesh.engine.counters import RankCounters
from expertmesh.engine.load import load_summary

# Seconds; CPU ranks are slow, GPU ones fast: the buckets span both.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self, n_experts: int, row_bytes: int, tp: int):
        self.n_experts, self.row_bytes, self.tp = n_experts, row_bytes, tp
        r = self.registry = CollectorRegistry()
        self.requests = Counter("expertmesh_requests", "Requests by outcome: stop, length, abort "
                                "(client gone), error (engine failed or shut down), rejected (400), "
                                "queue_full (429)", ["outcome"], registry=r)
        self.ttft = Histogram("expertmesh_ttft_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("expertmesh_tpot_seconds", "Mean time per output token after the "
                              "first, per request", registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("expertmesh_e2e_seconds", "Request latency, accepted to last token",
                             registry=r, buckets=LATENCY_BUCKETS)
        self.waiting = Gauge("expertmesh_requests_waiting", "Requests not yet admitted to a batch",
                             registry=r)
        self.running = Gauge("expertmesh_requests_running", "Requests in the running batch", registry=r)
        self.kv_used = Gauge("expertmesh_kv_blocks_used", "KV cache blocks in use, per data-parallel "
                             "rank (EP rank under epN)", ["dp_rank"], registry=r)
        self.kv_free = Gauge("expertmesh_kv_blocks_free", "Free KV cache blocks, per data-parallel rank",
                             ["dp_rank"], registry=r)
        self.expert_tokens = Counter("expertmesh_expert_tokens", "Token assignments computed by each "
                                     "expert (EP deployments)", ["layer", "expert"], registry=r)
        self.imbalance = Gauge("expertmesh_load_imbalance", "Max / mean EP rank load of a MoE call, "
                               "averaged over the calls of the last collection", registry=r)
        self.exchanged = Counter("expertmesh_exchanged_bytes", "Bytes of token rows sent by the EP "
                                 "exchange, every rank and layer", registry=r)
        self.cross_node = Counter("expertmesh_cross_node_bytes", "Of those, bytes sent to another node",
                                  registry=r)
        self.overflow = Counter("expertmesh_capacity_assignments", "Assignments over expert capacity, "
                                "by what happened to them", ["action"], registry=r)
        for outcome in ("stop", "length", "abort", "error", "rejected", "queue_full"):
            self.requests.labels(outcome)
        for action in ("dropped", "rerouted"):
            self.overflow.labels(action)

    def finished(self, outcome: str, accepted: float, times: list[float]) -> None:
        """A request ended (`times`: when each of its tokens reached the handler)."""
        self.requests.labels(outcome).inc()
        if times:
            self.ttft.observe(times[0] - accepted)
            self.e2e.observe(times[-1] - accepted)
        if len(times) > 1:
            self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))

    def step(self, stats: list[dict], counters: list[dict] | None) -> None:
        self.waiting.set(sum(s["waiting"] for s in stats))
        self.running.set(sum(s["running"] for s in stats))
        for dp, s in enumerate(stats):
            self.kv_used.labels(str(dp)).set(s["blocks_used"])
            self.kv_free.labels(str(dp)).set(s["blocks_free"])
        if counters:
            self._counters(counters)

    def _counters(self, ranks: list[RankCounters]) -> None:
        per_layer: dict[int, dict[int, list]] = {}
        placements: dict[int, list] = {}
        for i, r in enumerate(ranks):
            for layer, stats in r.exchange.items():
                per_layer.setdefault(layer, {})[len(per_layer.get(layer, {}))] = stats.loads
                placements[layer] = r.placement[layer]
                self.exchanged.inc(stats.rows_sent * self.row_bytes)
                self.cross_node.inc(stats.cross_node_bytes)
            if self.tp > 1 and i % self.tp:  # TP peers see the same tokens: count them once
                continue
            for counts in r.overflow.values():
                self.overflow.labels("dropped").inc(counts.dropped)
                self.overflow.labels("rerouted").inc(counts.rerouted)
        if not per_layer:
            return
        summary = load_summary(per_layer, placements, self.n_experts)
        self.imbalance.set(summary["imbalance_mean"])
        for layer in per_layer:
            for expert, n in enumerate(summary["tokens_per_expert"][layer]):
                self.expert_tokens.labels(str(layer), str(expert)).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
