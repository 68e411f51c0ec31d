"""Prometheus metrics for one sidecar, cheap enough for the hot path.

prometheus-client's Histogram takes a lock and scans its buckets in Python on every observation;
at ~15 000 requests/s that is a tenth of the event loop. Everything here is touched only from the
event loop's thread, so plain integers and ``bisect`` suffice, and a custom collector turns them
into metric families when ``/metrics`` is scraped. Each sidecar owns its registry, so several can
live in one process (tests, ``cohortgate up``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

PREFIX = "cohortgate_sidecar"


class Histogram:
    """A single-threaded histogram: ``observe`` is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, doc: str, model: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=["model"])
        cumulative = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append((_le(bound), cumulative))
        family.add_metric([model], buckets, self.sum)
        return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class SidecarMetrics:
    """Counters and histograms of one served model; also a prometheus collector."""

    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.model = model
        self.requests = 0
        self.failures: Counter[int] = Counter()  # by HTTP status
        self.reports: Counter[str] = Counter()  # shadow reports by outcome
        # Data contract (sidecar/contract.py): rows breaking a rule, by (input|output, feature, rule).
        self.contract_violations: Counter[tuple[str, str, str]] = Counter()
        self.contract_rejected = 0  # requests refused with 422 (enforce mode)
        self.quality_reports: Counter[str] = Counter()  # quality reports by outcome: sent, failed, dropped
        self.request_seconds = Histogram(LATENCY_BUCKETS)
        self.queue_seconds = Histogram(LATENCY_BUCKETS)
        self.compute_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.batch_requests = Histogram(BATCH_BUCKETS)
        self.provider: str | None = None
        self.ready = False
        self.queue_depth: Callable[[], int] = lambda: 0
        self.on_scrape: Callable[[], None] | None = None  # brings deferred counts up to date (sidecar/quality.py)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # Hot path ------------------------------------------------------------------------------
    def on_request(self, status: int, seconds: float) -> None:
        self.requests += 1
        self.request_seconds.observe(seconds)
        if status >= 400:
            self.failures[status] += 1

    def on_batch(self, rows: int, requests: int, compute_s: float, waits_s: Sequence[float]) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.compute_seconds.observe(compute_s)
        observe = self.queue_seconds.observe
        for wait in waits_s:
            observe(wait)

    # Scrape --------------------------------------------------------------------------------
    def collect(self) -> Iterator:
        if self.on_scrape is not None:
            self.on_scrape()
        m = self.model
        total = CounterMetricFamily(f"{PREFIX}_requests", "Infer requests answered.", labels=["model"])
        total.add_metric([m], self.requests)
        yield total
        failed = CounterMetricFamily(
            f"{PREFIX}_request_failures",
            "Infer requests answered with an error, by status.",
            labels=["model", "status"],
        )
        for status, count in sorted(self.failures.items()):
            failed.add_metric([m, str(status)], count)
        yield failed
        yield self.request_seconds.family(
            f"{PREFIX}_request_seconds", "Infer request latency inside the sidecar, body read to answer.", m
        )
        yield self.queue_seconds.family(f"{PREFIX}_queue_seconds", "Time a request waited for its batch.", m)
        yield self.compute_seconds.family(f"{PREFIX}_compute_seconds", "onnxruntime time per batch.", m)
        yield self.batch_rows.family(f"{PREFIX}_batch_size", "Rows per onnxruntime call.", m)
        yield self.batch_requests.family(f"{PREFIX}_batch_requests", "Requests merged per onnxruntime call.", m)
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for a batch.", labels=["model"])
        depth.add_metric([m], self.queue_depth())
        yield depth
        ready = GaugeMetricFamily(f"{PREFIX}_ready", "1 once the model is loaded and warmed up.", labels=["model"])
        ready.add_metric([m], 1 if self.ready else 0)
        yield ready
        if self.provider is not None:
            provider = GaugeMetricFamily(
                f"{PREFIX}_execution_provider",
                "The onnxruntime execution provider actually in use (from session.get_providers()).",
                labels=["model", "provider"],
            )
            provider.add_metric([m, self.provider], 1)
            yield provider
        reports = CounterMetricFamily(
            f"{PREFIX}_shadow_reports", "Shadow-comparison reports, by outcome.", labels=["model", "outcome"]
        )
        for outcome, count in sorted(self.reports.items()):
            reports.add_metric([m, outcome], count)
        yield reports
        violations = CounterMetricFamily(
            f"{PREFIX}_contract_violations",
            "Rows breaking a rule of the model's data contract, by side (input/output), feature and rule.",
            labels=["model", "side", "feature", "rule"],
        )
        for (side, feature, rule), count in sorted(self.contract_violations.items()):
            violations.add_metric([m, side, feature, rule], count)
        yield violations
        rejected = CounterMetricFamily(
            f"{PREFIX}_contract_rejected", "Requests refused (422) by an enforced data contract.", labels=["model"]
        )
        rejected.add_metric([m], self.contract_rejected)
        yield rejected
        quality = CounterMetricFamily(
            f"{PREFIX}_quality_reports", "Quality (drift-sketch) reports, by outcome.", labels=["model", "outcome"]
        )
        for outcome, count in sorted(self.quality_reports.items()):
            quality.add_metric([m, outcome], count)
        yield quality
