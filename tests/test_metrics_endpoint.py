"""The service's Prometheus metrics, scraped from Ray's metrics export port while the service answers: every metric
of `moe.serving.metrics` present, tagged with the replica, and moving with the traffic; concurrent requests for
several tenants answered in mixed batches."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from moe.serving import Server
from tests.service import call, free_port, serving

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

METRICS = [
    "ray_moe_requests_total",
    "ray_moe_errors_total",
    "ray_moe_request_seconds_bucket",
    "ray_moe_batch_queries_bucket",
    "ray_moe_pager_hits_total",
    "ray_moe_pager_misses_total",
    "ray_moe_pager_bytes_in_total",
    "ray_moe_pager_resident_bytes",
    "ray_moe_generation",
    "ray_moe_seconds_since_change",
]
SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")


@pytest.fixture(scope="module")
def service(tiny_run):
    """(service URL, metrics URL): one replica with a small device budget (so that paging moves bytes), Ray
    exporting metrics every 0.5 s."""
    metrics_port = free_port()
    largest = max(Server(tiny_run.bundle).model.pager.sizes.values())
    budget_mb = 1.5 * largest / 2**20  # one expert at a time: a batch of three tenants pages in waves
    settings = {"bundle": str(tiny_run.bundle), "batch_wait_ms": 20, "budget_mb": budget_mb}
    ray_options = {"_metrics_export_port": metrics_port, "_system_config": {"metrics_report_interval_ms": 500}}
    with serving(settings, **ray_options) as url:
        yield url, f"http://127.0.0.1:{metrics_port}/metrics"


def scrape(url: str) -> dict[str, float]:
    """Sum of each metric's samples (pooled over replicas and tags, as a Prometheus `sum` would), per name and
    per name{tag=value} for the tags asked about below; also the replicas seen."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("ray_moe_") or not (match := SAMPLE.match(line)):
            continue
        name, tags, value = match.groups()
        tags = dict(re.findall(r'(\w+)="([^"]*)"', tags or ""))
        if name.endswith("_bucket") and tags.get("le") != "+Inf":
            continue
        for key in [name] + [f"{name}{{{t}={tags[t]}}}" for t in ("status", "tier", "route") if t in tags]:
            totals[key] = totals.get(key, 0.0) + float(value)
        if "replica" in tags:
            totals[f"replica={tags['replica']}"] = 1.0
    return totals


def traffic(url: str, texts: list[str], n: int) -> None:
    tenants = ["bank", "music", "weather", None]
    queries = [{"text": texts[i % len(texts)], "tenant": tenants[i % 4]} for i in range(n)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda q: call(f"{url}/predict", q)[0], queries))
    assert set(results) == {200}
    assert call(f"{url}/predict", {"text": "x", "tenant": "acme"})[0] == 404


def until(url: str, ready) -> dict[str, float]:
    deadline = time.monotonic() + 30
    while not ready(seen := scrape(url)):
        assert time.monotonic() < deadline, f"metrics did not move in 30 s: {seen}"
        time.sleep(0.5)
    return seen


def test_every_metric_is_exported_per_replica_and_moves_with_the_traffic(service, tiny_run):
    url, metrics = service
    lines = (tiny_run.evaluation / "predictions_test.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    traffic(url, texts, 64)
    first = until(metrics, lambda m: all(name in m for name in METRICS) and m.get("ray_moe_requests_total", 0) >= 65)
    assert any(key.startswith("replica=") for key in first)  # Serve tags each replica's samples
    assert first["ray_moe_requests_total{status=200}"] >= 64 and first["ray_moe_errors_total{status=404}"] >= 1
    assert first["ray_moe_pager_misses_total{tier=device}"] > 0 and first["ray_moe_pager_bytes_in_total"] > 0
    assert first["ray_moe_batch_queries_count"] < first["ray_moe_batch_queries_sum"]  # queries answered together
    assert first["ray_moe_generation"] == 0
    stats = call(f"{url}/stats")[1]
    assert stats["batching"]["mixed_batches"] > 0  # several tenants' queries in one forward

    traffic(url, texts, 32)
    moving = ("ray_moe_requests_total", "ray_moe_request_seconds_count", "ray_moe_batch_queries_sum")
    moving += ("ray_moe_pager_hits_total", "ray_moe_pager_misses_total", "ray_moe_pager_bytes_in_total")
    moving += ("ray_moe_seconds_since_change",)
    second = until(metrics, lambda m: all(m.get(name, 0) > first[name] for name in moving))
    assert second["ray_moe_errors_total"] > first["ray_moe_errors_total"]
