"""Prometheus metrics the gateway (and the controller) expose on ``/metrics``.

Every metric lives in a `CollectorRegistry` owned by one `GatewayMetrics` / `ControllerMetrics`
object, so tests and an embedded single process can hold several without name clashes. The helper
methods cache label children: a hot-path call is a dict lookup and an increment (about 1 µs).

Gateway metrics (names as scraped):

====================================================  ==========================================
``cohortgate_requests_total{route,variant,status_class}``   answered requests (from the access log)
``cohortgate_request_duration_seconds{route,variant}``      upstream latency histogram
``cohortgate_decisions_total{outcome,code}``                allowed / denied (by denial code) / error,
                                                            read from `Engine.stats` at scrape time
``cohortgate_shadow_copies_total{route,shadow}``            mirrored copies requested
``cohortgate_events_dropped_total{sink,reason}``            telemetry events not delivered
``cohortgate_events_total{kind}``                           telemetry events emitted
``cohortgate_policy_reloads_total{result}``                 policy reloads: ok / failed
``cohortgate_policy_info{digest}``                          1 for the policy serving now
``cohortgate_variant_weight{route,variant}``                effective weight now applied
``cohortgate_state_updates_total{result}``                  controller states applied / rejected
====================================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from cohortgate.core.contract import cluster_parts

# Model-serving latencies: 1 ms .. 10 s, roughly 2x apart, with extra resolution around 50-500 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 2.5, 5.0, 10.0)


def status_class(status: int) -> str:
    """``2xx`` … ``5xx``; ``none`` when there was no response (reset, timeout before headers)."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


class _Decisions(Collector):
    """``cohortgate_decisions_total``: the processor's own plain counters, read only when scraped.

    `gateway.extproc.Engine` already counts allowed / denied-by-code / errors in `Stats` (an int
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
            totals_ = {}
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


class _Metrics:
    registry: CollectorRegistry

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for a ``/metrics`` handler."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class GatewayMetrics(_Metrics):
    """The gateway's metrics. Pass ``registry=prometheus_client.REGISTRY`` to join the global one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "cohortgate_requests",
            "Answered requests by route, variant and status class.",
            ("route", "variant", "status_class"),
            registry=r,
        )
        self.latency = Histogram(
            "cohortgate_request_duration_seconds",
            "Upstream latency by route and variant.",
            ("route", "variant"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = _Decisions()
        r.register(self.decisions)
        self.shadows = Counter(
            "cohortgate_shadow_copies",
            "Mirrored copies requested, by route and shadow.",
            ("route", "shadow"),
            registry=r,
        )
        self.dropped = Counter(
            "cohortgate_events_dropped",
            "Telemetry events not delivered, by sink and reason.",
            ("sink", "reason"),
            registry=r,
        )
        self.events = Counter("cohortgate_events", "Telemetry events emitted, by kind.", ("kind",), registry=r)
        self.reloads = Counter(
            "cohortgate_policy_reloads", "Policy reloads by result (ok, failed).", ("result",), registry=r
        )
        self.policy_info = Gauge("cohortgate_policy_info", "1 for the policy serving now.", ("digest",), registry=r)
        self.weights = Gauge(
            "cohortgate_variant_weight", "Effective weight (percent) applied now.", ("route", "variant"), registry=r
        )
        self.state_updates = Counter(
            "cohortgate_state_updates",
            "Controller states applied (ok) or refused (invalid).",
            ("result",),
            registry=r,
        )
        self._req: dict[tuple[str, str, int], tuple[object, object]] = {}

    def observe_request(self, route: str, variant: str, status: int, latency_s: float) -> None:
        key = (route, variant, status // 100 if 100 <= status <= 599 else 0)
        children = self._req.get(key)
        if children is None:
            children = (
                self.requests.labels(route, variant, status_class(status)),
                self.latency.labels(route, variant),
            )
            self._req[key] = children
        children[0].inc()  # type: ignore[attr-defined]
        children[1].observe(latency_s)  # type: ignore[attr-defined]

    def decision(self, outcome: str, code: str = "none") -> None:
        """``outcome`` is ``allowed``, ``denied`` (``code`` = the denial code) or ``error``."""
        manual = self.decisions.manual
        key = (outcome, code)
        manual[key] = manual.get(key, 0) + 1

    def count_decisions_of(self, stats: Any) -> None:
        """Export an `Engine.stats` (read at scrape time, so requests pay nothing)."""
        self.decisions.sources.append(stats)

    def allowed(self) -> None:
        self.decision("allowed", "none")

    def denied(self, code: str) -> None:
        self.decision("denied", code)

    def internal_error(self) -> None:
        self.decision("error", "internal")

    def shadow_copy(self, route: str, shadow: str, n: int = 1) -> None:
        self.shadows.labels(route, shadow).inc(n)

    def event_emitted(self, kind: str, n: int = 1) -> None:
        self.events.labels(kind).inc(n)

    def event_dropped(self, sink: str, reason: str, n: int = 1) -> None:
        self.dropped.labels(sink, reason).inc(n)

    def policy_reload(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()

    def serving(self, digest: str) -> None:
        """``cohortgate_policy_info{digest}`` = 1 for the policy now serving, and only for it."""
        self.policy_info.clear()
        self.policy_info.labels(digest[:12]).set(1)

    def set_weights(self, route: str, weights: Mapping[str, int], disabled: frozenset[str] = frozenset()) -> None:
        for variant, weight in weights.items():
            self.weights.labels(route, variant).set(0 if variant in disabled else weight)

    def state_update(self, ok: bool) -> None:
        self.state_updates.labels("ok" if ok else "invalid").inc()


class ControllerMetrics(_Metrics):
    """The controller's own metrics (served on its API's ``/metrics``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.actions = Counter(
            "cohortgate_controller_actions",
            "Actions taken (rollback, promote, halt, resume), by route and variant.",
            ("route", "variant", "action", "actor"),
            registry=r,
        )
        self.leader = Gauge(
            "cohortgate_controller_leader", "1 while this controller holds the leader lock.", registry=r
        )
        self.ticks = Counter("cohortgate_controller_ticks", "Evaluation intervals run as leader.", registry=r)
        self.consumed = Counter("cohortgate_controller_events", "Events consumed, by kind.", ("kind",), registry=r)
        self.redis_errors = Counter(
            "cohortgate_controller_redis_errors", "Redis calls that failed, by operation.", ("op",), registry=r
        )
        self.p_value = Gauge(
            "cohortgate_controller_p_value",
            "Always-valid p-value of the harm test, by route, variant and metric.",
            ("route", "variant", "metric"),
            registry=r,
        )

    def action(self, route: str, variant: str, action: str, actor: str) -> None:
        self.actions.labels(route, variant, action, actor).inc()

    def redis_error(self, op: str) -> None:
        self.redis_errors.labels(op).inc()


async def serve_metrics(metrics: _Metrics, host: str, port: int, health: Callable[[], Mapping[str, Any]]) -> Any:
    """``GET /metrics`` (Prometheus exposition) and ``GET /healthz`` (JSON) on ``host:port``.

    Returns the started aiohttp ``AppRunner`` (``await runner.cleanup()`` stops it). It shares the
    gateway's event loop: a scrape renders a few hundred lines, far less than one request's work.
    """
    import json

    from aiohttp import web

    async def _metrics(_request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(_request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(dict(health())), content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
