"""Shadow comparison: pair a shadow's report with its primary's by request id (pure).

Mirrored answers never reach a client, so the only place to compare them is where they are
produced: our sidecars report ``(request id, variant, model, status, latency, output digest)``.
Envoy keeps ``x-request-id`` on the mirrored copy, so a shadow report and the primary's report for
one request share an id. Per shadow we keep: pairs seen, how many agreed (equal digests, both
answered), shadow errors, and recent latency deltas (shadow minus primary, sidecar-measured on both
sides so the network is not part of it). Backends that do not report simply have no pairs.

Unpaired reports wait ``ttl_s`` (a shadow can answer long after its primary) in a bounded table.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cohortgate.core.policy import Policy
from cohortgate.store.events import Event


@dataclass(slots=True)
class ShadowStats:
    pairs: int = 0
    agreed: int = 0
    compared: int = 0  # pairs where both answered (digests present)
    shadow_errors: int = 0
    deltas_ms: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    def to_json(self) -> dict[str, Any]:
        deltas = np.fromiter(self.deltas_ms, dtype=float) if self.deltas_ms else None
        return {
            "pairs": self.pairs,
            "compared": self.compared,
            "agreement": round(self.agreed / self.compared, 6) if self.compared else None,
            "shadow_errors": self.shadow_errors,
            "latency_delta_ms": None
            if deltas is None
            else {
                "mean": round(float(deltas.mean()), 3),
                "p50": round(float(np.percentile(deltas, 50)), 3),
                "p95": round(float(np.percentile(deltas, 95)), 3),
            },
        }


@dataclass(slots=True)
class _Pending:
    at: float
    route: str
    primary: Event | None = None
    shadows: list[Event] = field(default_factory=list)


class ShadowJoin:
    """Joins shadow reports with primary reports; ``stats[(route, shadow)]`` holds the results."""

    def __init__(self, policy: Policy, ttl_s: float = 30.0, capacity: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self.stats: dict[tuple[str, str], ShadowStats] = {}
        self.unmatched = 0  # reports that named no route/variant of the policy
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        self._roles: dict[tuple[str, str], str] = {}  # (route, name) -> primary | shadow
        self._by_model: dict[str, list[str]] = {}
        self._by_name: dict[str, list[str]] = {}
        for r in policy.routes:
            for v in r.variants:
                self._roles[(r.name, v.name)] = "primary"
                self._by_name.setdefault(v.name, []).append(r.name)
            for s in r.shadows:
                self._roles[(r.name, s.name)] = "shadow"
                self._by_name.setdefault(s.name, []).append(r.name)
                self.stats.setdefault((r.name, s.name), ShadowStats())
            if r.model:
                self._by_model.setdefault(r.model, []).append(r.name)

    def _route_of(self, e: Event) -> str | None:
        if e.route:
            return e.route if (e.route, e.variant) in self._roles else None
        candidates = [r for r in self._by_model.get(e.model, ()) if (r, e.variant) in self._roles]
        if not candidates:
            candidates = self._by_name.get(e.variant, [])
        return candidates[0] if len(candidates) == 1 else None

    def add(self, e: Event, now: float) -> None:
        """Take one sidecar report (``kind == "report"``)."""
        self._expire(now)
        route = self._route_of(e)
        if route is None or not e.request_id:
            self.unmatched += 1
            return
        role = self._roles[(route, e.variant)]
        p = self._pending.get(e.request_id)
        if p is None:
            if len(self._pending) >= self.capacity:
                self._pending.popitem(last=False)
            p = self._pending[e.request_id] = _Pending(now, route)
        if role == "primary":
            p.primary = e
        else:
            p.shadows.append(e)
        if p.primary is not None and p.shadows:
            for s in p.shadows:
                self._pair(route, p.primary, s)
            p.shadows.clear()

    def _pair(self, route: str, primary: Event, shadow: Event) -> None:
        st = self.stats.setdefault((route, shadow.variant), ShadowStats())
        st.pairs += 1
        if shadow.status >= 500 or shadow.status == 0:
            st.shadow_errors += 1
        if primary.digest and shadow.digest:
            st.compared += 1
            st.agreed += primary.digest == shadow.digest
        st.deltas_ms.append(shadow.latency_ms - primary.latency_ms)

    def _expire(self, now: float) -> None:
        horizon = now - self.ttl_s
        while self._pending:
            _, first = next(iter(self._pending.items()))
            if first.at > horizon:
                break
            self._pending.popitem(last=False)

    def summary(self, route: str) -> dict[str, Any]:
        return {s: st.to_json() for (r, s), st in sorted(self.stats.items()) if r == route}
