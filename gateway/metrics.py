"""Prometheus metrics the gateway exposes on ``/metrics``.

Every metric lives in a `CollectorRegistry` owned by one `GatewayMetrics`, so tests can hold several.
Decisions are read from the processor's plain counters at scrape time: the request path pays nothing.
Answered requests and latencies are known only after the response, so the controller exports them
from Envoy's access log (`cohortgate.controller.metrics.TrafficMetrics`).

====================================================  ==========================================
``cohortgate_decisions_total{outcome,code}``                allowed / denied (by denial code) / error,
                                                            read from `Processor.stats` at scrape time
``cohortgate_routed_requests_total{route,variant}``         allowed requests by the chosen variant
``cohortgate_mirror_decisions_total{route,shadow}``         mirrored copies requested
``cohortgate_policy_reloads_total{result}``                 policy reloads: ok / failed
``cohortgate_policy_info{digest}``                          1 for the policy serving now
``cohortgate_variant_weight{route,variant}``                effective weight now applied
``cohortgate_state_updates_total{result}``                  controller states applied / rejected
====================================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from cohortgate.core.contract import cluster_parts
from cohortgate.core.policy import Route, Variant
from cohortgate.support.metrics import MetricsBase


class _Decisions(Collector):
    """``cohortgate_decisions_total``: the processor's own plain counters, read only when scraped.

    `gateway.extproc.Processor` already counts allowed / denied-by-code / errors in `Stats` (an int
    increment); exporting those at scrape time keeps the request path free of any metric call.
    Decisions counted elsewhere (``GatewayMetrics.decision``) are added on top.
    """

    def __init__(self) -> None:
        self.manual: dict[tuple[str, str], float] = {}
        self.sources: list[Any] = []  # objects with .allowed, .denied {code: n}, .errors

    def collect(self) -> Iterator[CounterMetricFamily]:
        totals = dict(self.manual)
        for stats in self.sources:
            totals[("allowed", "none")] = totals.get(("allowed", "none"), 0) + stats.allowed
            totals[("error", "internal")] = totals.get(("error", "internal"), 0) + stats.errors
            for code, n in list(stats.denied.items()):
                totals[("denied", code)] = totals.get(("denied", code), 0) + n
        family = CounterMetricFamily(
            "cohortgate_decisions",
            "Processor decisions: allowed, denied (by denial code), error.",
            labels=("outcome", "code"),
        )
        for (outcome, code), n in sorted(totals.items()):
            family.add_metric((outcome, code), n)
        yield family
        routed = CounterMetricFamily(
            "cohortgate_routed_requests",
            "Allowed requests by the route and variant the processor chose (answered ones: the controller's "
            "cohortgate_requests_total).",
            labels=("route", "variant"),
        )
        mirrored = CounterMetricFamily(
            "cohortgate_mirror_decisions", "Mirrored copies the processor requested, by route and shadow.",
            labels=("route", "shadow"),
        )  # fmt: skip
        for family_, attr in ((routed, "routed"), (mirrored, "mirrored")):
            totals_: dict[tuple[str, str], float] = {}
            for stats in self.sources:
                for cluster, n in list(getattr(stats, attr, {}).items()):
                    key = cluster_parts(cluster) or ("none", cluster)
                    totals_[key] = totals_.get(key, 0) + n
            for key, n in sorted(totals_.items()):
                family_.add_metric(key, n)
            yield family_

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("cohortgate_decisions", "", labels=("outcome", "code"))
        yield CounterMetricFamily("cohortgate_routed_requests", "", labels=("route", "variant"))
        yield CounterMetricFamily("cohortgate_mirror_decisions", "", labels=("route", "shadow"))


class GatewayMetrics(MetricsBase):
    """The gateway's metrics. Pass ``registry=prometheus_client.REGISTRY`` to join the global one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = _Decisions()
        r.register(self.decisions)
        self.reloads = Counter(
            "cohortgate_policy_reloads", "Policy reloads by result (ok, failed).", ("result",), registry=r
        )
        self.policy_info = Gauge("cohortgate_policy_info", "1 for the policy serving now.", ("digest",), registry=r)
        self.weights = Gauge(
            "cohortgate_variant_weight", "Effective weight (percent) applied now.", ("route", "variant"), registry=r
        )
        self._weights_shown: dict[str, tuple[Variant, ...]] = {}  # route -> the variants its gauges show
        self.state_updates = Counter(
            "cohortgate_state_updates",
            "Controller states applied (ok) or refused (invalid).",
            ("result",),
            registry=r,
        )

    def decision(self, outcome: str, code: str = "none") -> None:
        """``outcome`` is ``allowed``, ``denied`` (``code`` = the denial code) or ``error``."""
        manual = self.decisions.manual
        key = (outcome, code)
        manual[key] = manual.get(key, 0) + 1

    def count_decisions_of(self, stats: Any) -> None:
        """Export an `Processor.stats` (read at scrape time, so requests pay nothing)."""
        self.decisions.sources.append(stats)

    def allowed(self) -> None:
        self.decision("allowed", "none")

    def denied(self, code: str) -> None:
        self.decision("denied", code)

    def internal_error(self) -> None:
        self.decision("error", "internal")

    def policy_reload(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()

    def serving(self, digest: str) -> None:
        """``cohortgate_policy_info{digest}`` = 1 for the policy now serving, and only for it."""
        self.policy_info.clear()
        self.policy_info.labels(digest[:12]).set(1)

    def show_weights(self, routes: Iterable[Route]) -> None:
        """``cohortgate_variant_weight`` of these routes (a rolled-back variant shows 0), set only for a
        route whose variants changed since last shown: a reload of 1 000 routes re-sets a few gauges,
        not 2 000 (~13 ms of the event loop). Variants are immutable, so the same object shows the same."""
        shown = self._weights_shown
        for route in routes:
            if shown.get(route.name) is route.variants:
                continue
            shown[route.name] = route.variants
            for v in route.variants:
                self.weights.labels(route.name, v.name).set(v.weight if v.enabled else 0)

    def state_update(self, ok: bool) -> None:
        self.state_updates.labels("ok" if ok else "invalid").inc()


