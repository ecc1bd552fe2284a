"""Prometheus metrics on a per-app registry (tests build many apps in one process).

Route labels are the route *templates* (``/gallery/{label}``), never raw paths, so a client cannot blow up
the series count by requesting random URLs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's series: requests, latency, batching, queue depth and gallery size."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "centerid_requests", "HTTP requests by route template and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "centerid_request_duration_seconds",
            "HTTP latency by route template",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("centerid_batch_size", "images per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.forward_seconds = Histogram(
            "centerid_forward_duration_seconds", "time of one forward pass", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("centerid_queue_depth", "images waiting for a forward pass", registry=r)
        self.gallery_size = Gauge("centerid_gallery_entries", "entries in the gallery search index", registry=r)
        self.ready = Gauge("centerid_ready", "1 when the service is ready to serve", registry=r)
        self.identify_threshold = Gauge(
            "centerid_identify_threshold",
            "/identify threshold in force by mode: the FPIR operating point (the pair threshold without strangers)",
            ["mode", "kind"],
            registry=r,
        )
        self.identify_threshold_refreshes = Counter(
            "centerid_identify_threshold_refreshes", "recomputations of the /identify threshold", registry=r
        )
        self.strangers = Gauge("centerid_strangers", "stranger images setting the /identify threshold", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.forward_seconds.observe(seconds)

    def bind(self, queue_depth: Callable[[], float], gallery_size: Callable[[], float]) -> None:
        """Gauges read live values at scrape time instead of being pushed."""
        self.queue_depth.set_function(queue_depth)
        self.gallery_size.set_function(gallery_size)

    def observe_identify_thresholds(self, values: dict[str, tuple[str, float]], strangers: int) -> None:
        """After each recomputation: ``{mode: (basis kind, threshold)}`` and the stranger count."""
        self.identify_threshold.clear()  # a mode's kind can change (far → fpir once strangers exist)
        for mode, (kind, value) in values.items():
            self.identify_threshold.labels(mode, kind).set(value)
        self.identify_threshold_refreshes.inc()
        self.strangers.set(strangers)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request, including the ones refused by outer layers."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - started)
