"""Per route, per variant windows of request outcomes (pure: the caller passes the clock).

Each variant keeps three views of the same events, because the controller asks three questions:

* the **batch** since the last tick feeds the sequential tests (one likelihood ratio per interval);
* the **step** totals since the variant's current rollout step began decide whether a step has
  enough samples to be promoted;
* a **sliding window** of one-second buckets (60 s by default) answers the absolute guardrails and
  `status` (error rate, p50/p99).

Latencies go into a fixed log-spaced histogram (5 % wide bins from 10 µs to 10 min), so windows
merge by addition and quantiles cost a cumulative sum. Distinct hashed units per variant, counted
since the weights last changed, feed the sample-ratio check (units, not requests: a heavy user
would otherwise look like a broken split).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

LAT_MIN_MS = 0.01
LAT_RATIO = 1.05
LAT_BINS = math.ceil(math.log(600_000 / LAT_MIN_MS) / math.log(LAT_RATIO)) + 1
_LOG_RATIO = math.log(LAT_RATIO)
# Upper edge of each bin; the last bin also holds everything slower.
LAT_EDGES = LAT_MIN_MS * LAT_RATIO ** np.arange(1, LAT_BINS + 1)
MAX_UNITS = 1_000_000  # per variant; beyond this new units are not counted for the SRM check


def is_error(status: int) -> bool:
    """A variant's failure: 5xx, or no response at all (status 0: reset, timeout, no upstream)."""
    return status >= 500 or status == 0


def bin_of(latency_ms: float) -> int:
    if latency_ms <= LAT_MIN_MS:
        return 0
    return min(LAT_BINS - 1, int(math.log(latency_ms / LAT_MIN_MS) / _LOG_RATIO))


def bins_of(latency_ms: np.ndarray) -> np.ndarray:
    """`bin_of` for an array (vectorised simulations use the controller's exact binning)."""
    lat = np.maximum(np.asarray(latency_ms, dtype=float), LAT_MIN_MS)
    return np.minimum(LAT_BINS - 1, (np.log(lat / LAT_MIN_MS) / _LOG_RATIO).astype(np.int64))


def quantile(hist: np.ndarray, q: float) -> float | None:
    """The ``q`` quantile in ms (upper edge of the bin holding it); None for an empty histogram."""
    total = int(hist.sum())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    return float(LAT_EDGES[int(np.searchsorted(np.cumsum(hist), rank))])


def count_above(hist: np.ndarray, threshold_ms: float) -> int:
    """Requests in bins whose lower edge is at or above ``threshold_ms`` (the latency test's "slow")."""
    first = int(np.searchsorted(LAT_EDGES, threshold_ms, side="left")) + 1
    return int(hist[first:].sum()) if first < LAT_BINS else 0


@dataclass(frozen=True, slots=True)
class Summary:
    n: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.n if self.n else 0.0

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "requests": self.n,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
        }


def summarize(n: int, errors: int, hist: np.ndarray) -> Summary:
    return Summary(n, errors, quantile(hist, 0.50), quantile(hist, 0.95), quantile(hist, 0.99))


@dataclass(slots=True)
class Counts:
    """A mergeable block of outcomes."""

    n: int
    errors: int
    hist: np.ndarray

    @classmethod
    def empty(cls) -> Counts:
        return cls(0, 0, np.zeros(LAT_BINS, dtype=np.int64))

    def add(self, status: int, latency_ms: float) -> None:
        self.n += 1
        self.errors += is_error(status)
        self.hist[bin_of(latency_ms)] += 1

    def merge(self, other: Counts) -> None:
        self.n += other.n
        self.errors += other.errors
        self.hist += other.hist

    def summary(self) -> Summary:
        return summarize(self.n, self.errors, self.hist)


class VariantWindow:
    """Outcomes of one variant: batch since the last tick, totals on this step, a sliding window."""

    __slots__ = ("_buckets", "batch", "span_s", "step", "units")

    def __init__(self, span_s: float = 60.0) -> None:
        self.span_s = span_s
        self.batch = Counts.empty()
        self.step = Counts.empty()
        self._buckets: deque[tuple[int, Counts]] = deque()  # (second, counts), oldest first
        self.units: set[str] = set()

    def add(self, status: int, latency_ms: float, unit: str, now: float) -> None:
        self.batch.add(status, latency_ms)
        self.step.add(status, latency_ms)
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, Counts.empty()))
        self._buckets[-1][1].add(status, latency_ms)
        if unit and len(self.units) < MAX_UNITS:
            self.units.add(unit)

    def drain(self) -> Counts:
        """The batch since the last call (and start a new one)."""
        out, self.batch = self.batch, Counts.empty()
        return out

    def sliding(self, now: float) -> Counts:
        """Everything within the last ``span_s`` seconds."""
        horizon = int(now - self.span_s)
        while self._buckets and self._buckets[0][0] <= horizon:
            self._buckets.popleft()
        total = Counts.empty()
        for _, counts in self._buckets:
            total.merge(counts)
        return total

    def new_step(self) -> None:
        self.step = Counts.empty()

    def forget(self) -> None:
        """Drop every view (a variant that was rolled back or restarted)."""
        self.batch = Counts.empty()
        self.step = Counts.empty()
        self._buckets.clear()
        self.units.clear()


class RouteWindows:
    """The windows of every variant of one route, plus when SRM counting (re)started."""

    __slots__ = ("span_s", "srm_since", "variants")

    def __init__(self, names: Iterable[str], span_s: float = 60.0) -> None:
        self.span_s = span_s
        self.variants = {n: VariantWindow(span_s) for n in names}
        self.srm_since = 0.0

    def add(self, variant: str, status: int, latency_ms: float, unit: str, now: float) -> bool:
        """Record one outcome; False when the variant is unknown to the policy (ignored)."""
        w = self.variants.get(variant)
        if w is None:
            return False
        w.add(status, latency_ms, unit if now >= self.srm_since else "", now)
        return True

    def reset_srm(self, start_at: float) -> None:
        """Weights changed: count units afresh from ``start_at`` (after gateways applied them)."""
        self.srm_since = start_at
        for w in self.variants.values():
            w.units.clear()

    def unit_counts(self) -> dict[str, int]:
        return {n: len(w.units) for n, w in self.variants.items()}
