"""The router's own Prometheus metrics. One registry per router, so several routers can share a
process (the integration tests run three)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gpufleet.serving.router.gateway import Router

DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)
OVERHEAD_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)


class _Live(Collector):
    """Gauges computed when /metrics is read, from the router's live state (no bookkeeping on the
    request path)."""

    def __init__(self, router: Router, clock: Callable[[], float]) -> None:
        self._router = router
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self._clock()
        free = GaugeMetricFamily(
            "gpufleet_router_engine_free_tokens",
            "KV headroom in tokens by the signal",
            labels=["region", "engine"],
        )
        age = GaugeMetricFamily(
            "gpufleet_router_engine_data_age_seconds",
            "age of the engine's last good sample",
            labels=["engine"],
        )
        up = GaugeMetricFamily(
            "gpufleet_router_engine_up", "1 when the last scrape answered and parsed", labels=["engine"]
        )
        region_free = GaugeMetricFamily(
            "gpufleet_router_region_free_tokens",
            "region headroom in tokens (sum over engines)",
            labels=["region"],
        )
        region_max = GaugeMetricFamily(
            "gpufleet_router_region_largest_free_tokens",
            "headroom of the region's roomiest engine",
            labels=["region"],
        )
        region_age = GaugeMetricFamily(
            "gpufleet_router_region_data_age_seconds", "age of the region's data", labels=["region"]
        )
        queue = GaugeMetricFamily("gpufleet_router_queue", "requests waiting for room in this router")
        for view in self._router.engine_views(now):
            free.add_metric([view.region, view.id], self._router.headroom_of(view, now))
            age.add_metric([view.id], min(view.age(now), 1e9))
            up.add_metric([view.id], 1.0 if view.healthy else 0.0)
        for s in self._router.region_summaries(now):
            region_free.add_metric([s["region"]], s["free_tokens"])
            region_max.add_metric([s["region"]], s["largest_free_tokens"])
            if s["data_age_s"] is not None:
                region_age.add_metric([s["region"]], s["data_age_s"])
        queue.add_metric([], self._router.queued)
        yield from (free, age, up, region_free, region_max, region_age, queue)


class RouterMetrics:
    def __init__(self, router: Router, clock: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        # process_cpu_seconds_total and friends (read from /proc when scraped): the signal to add a
        # router replica (docs/router.md, "When to add a replica").
        ProcessCollector(registry=r)
        self.requests = Counter(
            "gpufleet_router_requests",
            "requests by the region that answered and outcome",
            ["region", "outcome"],
            registry=r,
        )
        self.spills = Counter(
            "gpufleet_router_spills", "requests forwarded to a peer region", ["to_region"], registry=r
        )
        self.retries = Counter(
            "gpufleet_router_retries", "attempts moved to another candidate before the first byte", registry=r
        )
        self.continuations = Counter(
            "gpufleet_router_continuations",
            "broken streams continued on another engine",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter("gpufleet_router_rejected", "requests answered 429 (no room)", registry=r)
        self.held = Counter(
            "gpufleet_router_held",
            "requests held at the router until an engine could start their prefill (late binding)",
            ["outcome"],  # sent | refused (their TTFT slack spent: 429, also counted in rejected)
            registry=r,
        )
        self.decision = Histogram(
            "gpufleet_router_decision_seconds",
            "time to choose candidates",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "gpufleet_router_overhead_seconds",
            "time a request spends in the router itself: phase=request from its arrival to the POST "
            "upstream (body, parse, admission, decision); phase=relay from a stream's first bytes "
            "read upstream to their write to the client",
            ["phase"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.overhead_request = self.overhead.labels("request")
        self.overhead_relay = self.overhead.labels("relay")
        self._outcomes: dict[tuple[str, str], Counter] = {}
        r.register(_Live(router, clock))

    def outcome(self, region: str, outcome: str) -> None:
        """Count one request by region and outcome (label children cached: `labels()` locks and
        validates on every call)."""
        child = self._outcomes.get((region, outcome))
        if child is None:
            child = self._outcomes[region, outcome] = self.requests.labels(region, outcome)
        child.inc()
