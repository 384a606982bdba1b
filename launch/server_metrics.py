"""Prometheus metrics of the OpenAI server (text exposition format at `GET /metrics`).

Each server owns a private `CollectorRegistry` (several apps in one process never share counters).
Request counts and latency histograms are recorded by the request handlers; queue depth, slots and
token counters are read from `AsyncEngine.stats()` at scrape time, so they are never stale.
`status` labels are HTTP codes, plus 499 for a client that disconnected before its response ended.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.async_engine import AsyncEngine, RequestTiming

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Scrape-time gauges and counters from the engine's own statistics."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield _gauge("engine_programs_ready", "Warm-up programs in memory (stored ones load after the port opens)",
                     self.engine.engine.programs_ready)
        yield _gauge("engine_programs_total", "Warm-up programs of the engine's configuration (Engine.num_programs)",
                     self.engine.engine.num_programs)
        yield _gauge("engine_queue_depth", "Requests waiting for a slot", s.waiting)
        yield _gauge("engine_slots_used", "Cache slots holding a live request", s.live_slots)
        yield _gauge("engine_slots_total", "Cache slots of the engine (max_slots)", s.max_slots)
        yield _gauge("engine_tokens_per_second", "Generated tokens per second over the recent window",
                     s.tokens_per_second)
        yield _gauge("engine_up", "1 while the engine loop accepts requests", float(s.running))
        counter = CounterMetricFamily("engine_generated_tokens", "Tokens generated since start")
        counter.add_metric([], s.tokens_generated)
        yield counter
        yield _counter("engine_prefix_cache_queries", "Prompt tokens admitted with prefix caching on",
                       s.prefix_query_tokens)
        yield _counter("engine_prefix_cache_hits", "Prompt tokens reused: forked or copied from cached blocks",
                       s.prefix_hit_tokens)
        rate = s.prefix_hit_tokens / s.prefix_query_tokens if s.prefix_query_tokens else 0.0
        yield _gauge("engine_prefix_cache_hit_rate", "Prefix cache hits / queries since start", rate)
        yield _gauge("engine_prefix_cache_blocks", "Cache blocks of 128 positions held for prefix reuse",
                     s.prefix_cached_blocks)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()
        self.requests = Counter("engine_requests", "HTTP completion requests by final status", ["status"],
                                registry=self.registry)
        self.ttft = Histogram("engine_time_to_first_token_seconds", "Submission to first token",
                              buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.tpot = Histogram("engine_time_per_output_token_seconds", "Mean time between later tokens",
                              buckets=TPOT_BUCKETS_S, registry=self.registry)
        self.e2e = Histogram("engine_request_latency_seconds", "Submission to last token (finished requests)",
                             buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def count(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def observe(self, timing: RequestTiming) -> None:
        if timing.ttft_s is not None:
            self.ttft.observe(timing.ttft_s)
        if timing.tpot_s is not None:
            self.tpot.observe(timing.tpot_s)
        self.e2e.observe(timing.e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
