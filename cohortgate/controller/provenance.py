"""Which model artifact answered, against the one the policy routes to (issue 24's provenance).

The gateway's audit line names the *routed* digest (the compiled policy's `Backend.digest`); the
sidecar answers with the *served* one (``x-cohortgate-model-digest``), which Envoy's access log
carries to the controller (als.py). Per backend of each variant (``cg.ROUTE.VARIANT.N``) we count
requests whose served digest differs from the routed one -- a live swap in progress, a policy edit the
sidecar has not followed, a drifted or replaced sidecar -- on /metrics and in GET /status, and return
one ``model_served`` audit record when a backend starts serving a digest it has not served within the
last ``window_s`` (the first one seen included). Not per request: during a rolling update two
replicas behind one backend alternate, and each digest is recorded once until it goes quiet.

Digests are kept only when they look like ``sha256:<hex>`` (als.py), and never become metric labels.
Pure bookkeeping apart from the prometheus counters; fed by `Controller.ingest`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from cohortgate.core.policy import Policy
from cohortgate.store.events import Event

MAX_RECENT = 8  # digests remembered per backend (a rolling update shows two)


@dataclass(slots=True)
class _Served:
    requests: int = 0  # requests that named a served digest
    mismatched: int = 0  # ... a different one from the routed digest (when that is known)
    last: str | None = None  # the digest of the latest request
    since: float | None = None  # when the latest recorded change was seen
    recent: dict[str, float] = field(default_factory=dict)  # digest -> when last seen

    def to_json(self, routed: str | None) -> dict[str, Any]:
        return {
            "routed": routed,
            "served": self.last,
            "since": self.since,
            "requests": self.requests,
            "mismatched": self.mismatched,
        }


class ServedModels:
    """``add(event, now)`` per request event; ``summary(route)`` for the status document."""

    def __init__(self, policy: Policy, window_s: float = 60.0, registry: CollectorRegistry | None = None) -> None:
        self.window_s = window_s
        self.served: dict[tuple[str, str, int], _Served] = {}
        self.requests = Counter(
            "cohortgate_controller_model_served_requests",
            "Requests whose response named the model digest that served it, by route and variant.",
            ("route", "variant"),
            registry=registry,
        )
        self.mismatches = Counter(
            "cohortgate_controller_model_digest_mismatches",
            "Requests served by another model digest than the policy routes to (a live swap in progress, "
            "a drifted sidecar), by route and variant.",
            ("route", "variant"),
            registry=registry,
        )
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        self._routed: dict[tuple[str, str, int], str | None] = {}
        self._variants: dict[str, dict[str, int]] = {}  # route -> variant -> number of backends
        for route in policy.routes:
            self._variants[route.name] = {v.name: len(v.backends) for v in route.variants}
            for v in route.variants:
                for i, b in enumerate(v.backends):
                    self._routed[(route.name, v.name, i)] = b.digest

    def add(self, e: Event, now: float) -> dict[str, Any] | None:
        """Count one request event; a ``model_served`` audit record (without ``actor``) when its backend
        serves a digest not seen from it within ``window_s``, else None."""
        key = (e.route, e.variant, e.backend)
        if not e.model_digest or key not in self._routed:
            return None
        served = self.served.get(key)
        if served is None:
            served = self.served[key] = _Served()
        routed = self._routed[key]
        served.requests += 1
        self.requests.labels(e.route, e.variant).inc()
        if routed is not None and e.model_digest != routed:
            served.mismatched += 1
            self.mismatches.labels(e.route, e.variant).inc()
        digest, before = e.model_digest, served.last
        seen = served.recent.get(digest)
        served.recent[digest] = now
        served.last = digest
        if seen is not None and now - seen <= self.window_s:
            return None
        if len(served.recent) > MAX_RECENT:
            oldest = min(served.recent, key=served.recent.__getitem__)
            del served.recent[oldest]
        served.since = now
        return {
            "ts": now,
            "route": e.route,
            "variant": e.variant,
            "action": "model_served",
            "backend": e.backend,
            "served": digest,
            "served_before": before,
            "routed": routed,
            "reason": (
                f"{e.route}/{e.variant} backend {e.backend} serves {digest[:19]}"
                + (f" (was {before[:19]})" if before else "")
                + ("" if routed is None or routed == digest else f", not the routed {routed[:19]}")
            ),
        }

    def summary(self, route: str) -> dict[str, Any] | None:
        """Per variant of ``route``: per backend, the routed and the latest served digest, requests and
        mismatches since the controller started; None for an unknown route."""
        variants = self._variants.get(route)
        if variants is None:
            return None
        out: dict[str, Any] = {}
        for name, n in variants.items():
            backends = []
            for i in range(n):
                routed = self._routed.get((route, name, i))
                backends.append((self.served.get((route, name, i)) or _Served()).to_json(routed))
            out[name] = {
                "requests": sum(b["requests"] for b in backends),
                "mismatched": sum(b["mismatched"] for b in backends),
                "backends": backends,
            }
        return out
