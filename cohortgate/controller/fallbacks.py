"""Feature fallbacks per variant (issue 22): how often a sidecar served without its joined features (pure).

A sidecar that joins online features (sidecar/join.py) says in each report why its fallback served the
request (``missing``, ``stale``, ``over_budget``, ...), or nothing when the features were joined. Per
(route, variant or shadow) of a route with ``features:`` we count reports and fallbacks by reason; the
status and the dashboard show the rate over a sliding window (``window_s``, the controller's, 60 s by
default), so the rate is current, like the error rates beside it: one-second buckets, the last
``window_s`` seconds of them kept, as `cohortgate.controller.windows.Sliding` keeps outcomes. Reports
name their variant and model, not their route: the route is found the way the shadow join finds it
(the route serving that model, else the one variant of that name).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from cohortgate.core.contract import FEATURE_FALLBACK_REASONS
from cohortgate.core.policy import Policy
from cohortgate.store.events import Event


@dataclass(slots=True)
class FallbackCounts:
    reports: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def merge(self, other: FallbackCounts, sign: int = 1) -> None:
        self.reports += sign * other.reports
        for reason, n in other.reasons.items():
            self.reasons[reason] += sign * n
        if sign < 0:
            self.reasons = +self.reasons  # drop the reasons now at zero

    def to_json(self, window_s: float) -> dict[str, Any]:
        fallbacks = sum(self.reasons.values())
        return {
            "reports": self.reports,
            "fallbacks": fallbacks,
            "rate": round(fallbacks / self.reports, 6) if self.reports else None,
            "reasons": dict(sorted(self.reasons.items())),
            "window_s": window_s,
        }


class SlidingFallbacks:
    """One-second buckets of `FallbackCounts` and their running sum: at ``now`` the seconds
    ``[now - span_s, now)`` and the current one (the rule of `windows.Sliding`)."""

    __slots__ = ("_buckets", "_sum", "span_s")

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._buckets: deque[tuple[int, FallbackCounts]] = deque()  # (second, counts), oldest first
        self._sum = FallbackCounts()

    def add(self, now: float, reason: str | None) -> None:
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, FallbackCounts()))
        for counts in (self._buckets[-1][1], self._sum):
            counts.reports += 1
            if reason is not None:
                counts.reasons[reason] += 1

    def counts(self, now: float) -> FallbackCounts:
        while self._buckets and self._buckets[0][0] + 1 <= now - self.span_s:
            self._sum.merge(self._buckets.popleft()[1], -1)
        return FallbackCounts(self._sum.reports, Counter(self._sum.reasons))


class FeatureFallbacks:
    """Counts the sidecars' reports of routes with features; ``summary(route, now)`` per variant."""

    def __init__(self, policy: Policy, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.windows: dict[tuple[str, str], SlidingFallbacks] = {}
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

    def add(self, e: Event, now: float) -> None:
        """Take one sidecar report, received at ``now``; reports of routes without features are not counted."""
        route = self._route_of(e)
        if route is None:
            return
        window = self.windows.get((route, e.variant))
        if window is None:
            window = self.windows[(route, e.variant)] = SlidingFallbacks(self.window_s)
        # a reason no sidecar sends is counted, under "other": never an unbounded key
        reason = (e.fallback if e.fallback in FEATURE_FALLBACK_REASONS else "other") if e.fallback else None
        window.add(now, reason)

    def summary(self, route: str, now: float) -> dict[str, Any] | None:
        """Per variant (and shadow) of ``route``, over the last ``window_s`` seconds: reports, fallbacks,
        their rate and reasons; None without features."""
        owners = self._owners.get(route)
        if owners is None:
            return None
        out = {}
        for name in owners:
            window = self.windows.get((route, name))
            out[name] = (window.counts(now) if window is not None else FallbackCounts()).to_json(self.window_s)
        return out
