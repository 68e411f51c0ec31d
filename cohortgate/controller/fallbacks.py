"""Feature fallbacks per variant (issue 22): how often a sidecar served without its joined features (pure).

A sidecar that joins online features (sidecar/join.py) says in each report why its fallback served the
request (``missing``, ``stale``, ``over_budget``, ...), or nothing when the features were joined. Per
(route, variant or shadow) of a route with ``features:`` we count reports and fallbacks by reason; the
status and the dashboard show the rate. Reports name their variant and model, not their route: the
route is found the way the shadow join finds it (the route serving that model, else the one variant
of that name).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cohortgate.core.contract import FEATURE_FALLBACK_REASONS
from cohortgate.core.policy import Policy
from cohortgate.store.events import Event


@dataclass(slots=True)
class FallbackCounts:
    reports: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        fallbacks = sum(self.reasons.values())
        return {
            "reports": self.reports,
            "fallbacks": fallbacks,
            "rate": round(fallbacks / self.reports, 6) if self.reports else None,
            "reasons": dict(sorted(self.reasons.items())),
        }


class FeatureFallbacks:
    """Counts the sidecars' reports of routes with features; ``summary(route)`` per variant."""

    def __init__(self, policy: Policy) -> None:
        self.counts: dict[tuple[str, str], FallbackCounts] = {}
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        self._names: dict[str, list[str]] = {}  # variant/shadow name -> routes with features
        self._models: dict[str, list[str]] = {}
        self._owners: dict[str, list[str]] = {}
        for r in policy.routes:
            if r.features is None:
                continue
            owners = [v.name for v in r.variants] + [s.name for s in r.shadows]
            self._owners[r.name] = owners
            for name in owners:
                self._names.setdefault(name, []).append(r.name)
            if r.model:
                self._models.setdefault(r.model, []).append(r.name)

    def _route_of(self, e: Event) -> str | None:
        if e.route:
            return e.route if e.variant in self._owners.get(e.route, ()) else None
        candidates = [r for r in self._models.get(e.model, ()) if e.variant in self._owners[r]]
        if not candidates:
            candidates = self._names.get(e.variant, [])
        return candidates[0] if len(candidates) == 1 else None

    def add(self, e: Event) -> None:
        """Take one sidecar report; reports of routes without features are not counted."""
        route = self._route_of(e)
        if route is None:
            return
        counts = self.counts.setdefault((route, e.variant), FallbackCounts())
        counts.reports += 1
        if e.fallback:  # a reason no sidecar sends is counted, under "other": never an unbounded key
            counts.reasons[e.fallback if e.fallback in FEATURE_FALLBACK_REASONS else "other"] += 1

    def summary(self, route: str) -> dict[str, Any] | None:
        """Per variant (and shadow) of ``route``: reports, fallbacks, their rate and reasons; None without features."""
        owners = self._owners.get(route)
        if owners is None:
            return None
        return {name: self.counts.get((route, name), FallbackCounts()).to_json() for name in owners}
