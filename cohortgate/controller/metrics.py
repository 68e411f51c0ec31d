"""The controller's metrics: its own decisions, and the answered requests it learns from Envoy's access log.

Served on the controller API's ``/metrics``:

``cohortgate_requests_total{route,variant,status_class}``   answered requests (from the access log)
``cohortgate_request_duration_seconds{route,variant}``      upstream latency histogram
``cohortgate_shadow_copies_total{route,shadow}``            mirrored copies sent
``cohortgate_events_total{kind}``, ``cohortgate_events_dropped_total{sink,reason}``   the event stream
``cohortgate_controller_*``                                  actions, leadership, ticks, p-values
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cohortgate.support.metrics import LATENCY_BUCKETS, MetricsBase, status_class


class TrafficMetrics(MetricsBase):
    """Answered requests, as Envoy's access log reports them, and the event stream's own counts.

    ``registry`` is usually the controller's, so one ``/metrics`` shows both.
    """

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
        self.shadows = Counter(
            "cohortgate_shadow_copies",
            "Mirrored copies sent, by route and shadow.",
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

    def shadow_copy(self, route: str, shadow: str, n: int = 1) -> None:
        self.shadows.labels(route, shadow).inc(n)

    def event_emitted(self, kind: str, n: int = 1) -> None:
        self.events.labels(kind).inc(n)

    def event_dropped(self, sink: str, reason: str, n: int = 1) -> None:
        self.dropped.labels(sink, reason).inc(n)


class ControllerMetrics(MetricsBase):
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
