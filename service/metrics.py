"""Prometheus metrics on a per-app registry (tests build many apps in one process).

Route labels are the route *templates* (``/gallery/{label}``), never raw paths, so a client cannot blow up
the series count by requesting random URLs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.gallery_rebuild import COMPACTION, FULL, RETRAIN

if TYPE_CHECKING:
    from service.gallery import GalleryStatus

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST
REBUILD_KINDS = (COMPACTION, RETRAIN, FULL)


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
        self.gallery_applied_seq = Gauge(
            "centerid_gallery_applied_seq", "newest change-log record the search index reflects", registry=r
        )
        self.gallery_store_seq = Gauge(
            "centerid_gallery_store_seq", "newest change-log record in the store (NaN: unreachable)", registry=r
        )
        self.gallery_lag = Gauge(
            "centerid_gallery_lag", "change-log records committed, not yet searchable (NaN: unknown)", registry=r
        )
        self.gallery_stale = Gauge(
            "centerid_gallery_may_be_stale", "1 while the shared store is unreachable (stale searches)", registry=r
        )
        self.gallery_rebuilding = Gauge(
            "centerid_gallery_rebuild_running", "1 while a background index rebuild runs", ["kind"], registry=r
        )
        self.gallery_rebuilds = Gauge(
            "centerid_gallery_rebuilds", "background index rebuilds since start by outcome", ["outcome"], registry=r
        )
        self.gallery_reembed = Gauge(
            "centerid_gallery_reembed_entries", "re-embedding for a new model: done and total", ["of"], registry=r
        )

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

    def observe_gallery(self, status: GalleryStatus) -> None:
        """At scrape time: the gallery's log positions, its background rebuild and re-embedding progress."""
        nan = float("nan")
        self.gallery_applied_seq.set(status.applied_seq)
        self.gallery_store_seq.set(nan if status.store_seq is None else status.store_seq)
        self.gallery_lag.set(nan if status.lag is None else status.lag)
        self.gallery_stale.set(int(status.may_be_stale))
        for kind in REBUILD_KINDS:
            self.gallery_rebuilding.labels(kind).set(int(status.rebuild.running == kind))
        self.gallery_rebuilds.labels("completed").set(status.rebuild.completed)
        self.gallery_rebuilds.labels("failed").set(status.rebuild.failed)
        done, total = status.reembed or (0, 0)
        self.gallery_reembed.labels("done").set(done)
        self.gallery_reembed.labels("total").set(total)

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
