"""Per route, per variant windows of request outcomes (pure: the caller passes the clock).

Each variant keeps three views of the same events, because the controller asks three questions:

* the **batch** since the last tick feeds the sequential tests (one likelihood ratio per interval);
* the **step** totals since the variant's current rollout step began decide whether a step has
  enough samples to be promoted;
* a **sliding window** of one-second buckets (60 s by default) answers `status` and the audit's
  evidence (error rate, p50/p99): at an integer tick ``now`` it holds the seconds
  ``[now - 60, now)``, exactly 60 of them.

Beside them a `UnitTally` keeps, per hashed unit, its totals since the variant's tests began
(requests, errors, slow requests, requests over the p99 limit): the design effect that makes the
sequential tests valid when users differ is computed from it (`cohortgate.core.stats.design_effect`).

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

from cohortgate.core.stats import design_effect

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


def first_bin_above(threshold_ms: float, straddling: bool = False) -> int:
    """The first bin counted as "above ``threshold_ms``": its lower edge is at or above it, or
    (``straddling``) its upper edge is above it -- the bin holding the threshold counts too."""
    if straddling:
        return int(np.searchsorted(LAT_EDGES, threshold_ms, side="right"))
    return int(np.searchsorted(LAT_EDGES, threshold_ms, side="left")) + 1


def count_above(hist: np.ndarray, threshold_ms: float, straddling: bool = False) -> int:
    """Requests in bins whose lower edge is at or above ``threshold_ms`` (the latency test's "slow").

    ``straddling`` also counts the bin that holds the threshold: the generous count, for a test
    that must show a rate is *below* a limit.
    """
    first = first_bin_above(threshold_ms, straddling)
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

    def remove(self, other: Counts) -> None:
        self.n -= other.n
        self.errors -= other.errors
        self.hist -= other.hist

    def summary(self) -> Summary:
        return summarize(self.n, self.errors, self.hist)


# The per-unit metrics a `UnitTally` keeps, in column order.
ERRORS, SLOW, OVER = 0, 1, 2


class UnitTally:
    """Per-unit totals (requests; errors, slow, over-limit requests) since the tests began.

    Units are the processor's keyed hashes (or any hashable id); an outcome without one, and every
    unit beyond ``MAX_UNITS``, counts as a unit of its own (the independent-request case).
    """

    __slots__ = ("_int_keys", "_int_slots", "bad", "index", "n", "single_bad", "singles", "size")

    def __init__(self) -> None:
        self.index: dict[object, int] = {}  # unit -> slot (string units: the hashes Envoy logs)
        self._int_keys = np.zeros(0, np.int64)  # integer units (simulations), sorted, and their slots
        self._int_slots = np.zeros(0, np.int64)
        self.size = 0
        self.n = np.zeros(64, dtype=np.int64)
        self.bad = np.zeros((3, 64), dtype=np.int64)
        self.singles = 0
        self.single_bad = np.zeros(3, dtype=np.int64)

    def _slots(self, units: Iterable[object] | np.ndarray) -> np.ndarray:
        """Each outcome's slot (new units get the next ones); -1: no unit, or past ``MAX_UNITS``."""
        if isinstance(units, np.ndarray) and units.dtype.kind in "iu":
            keys = units.astype(np.int64)
            new = np.setdiff1d(keys, self._int_keys)[: max(0, MAX_UNITS - self.size)]
            if new.size:
                all_keys = np.concatenate([self._int_keys, new])
                all_slots = np.concatenate([self._int_slots, self.size + np.arange(new.size)])
                order = np.argsort(all_keys, kind="stable")
                self._int_keys, self._int_slots = all_keys[order], all_slots[order]
                self.size += new.size
            if not self._int_keys.size:
                return np.full(keys.size, -1, np.int64)
            pos = np.minimum(np.searchsorted(self._int_keys, keys), self._int_keys.size - 1)
            return np.where(self._int_keys[pos] == keys, self._int_slots[pos], -1)
        idx = self.index
        full = self.size >= MAX_UNITS
        slots = np.fromiter(
            (-1 if (not u and u != 0) or (full and u not in idx) else idx.setdefault(u, len(idx)) for u in units),
            dtype=np.int64,
        )
        self.size = len(idx)
        return slots

    def add_many(self, units: Iterable[object] | np.ndarray, bad: np.ndarray) -> None:
        """Add outcomes of ``units`` (one per outcome); ``bad`` is (3, n) booleans: errors, slow, over."""
        slots = self._slots(units)
        known = slots >= 0
        if not known.all():
            self.singles += int((~known).sum())
            self.single_bad += bad[:, ~known].sum(axis=1)
            slots, bad = slots[known], bad[:, known]
        size = self.size
        if size > self.n.size:
            grow = max(size, 2 * self.n.size)
            self.n = np.concatenate([self.n, np.zeros(grow - self.n.size, np.int64)])
            self.bad = np.concatenate([self.bad, np.zeros((3, grow - self.bad.shape[1]), np.int64)], axis=1)
        self.n[:size] += np.bincount(slots, minlength=size)
        for m in range(3):
            self.bad[m, :size] += np.bincount(slots, weights=bad[m], minlength=size).astype(np.int64)

    def design_effect(self, metric: int) -> float:
        """Kish's design effect of this variant's rate of ``metric`` (see `stats.design_effect`)."""
        k = self.size
        return float(design_effect(self.n[:k], self.bad[metric, :k], self.singles, self.single_bad[metric]))

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]


class Sliding:
    """One-second buckets of `Counts` over the last ``span_s`` seconds, and their running sum."""

    __slots__ = ("_buckets", "_sum", "span_s")

    def __init__(self, span_s: float = 60.0) -> None:
        self.span_s = span_s
        self._buckets: deque[tuple[int, Counts]] = deque()  # (second, counts), oldest first
        self._sum = Counts.empty()

    def add(self, second: int, block: Counts) -> None:
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, Counts.empty()))
        self._buckets[-1][1].merge(block)
        self._sum.merge(block)

    def counts(self, now: float) -> Counts:
        """The buckets wholly inside ``[now - span_s, now)``, plus the current one (a copy)."""
        while self._buckets and self._buckets[0][0] + 1 <= now - self.span_s:
            self._sum.remove(self._buckets.popleft()[1])
        s = self._sum
        return Counts(s.n, s.errors, s.hist.copy())


class VariantWindow:
    """Outcomes of one variant: batch since the last tick, totals on this step, a sliding window.

    ``backends`` holds a sliding window per backend (the index N of its ``cg.ROUTE.VARIANT.N``
    cluster), so the evidence can tell a slow backend from a slow model (issue 17.8).
    """

    __slots__ = ("_sliding", "backends", "batch", "span_s", "step", "tally", "units")

    def __init__(self, span_s: float = 60.0) -> None:
        self.span_s = span_s
        self.batch = Counts.empty()
        self.step = Counts.empty()
        self._sliding = Sliding(span_s)
        self.backends: dict[int, Sliding] = {}
        self.units: set[object] = set()
        self.tally = UnitTally()

    def add(self, status: int, latency_ms: float, unit: str, now: float) -> None:
        """One outcome (a test convenience: the controller adds blocks with `add_many`)."""
        self.add_many(np.array([status]), np.array([latency_ms], dtype=float), [unit], now, np.array([bool(unit)]))

    def add_many(
        self,
        status: np.ndarray,
        latency_ms: np.ndarray,
        units: list[object] | np.ndarray,
        now: float,
        srm: np.ndarray,
        slow_bin: int = LAT_BINS,
        over_bin: int = LAT_BINS,
        backend: np.ndarray | None = None,
    ) -> None:
        """A block of outcomes seen at ``now``; ``srm`` marks those whose unit the SRM check counts.

        ``slow_bin`` / ``over_bin``: the first latency bin that is "slow" (the latency test's
        threshold) / over the p99 limit, for the per-unit tally. ``backend``: each outcome's
        backend index (-1: unknown, not counted per backend).
        """
        if not len(status):
            return
        bins = bins_of(latency_ms)
        err = (status >= 500) | (status == 0)
        block = Counts(len(status), int(err.sum()), np.bincount(bins, minlength=LAT_BINS).astype(np.int64))
        self.batch.merge(block)
        self.step.merge(block)
        second = int(now)
        self._sliding.add(second, block)
        if backend is not None:
            self._add_backends(second, block, bins, err, np.asarray(backend, dtype=np.int64))
        if len(self.units) < MAX_UNITS:
            if isinstance(units, np.ndarray):
                self.units.update(np.unique(units[srm]).tolist())
            else:
                self.units.update(u for u, ok in zip(units, srm.tolist(), strict=True) if ok and (u or u == 0))
        self.tally.add_many(units, np.stack([err, bins >= slow_bin, bins >= over_bin]))

    def _add_backends(self, second: int, block: Counts, bins: np.ndarray, err: np.ndarray, backend: np.ndarray) -> None:
        known = backend >= 0
        if not known.any():
            return
        first = int(backend[0])
        if known.all() and (backend == first).all():  # the usual case: one backend, the whole block
            self.backends.setdefault(first, Sliding(self.span_s)).add(second, block)
            return
        for b in np.unique(backend[known]).tolist():
            sel = backend == b
            part = Counts(
                int(sel.sum()), int(err[sel].sum()), np.bincount(bins[sel], minlength=LAT_BINS).astype(np.int64)
            )
            self.backends.setdefault(int(b), Sliding(self.span_s)).add(second, part)

    def drain(self) -> Counts:
        """The batch since the last call (and start a new one)."""
        out, self.batch = self.batch, Counts.empty()
        return out

    def sliding(self, now: float) -> Counts:
        """The one-second buckets wholly inside ``[now - span_s, now)``, plus the current one (a copy)."""
        return self._sliding.counts(now)

    def backend_summaries(self, now: float) -> dict[int, Summary]:
        """Each backend's sliding window (those with requests in it), by backend index."""
        out = {}
        for index in sorted(self.backends):
            counts = self.backends[index].counts(now)
            if counts.n:
                out[index] = counts.summary()
            else:
                del self.backends[index]  # nothing left in its window: forget it
        return out

    def new_step(self) -> None:
        self.step = Counts.empty()

    def forget(self) -> None:
        """Drop every view (a variant that was rolled back or restarted)."""
        self.batch = Counts.empty()
        self.step = Counts.empty()
        self._sliding = Sliding(self.span_s)
        self.backends.clear()
        self.units.clear()
        self.tally.clear()


class RouteWindows:
    """The windows of every variant of one route, plus when SRM counting (re)started.

    ``slow_bin`` and ``over_bin`` (set by the controller) say which latency bins the per-unit tally
    counts as slow (the latency test's current threshold) and as over the p99 limit.
    """

    __slots__ = ("index", "names", "over_bin", "slow_bin", "span_s", "srm_p", "srm_since", "variants")

    def __init__(self, names: Iterable[str], span_s: float = 60.0, p99_limit_ms: float | None = None) -> None:
        self.span_s = span_s
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.variants = {n: VariantWindow(span_s) for n in self.names}
        self.srm_since = 0.0
        self.srm_p = 1.0  # running minimum of the SRM's always-valid p-value since counting restarted
        self.slow_bin = LAT_BINS
        self.over_bin = LAT_BINS if p99_limit_ms is None else first_bin_above(p99_limit_ms)

    def add(self, variant: str, status: int, latency_ms: float, unit: str, now: float) -> bool:
        """Record one outcome; False when the variant is unknown to the policy (ignored)."""
        if variant not in self.index:
            return False
        idx = np.array([self.index[variant]])
        self.add_many(idx, np.array([status]), np.array([latency_ms], dtype=float), [unit], now)
        return True

    def add_many(
        self,
        variant: np.ndarray,
        status: np.ndarray,
        latency_ms: np.ndarray,
        units: list[object] | np.ndarray,
        now: float,
        srm: np.ndarray | None = None,
        backend: np.ndarray | None = None,
    ) -> int:
        """Record a block of outcomes (``variant``: index into ``names``); returns how many were unknown.

        ``srm`` (default: all) marks outcomes whose unit may count for the sample-ratio check; none
        count before ``srm_since``. ``backend`` (default: unknown) is each outcome's backend index.
        This is the one way outcomes enter the windows: the controller's event path and the
        vectorised simulations both come through here.
        """
        variant = np.asarray(variant, dtype=np.int64)
        status = np.asarray(status, dtype=np.int64)
        latency_ms = np.asarray(latency_ms, dtype=float)
        srm = np.ones(len(variant), bool) if srm is None else np.asarray(srm, dtype=bool)
        backend = None if backend is None else np.asarray(backend, dtype=np.int64)
        if now < self.srm_since:
            srm = np.zeros(len(variant), bool)
        known = (variant >= 0) & (variant < len(self.names))
        for i, name in enumerate(self.names):
            sel = np.flatnonzero(variant == i)
            if sel.size:
                self.variants[name].add_many(
                    status[sel],
                    latency_ms[sel],
                    units[sel] if isinstance(units, np.ndarray) else [units[j] for j in sel.tolist()],
                    now,
                    srm[sel],
                    self.slow_bin,
                    self.over_bin,
                    None if backend is None else backend[sel],
                )
        return int((~known).sum())

    def set_slow_threshold(self, threshold_ms: float | None) -> None:
        self.slow_bin = LAT_BINS if threshold_ms is None else first_bin_above(threshold_ms)

    def reset_srm(self, start_at: float) -> None:
        """Weights changed: count units afresh from ``start_at`` (after gateways applied them)."""
        self.srm_since = start_at
        self.srm_p = 1.0
        for w in self.variants.values():
            w.units.clear()

    def unit_counts(self) -> dict[str, int]:
        return {n: len(w.units) for n, w in self.variants.items()}


def parse_segments(label: str, declared: dict[str, frozenset[str]]) -> list[tuple[str, str]]:
    """``name=value;...`` (the processor's ``x-cohortgate-segment``) -> (name, value) per declared
    segment, a value the policy does not declare read as ``other`` (a stale gateway, an older policy)."""
    got = dict(part.partition("=")[::2] for part in label.split(";") if part) if label else {}
    return [(name, v if (v := got.get(name, "other")) in values else "other") for name, values in declared.items()]


class SegmentWindows:
    """Per segment value x variant outcomes: the batch since the last tick, and totals since the start.

    Keys are ``(segment, value)``; values are the declared ones plus ``other``, so the table is
    bounded by the policy whatever the access log says.
    """

    __slots__ = ("batch", "declared", "names", "totals")

    def __init__(self, names: Iterable[str], declared: dict[str, frozenset[str]]) -> None:
        self.names = list(names)
        self.declared = declared
        keys = [(s, v) for s, values in declared.items() for v in (*sorted(values), "other")]
        self.batch = {k: {n: Counts.empty() for n in self.names} for k in keys}
        self.totals = {k: {n: Counts.empty() for n in self.names} for k in keys}

    def add(self, variant: str, label: str, status: int, latency_ms: float) -> None:
        if variant not in self.names:
            return
        for key in parse_segments(label, self.declared):
            self.batch[key][variant].add(status, latency_ms)
            self.totals[key][variant].add(status, latency_ms)

    def drain(self) -> dict[tuple[str, str], dict[str, Counts]]:
        """The batches since the last call (and start new ones)."""
        out = self.batch
        self.batch = {k: {n: Counts.empty() for n in self.names} for k in out}
        return out

    def forget(self, variant: str) -> None:
        """A restarted variant starts its totals afresh."""
        for per in (self.batch, self.totals):
            for counts in per.values():
                counts[variant] = Counts.empty()
