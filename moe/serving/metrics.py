"""Prometheus metrics of the HTTP service, through `ray.serve.metrics`: each replica records its own, Ray exports them
on its metrics export port (`python -m moe.serving.http ... --metrics-port 8080`, or `ray start
--metrics-export-port`) tagged with the deployment, application and replica, and Prometheus pools them across
replicas (`sum by (status) (rate(ray_moe_requests_total[1m]))`).

    ray_moe_requests            requests answered, by route and status (every status, refusals included)
    ray_moe_errors              requests refused or failed (status >= 400), by route and status
    ray_moe_request_seconds     latency histogram, by route
    ray_moe_batch_queries       queries per model batch (histogram): how many requests' queries are answered together
    ray_moe_pager_hits          expert look-ups found resident, by tier (device, host)
    ray_moe_pager_misses        expert look-ups that paged in, by tier
    ray_moe_pager_bytes_in      bytes paged into each tier
    ray_moe_pager_resident_bytes  expert bytes resident now, by tier (gauge)
    ray_moe_generation          the store generation this replica serves (0: a bundle, or a store before generations)
    ray_moe_seconds_since_change  seconds since this replica last applied a store change (or loaded its model)

(Counters show with a `_total` suffix, histograms as `_bucket`/`_sum`/`_count`.) The pager's and the generation's
figures are read from the server every `interval_s` (1 s) by a thread of the replica.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ray.serve")

LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
TIERS = ("device", "host")
PAGER_COUNTERS = {"hits": "hits", "misses": "misses", "bytes_in": "bytes_in"}  # pager summary field -> metric
_REPLICA: list[ServiceMetrics] = []  # this process's replica's metrics, once it started


def replica_metrics() -> ServiceMetrics | None:
    """The metrics of the replica in this process (None before it started, or with metrics off)."""
    return _REPLICA[0] if _REPLICA else None


class ServiceMetrics:
    """One replica's metrics. `server()` gives the `Server` answering now (a replica that follows a store swaps it);
    its `generation` (and `applied_at`, a `time.time()`) are read where it has them."""

    def __init__(self, server: Callable[[], Any], interval_s: float = 1.0):
        from ray.serve import metrics

        self.server, self.interval_s = server, interval_s
        self.requests = metrics.Counter(
            "moe_requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self.errors = metrics.Counter(
            "moe_errors", description="HTTP requests refused or failed (status >= 400)", tag_keys=("route", "status")
        )
        self.latency = metrics.Histogram(
            "moe_request_seconds", description="request latency", boundaries=LATENCY_BOUNDARIES, tag_keys=("route",)
        )
        self.batch = metrics.Histogram(
            "moe_batch_queries", description="queries answered in one model batch", boundaries=BATCH_BOUNDARIES
        )
        self.pager = {
            name: metrics.Counter(f"moe_pager_{name}", description=f"expert pager {name}, by tier", tag_keys=("tier",))
            for name in PAGER_COUNTERS.values()
        }
        self.resident = metrics.Gauge(
            "moe_pager_resident_bytes", description="expert bytes resident, by tier", tag_keys=("tier",)
        )
        self.generation = metrics.Gauge("moe_generation", description="the store generation this replica serves")
        self.since_change = metrics.Gauge(
            "moe_seconds_since_change", description="seconds since this replica applied a store change"
        )
        self._seen: dict[tuple[int, str, str], float] = {}  # (pager id, tier, field) -> last counted value
        self._generation: Any = None
        self._changed_at = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="moe-metrics", daemon=True)
        self._thread.start()
        _REPLICA[:] = [self]

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        tags = {"route": route, "status": str(status)}
        self.requests.inc(tags=tags)
        if status >= 400:
            self.errors.inc(tags=tags)
        self.latency.observe(seconds, tags={"route": route})

    def observe_batch(self, queries: int) -> None:
        self.batch.observe(queries)

    def refresh(self) -> None:
        """Count the pager's hits, misses and bytes since the last look (a fresh pager, after a swap, from 0), and
        set the gauges."""
        with self._lock:
            server = self.server()
            pager = server.model.pager
            summary = pager.summary()
            for tier in TIERS:
                for field, name in PAGER_COUNTERS.items():
                    now = float(summary.get(tier, {}).get(field, 0))
                    key = (id(pager), tier, field)
                    delta = now - self._seen.get(key, 0.0)
                    if delta > 0:
                        self.pager[name].inc(delta, tags={"tier": tier})
                    self._seen[key] = now
            resident = summary.get("resident", {})
            for tier in TIERS:
                self.resident.set(float(resident.get(f"{tier}_bytes", 0)), tags={"tier": tier})
            generation = getattr(server, "generation", 0)
            if generation != self._generation:
                self._changed_at = getattr(server, "applied_at", None) or time.time()
                self._generation = generation
            self.generation.set(float(generation if isinstance(generation, int | float) else 0))
            self.since_change.set(max(0.0, time.time() - self._changed_at))

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception as error:  # a metrics thread never takes the replica down
                log.warning("moe metrics: %s", error)

    def close(self) -> None:
        self._stop.set()
