"""The outcome ledger: outcomes attributed to the variant that served, tallied per unit, read as lift.

Three things come in, each a plain dict (one JSON line of the journal, one item of a batch):

* ``{"kind": "exposure", "route", "variant", "unit", "t", "request_id"?, "eid"?, "segment"?}`` -- a
  response was served (the exposure token proves it too, so this feed is optional for token
  outcomes but needed for imports by request id and for units that never report anything: a unit
  exposed without converting is a zero, not a missing row). The controller feeds one per answered
  request of a route with metrics through `OutcomeLedger.expose`: the token Envoy's access log
  carries, verified like an outcome's (a forged one, or one naming another route, variant or unit
  than the entry, is counted and dropped); journaled with ``"source": "access_log"`` and counted
  apart (``exposure_counts``), so the outcome counts stay the clients' own;
* ``{"kind": "outcome", "metric", "value", "exposure": TOKEN | "request_id": ID, "t"?}`` -- a
  client's outcome (token) or a late label / warehouse row (request id);
* ``{"kind": "covariate", "route", "unit", "name", "value"}`` -- a unit's pre-exposure value
  (CUPED).

Rules: a token is verified (`cohortgate.core.exposure`: forged, altered or stale ones are refused
and counted by reason) at the outcome's time ``t`` with the attribution window as its maximum age;
an outcome counts once per exposure and metric (a retry, a re-import or the same label arriving
by token and by request id are duplicates); it is attributed to the variant in the token (or in
the exposure the request id names). Units exposed to more than one variant of a route (moved by a
ramp) are left out of the comparison and counted.

Memory: what the ledger keeps per exposure -- its dedup key, the request id's map entry, each
outcome's dedup key -- is filed in time buckets (`DEFAULT_BUCKET_S` wide) by the exposure's time
and dropped once the whole bucket is older than the *horizon*: the latest data time the ledger has
seen (an exposure's or outcome's ``t``, never the wall clock, so a replay evicts at the same points)
less the attribution window and the tokens' clock skew. An exposure or outcome whose exposure is
older than the horizon is refused as ``expired`` -- an outcome for it would be refused anyway by
the window (the skew's grace makes that exact for outcomes judged at the clock) -- so the dedup is
exact for everything accepted. Memory is bounded by rate x (window + skew + one bucket); per-unit
tallies (`_Arm`), covariates and segments stay, bounded by units. A request id older than the
horizon reads as ``unknown_request``.

Journal of the access-log feed: one line per exposure would be ~200 bytes a request (17 GB a day at
1 000 req/s), so the ledger journals a unit's FIRST exposure per route and variant only (all a
binary or mean metric's denominator needs: the unit is in the arm; it carries the request id and
segment of that first one); on a route with a ``ratio`` metric, whose denominator is the unit's
exposure count, the later ones become one ``{"kind": "exposures", "n": COUNT, ...}`` line per unit
per interval (`flush_exposure_counts`). A restart replays to the same tallies, lift and verdicts.
An outcome joined by request id to a later (unjournaled) exposure is journaled as the join itself
(the exposure's route, variant, unit, eid and time instead of the request id), so a replay counts
it the same; the import line it came from then reads ``unknown_request`` in the replay's counts.
What a restart does not restore: the request-id map and dedup keys of a unit's later exposures
(an import by such a request id after a restart reads ``unknown_request``; a redelivered
access-log entry of one counts again, which only a ratio metric sees). The journal is not trimmed: its outcome and
first-exposure lines carry tallies that outlive the window (an experiment runs longer than the
attribution window), so dropping them would change the lift after a restart; its exposure lines
are bounded by units, not requests.

Persistence: every record the ledger accepts from a live source (``POST /outcomes``) is kept in
``unjournaled`` with the time it was judged at, and the controller appends it to a journal each
interval: `FileJournal` (JSON lines; ``cohortgate outcomes import`` appends there too) or
`RedisJournal` (the stream `OUTCOMES_STREAM`, where server-side producers ``XADD`` the same
records). On start the journal is replayed (``ingest(..., journal=False)``) and then tailed, so the
ledger survives a restart and sees what others append.

`OutcomeLedger.results` computes, per route, metric and challenger, the lift and verdict through
`cohortgate.core.lift` on per-unit totals; each call is a look, and the always-valid bounds it
reports are the running intersection over looks. The journal (`append_journal`, `read_journal`)
is an append-only JSON-lines file: the ledger's persistence, and how ``cohortgate outcomes import``
hands rows to a controller (replaying it is idempotent: duplicates count once).
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cohortgate.controller.labels import LABEL_METRIC, LabelBook
from cohortgate.core import lift as L
from cohortgate.core.contract import EXPOSURE_KEY_ENV, OUTCOMES_STREAM
from cohortgate.core.exposure import DEFAULT_SKEW_S, Exposure, ExposureRefused, exposure_id, parse_keys, verify

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 7 * 24 * 3600.0  # attribution window: an outcome this long after the response still counts
DEFAULT_BUCKET_S = 60.0  # per-exposure memory is dropped a bucket at a time (see the module docstring)
EXPOSURE_COUNTS = "exposures"  # the kind of a unit's later-exposure count line (ratio metrics' denominators)
# what a time bucket holds: an exposure's dedup key, a request id, an outcome's dedup key
_SEEN, _REQUEST, _OUTCOME = 0, 1, 2

# Status codes `OutcomeLedger.ingest` returns (and counts): stable, for metrics and the CLI.
ACCEPTED = "accepted"
DUPLICATE = "duplicate"
UNKNOWN_METRIC = "unknown_metric"
UNKNOWN_REQUEST = "unknown_request"
BAD_RECORD = "bad_record"
EXPIRED = "expired"
# ... and the access-log feed's (`OutcomeLedger.expose`), besides accepted, duplicate and the token refusals
MISMATCH = "mismatch"  # the token names another route, variant or unit than the access-log entry
UNMEASURED = "unmeasured"  # the route declares no metric (the parser should not have kept the token)
FROM_ACCESS_LOG = "access_log"  # an exposure record's ``source`` when the access log fed it


def keys_from_env(environ: Mapping[str, str] = os.environ) -> tuple[bytes, ...] | None:
    """The exposure MAC keys from ``$COHORTGATE_EXPOSURE_KEY``, or None when it is unset."""
    text = environ.get(EXPOSURE_KEY_ENV, "")
    return parse_keys(text) if text.strip() else None


@dataclass(slots=True)
class _Arm:
    """One variant's per-unit tallies on one route (grown in place; arrays built when read)."""

    index: dict[str, int] = field(default_factory=dict)
    exposures: list[float] = field(default_factory=list)
    sums: dict[str, list[float]] = field(default_factory=dict)

    def slot(self, unit: str) -> int:
        i = self.index.get(unit)
        if i is None:
            i = self.index[unit] = len(self.exposures)
            self.exposures.append(0.0)
            for s in self.sums.values():
                s.append(0.0)
        return i

    def add(self, unit: str, metric: str, value: float) -> None:
        i = self.slot(unit)
        sums = self.sums.get(metric)
        if sums is None:
            sums = self.sums[metric] = [0.0] * len(self.exposures)
        sums[i] += value


@dataclass(frozen=True, slots=True)
class MetricResult:
    """One metric, one challenger against control, at one look."""

    route: str
    metric: str
    role: str
    challenger: str
    control: str
    units_challenger: int
    units_control: int
    control_value: float
    challenger_value: float
    abs: float
    rel: float
    ci_rel: tuple[float, float]  # fixed horizon, for reference only
    cs_rel: tuple[float, float]  # always valid: this look
    bounds: L.Bounds  # always valid: running intersection over looks (what decides)
    p_always: float
    alpha: float
    cuped: bool
    crossed_units: int  # exposed to both arms: left out
    decision: L.Decision

    def to_json(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return None if not math.isfinite(v) else round(float(v), 8)

        return {
            "route": self.route,
            "metric": self.metric,
            "role": self.role,
            "challenger": self.challenger,
            "control": self.control,
            "units": {"challenger": self.units_challenger, "control": self.units_control},
            "value": {"challenger": num(self.challenger_value), "control": num(self.control_value)},
            "lift": {"absolute": num(self.abs), "relative": num(self.rel)},
            "interval_fixed_horizon": [num(v) for v in self.ci_rel],
            "interval_always_valid": [num(self.bounds.rel_lo), num(self.bounds.rel_hi)],
            "interval_absolute_always_valid": [num(self.bounds.abs_lo), num(self.bounds.abs_hi)],
            "p_always_valid": num(self.p_always),
            "alpha": self.alpha,
            "cuped": self.cuped,
            "crossed_units": self.crossed_units,
            "verdict": self.decision.verdict.value,
            "reason": self.decision.reason,
            "non_inferior": self.decision.non_inferior,
        }


class OutcomeLedger:
    """Outcomes in, per-unit tallies per route/variant/metric, lift and verdicts out.

    ``metrics``: route -> declared metrics (until the policy declares them); ``controls``: route ->
    its control variant. ``keys``: exposure MAC keys; None refuses every token (imports by request
    id still work). Not thread-safe: the controller feeds it from its loop.
    """

    def __init__(
        self,
        metrics: Mapping[str, Sequence[L.MetricSpec]],
        controls: Mapping[str, str],
        keys: Sequence[bytes] | None,
        window_s: float = DEFAULT_WINDOW_S,
        alpha: float = 0.05,
        clock: Callable[[], float] = time.time,
        bucket_s: float = DEFAULT_BUCKET_S,
    ) -> None:
        self.metrics = {route: {m.name: m for m in specs} for route, specs in metrics.items()}
        self.controls = dict(controls)
        self.keys = tuple(keys or ())
        self.window_s = window_s
        self.alpha = alpha
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.exposure_counts: Counter[str] = Counter()  # the access-log feed's statuses (`expose`)
        self._arms: dict[str, dict[str, _Arm]] = {}
        self._seen_exposures: set[tuple[str, str, str, str]] = set()
        self._seen_outcomes: set[tuple[tuple[str, str, str, str], str]] = set()
        # request id -> exposure, its time, whether the journal has the exposure (else a join is journaled)
        self._requests: dict[str, tuple[Exposure, float, bool]] = {}
        self._resolved: dict[str, Any] | None = None  # the journal's copy of an outcome joined by request id
        self._covariates: dict[tuple[str, str], dict[str, float]] = {}  # (route, name) -> unit -> value
        self._bounds: dict[tuple[str, str, str], L.Bounds] = {}
        self.segments: dict[str, dict[str, str]] = {}  # route -> unit -> its first allocation segment (bandits)
        self.labels = LabelBook()  # served predictions joined with late labels (labels.py)
        self.unjournaled: list[dict[str, Any]] = []  # accepted live records the journal has not yet got
        self.bucket_s = bucket_s
        self.watermark = -math.inf  # the latest data time seen (exposures' and outcomes' t)
        self.horizon = -math.inf  # exposures before it are forgotten and refused; never moves back
        self._buckets: dict[int, list[tuple[int, Any]]] = {}  # bucket -> per-exposure entries filed there
        self._bucket_order: list[int] = []  # a heap of the buckets' numbers
        self._counts_due: dict[tuple[str, str, str], list[float]] = {}  # route, variant, unit -> [n, latest t]

    # ------------------------------------------------------------------ in

    def ingest(self, record: Mapping[str, Any], journal: bool = True) -> str:
        """Take one record (see the module docstring); return its status code (also counted).

        An outcome without ``t`` is judged at the ledger's clock, and that time is written into the
        record kept for the journal, so a replay judges it at the same time. ``journal=False``: the
        record comes from the journal (a replay, or what another process appended): not kept again.
        """
        kind = record.get("kind", "outcome")
        if kind == "outcome" and record.get("t") is None:
            record = {**record, "t": self.clock()}
        try:
            if kind == "exposure":
                status = self._expose(record)
            elif kind == EXPOSURE_COUNTS:
                status = self._exposure_count(record)
            elif kind == "outcome":
                status = self._outcome(record)
            elif kind == "covariate":
                status = self._covariate(record)
            elif kind == "restart":
                status = self._restart(record)
            elif kind == "prediction":
                status = self.labels.predict(record)
            else:
                status = BAD_RECORD
        except (KeyError, TypeError, ValueError):
            status = BAD_RECORD
        feed = kind in ("exposure", EXPOSURE_COUNTS) and record.get("source") == FROM_ACCESS_LOG
        n = int(record["n"]) if kind == EXPOSURE_COUNTS and status == ACCEPTED else 1  # each exposure it counts
        (self.exposure_counts if feed else self.counts)[status] += n
        resolved, self._resolved = self._resolved, None
        if status == ACCEPTED and resolved is not None:  # the join itself: a replay lacks that exposure
            self.unjournaled.append(resolved)
        elif journal and status == ACCEPTED:
            self.unjournaled.append(dict(record))
        return status

    def ingest_many(self, records: Iterable[Mapping[str, Any]], journal: bool = True) -> Counter[str]:
        """A batch: how many records got each status."""
        return Counter(self.ingest(r, journal) for r in records)

    def expose(self, token: str, route: str, variant: str, unit: str, request_id: str, now: float) -> str:
        """One answered request from Envoy's access log: its unit counts as exposed (a zero until it
        reports). ``route``, ``variant`` (Envoy's upstream cluster) and ``unit`` are the entry's; the
        token must be genuine, fresh and name the same three, else it is counted and dropped: it came
        from request headers the processor set, but nothing unverified reaches a denominator."""
        if route not in self.metrics:
            status = UNMEASURED
        else:
            try:
                exp = verify(token, self.keys, now, self.window_s)
            except ExposureRefused as exc:
                status = exc.code
            else:
                if (exp.route, exp.variant, exp.unit) != (route, variant, unit):
                    status = MISMATCH
                else:
                    record: dict[str, Any] = {"kind": "exposure", "source": FROM_ACCESS_LOG, "route": route}
                    record.update(variant=variant, unit=unit, t=float(exp.issued_at), eid=exp.eid)
                    if request_id:
                        record["request_id"] = request_id  # labels and imports by request id meet it
                    if exp.segment:
                        record["segment"] = exp.segment
                    arm = self._arms.get(route, {}).get(variant)
                    first = arm is None or unit not in arm.index
                    status = self._expose(record)
                    if status == ACCEPTED and not first and request_id:
                        self._requests[request_id] = (*self._requests[request_id][:2], False)  # not journaled
                    if status == ACCEPTED and first:
                        self.unjournaled.append(record)  # a replay counts it in exposure_counts too (`ingest`)
                    elif status == ACCEPTED and any(m.kind == "ratio" for m in self.metrics[route].values()):
                        due = self._counts_due.setdefault((route, variant, unit), [0.0, record["t"]])
                        due[0] += 1
                        due[1] = max(due[1], record["t"])
        self.exposure_counts[status] += 1
        return status

    def flush_exposure_counts(self) -> int:
        """Move the later exposures counted since the last call into ``unjournaled``: one
        ``exposures`` line per unit (ratio routes only, see the module docstring); how many lines."""
        for (route, variant, unit), (n, t) in self._counts_due.items():
            record: dict[str, Any] = {
                "kind": EXPOSURE_COUNTS,
                "source": FROM_ACCESS_LOG,
                "route": route,
                "variant": variant,
            }
            record.update(unit=unit, n=int(n), t=t)
            self.unjournaled.append(record)
        lines = len(self._counts_due)
        self._counts_due.clear()
        return lines

    def per_exposure_entries(self) -> int:
        """How many per-exposure entries the ledger holds (dedup keys, request ids): what the horizon bounds."""
        return len(self._seen_exposures) + len(self._requests) + len(self._seen_outcomes)

    def _advance(self, t: float) -> None:
        """Data time ``t`` was seen: move the horizon on and forget the buckets wholly before it."""
        if not t > self.watermark:
            return
        self.watermark = t
        horizon = t - self.window_s - DEFAULT_SKEW_S
        if not horizon > self.horizon:
            return
        self.horizon = horizon
        order = self._bucket_order
        while order and (order[0] + 1) * self.bucket_s <= horizon:
            for what, key in self._buckets.pop(heapq.heappop(order)):
                if what == _SEEN:
                    self._seen_exposures.discard(key)
                elif what == _OUTCOME:
                    self._seen_outcomes.discard(key)
                else:
                    found = self._requests.get(key)
                    if found is not None and found[0].issued_at < horizon:  # not re-served since
                        del self._requests[key]

    def _file(self, what: int, key: Any, at: int) -> None:
        """Keep a per-exposure entry until the horizon passes its exposure time ``at``."""
        b = math.floor(at / self.bucket_s)
        entries = self._buckets.get(b)
        if entries is None:
            entries = self._buckets[b] = []
            heapq.heappush(self._bucket_order, b)
        entries.append((what, key))

    def _arm(self, route: str, variant: str) -> _Arm:
        arms = self._arms.get(route)
        if arms is None:
            arms = self._arms[route] = {}
        arm = arms.get(variant)
        if arm is None:
            arm = arms[variant] = _Arm()
        return arm

    def _register(self, exp: Exposure) -> None:
        if exp.segment:  # signed (the token) or the gateway's own record: a client cannot move it
            self.segments.setdefault(exp.route, {}).setdefault(exp.unit, exp.segment)
        if exp.key not in self._seen_exposures:
            self._seen_exposures.add(exp.key)
            self._file(_SEEN, exp.key, exp.issued_at)
            arm = self._arm(exp.route, exp.variant)
            arm.exposures[arm.slot(exp.unit)] += 1.0

    def _expose(self, r: Mapping[str, Any]) -> str:
        rid = r.get("request_id")
        t = float(r["t"])
        if not math.isfinite(t):
            return BAD_RECORD
        # the token's own eid when the access log fed it; else the request id's (what the gateway mints)
        eid = str(r.get("eid") or (exposure_id(str(rid)) if rid else f"t{t!r}"))
        exp = Exposure(str(r["route"]), str(r["variant"]), str(r["unit"]), int(t), eid, str(r.get("segment") or ""))
        self._advance(t)
        if exp.issued_at < self.horizon:  # its dedup key may be forgotten: an outcome for it is refused anyway
            return EXPIRED
        if rid:
            prev = self._requests.get(str(rid))
            self._requests[str(rid)] = (exp, t, prev[2] if prev is not None and prev[0].key == exp.key else True)
            self._file(_REQUEST, str(rid), exp.issued_at)
        if exp.key in self._seen_exposures:
            return DUPLICATE
        self._register(exp)
        return ACCEPTED

    def _outcome(self, r: Mapping[str, Any]) -> str:
        metric = str(r["metric"])
        value = float(r["value"])
        if not math.isfinite(value):
            return BAD_RECORD
        t = float(r["t"]) if r.get("t") is not None else self.clock()
        if metric == LABEL_METRIC:  # a label for a served prediction: model accuracy (labels.py)
            return self.labels.label(r, t, self.keys, self.window_s)
        token = r.get("exposure")
        joined = False  # a journaled join: its exposure is counted by the count lines, not again here
        if token:
            try:
                exp = verify(str(token), self.keys, t, self.window_s)
            except ExposureRefused as exc:
                return exc.code
        elif r.get("request_id"):
            found = self._requests.get(str(r["request_id"]))
            if found is None:
                return UNKNOWN_REQUEST
            exp, served_at, journaled = found
            if t - served_at > self.window_s:
                return EXPIRED
            if not journaled:
                fields = {"route": exp.route, "variant": exp.variant, "unit": exp.unit, "eid": exp.eid}
                resolved = {"kind": "outcome", "metric": metric, "value": value, "t": t, "served_at": served_at}
                self._resolved = {**resolved, **fields, "segment": exp.segment}
        elif r.get("eid") and r.get("served_at") is not None:  # a join the ledger journaled (see `ingest`)
            served_at = float(r["served_at"])
            if t - served_at > self.window_s:
                return EXPIRED
            segment, joined = str(r.get("segment") or ""), True
            exp = Exposure(str(r["route"]), str(r["variant"]), str(r["unit"]), int(served_at), str(r["eid"]), segment)
        else:
            return BAD_RECORD
        self._advance(t)
        if exp.issued_at < self.horizon:  # past the window: its dedup keys may be forgotten
            return EXPIRED
        if metric not in self.metrics.get(exp.route, {}):
            return UNKNOWN_METRIC
        key = (exp.key, metric)
        if key in self._seen_outcomes:
            return DUPLICATE
        if token and r.get("registered"):
            joined = True  # its exposure was counted before it (journaled as a first or in a count line)
        elif token and exp.key in self._seen_exposures:
            self._resolved = {**r, "registered": True}  # so a replay does not count that exposure again
        self._seen_outcomes.add(key)
        self._file(_OUTCOME, key, exp.issued_at)
        if not joined:
            self._register(exp)  # the token proves the exposure even if the access log has not said so yet
        self._arm(exp.route, exp.variant).add(exp.unit, metric, value)
        return ACCEPTED

    def _restart(self, r: Mapping[str, Any]) -> str:
        """``{"kind": "restart", "route", "variant"}``: a rolled-back challenger was resumed, its
        experiment starts afresh -- its tallies and always-valid bounds are dropped (journaled, so a
        replay drops them at the same point; outcomes of earlier exposures that arrive later count)."""
        route, variant = str(r["route"]), str(r["variant"])
        self._arms.get(route, {}).pop(variant, None)
        for due in [k for k in self._counts_due if k[0] == route and k[1] == variant]:
            del self._counts_due[due]  # counted before the fresh start: not the new experiment's
        for key in [k for k in self._bounds if k[0] == route and k[1] == variant]:
            del self._bounds[key]
        return ACCEPTED

    def _exposure_count(self, r: Mapping[str, Any]) -> str:
        """``{"kind": "exposures", "route", "variant", "unit", "n", "t"}``: ``n`` more exposures of a
        unit already in the arm (deduplicated when they were fed; the journal's count line)."""
        n, t = r["n"], float(r["t"])
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not math.isfinite(t):
            return BAD_RECORD
        self._advance(t)
        arm = self._arm(str(r["route"]), str(r["variant"]))
        arm.exposures[arm.slot(str(r["unit"]))] += n
        return ACCEPTED

    def _covariate(self, r: Mapping[str, Any]) -> str:
        value = float(r["value"])
        if not math.isfinite(value):
            return BAD_RECORD
        self._covariates.setdefault((str(r["route"]), str(r["name"])), {})[str(r["unit"])] = value
        return ACCEPTED

    # ------------------------------------------------------------------ out

    def _unit_values(self, route: str, arm: _Arm, spec: L.MetricSpec, keep: np.ndarray):
        n = len(arm.exposures)
        y = np.asarray(arm.sums.get(spec.name, [0.0] * n), dtype=float)
        if spec.kind == "binary":
            y = (y > 0).astype(float)  # a unit converted or it did not
        d = np.asarray(arm.exposures, dtype=float) if spec.kind == "ratio" else None
        x = None
        if spec.covariate:
            cov = self._covariates.get((route, spec.covariate), {})
            x = np.fromiter((cov.get(u, 0.0) for u in arm.index), dtype=float, count=n)[keep]
        return y[keep], None if d is None else d[keep], x

    def unit_rewards(self, route: str, metric: str, kind: str) -> dict[str, tuple[list[str], np.ndarray]]:
        """Per variant of ``route``: its units and each one's reward on ``metric`` (binary: converted or
        not; otherwise the unit's total), 0 for an exposed unit without an outcome. The bandit's input."""
        out = {}
        for variant, arm in self._arms.get(route, {}).items():
            y = np.asarray(arm.sums.get(metric, [0.0] * len(arm.exposures)), dtype=float)
            out[variant] = (list(arm.index), (y > 0).astype(float) if kind == "binary" else y)
        return out

    def results(self, route: str) -> list[MetricResult]:
        """Every declared metric of ``route`` for every challenger seen: one look (bounds narrow)."""
        control = self.controls.get(route)
        arms = self._arms.get(route, {})
        if control is None or control not in arms:
            return []
        challengers = sorted(v for v in arms if v != control)
        alpha = L.per_challenger(self.alpha, len(challengers))
        out = []
        for challenger in challengers:
            c_arm, t_arm = arms[control], arms[challenger]
            crossed = c_arm.index.keys() & t_arm.index.keys()
            keep_c = np.fromiter((u not in crossed for u in c_arm.index), dtype=bool, count=len(c_arm.index))
            keep_t = np.fromiter((u not in crossed for u in t_arm.index), dtype=bool, count=len(t_arm.index))
            for spec in self.metrics.get(route, {}).values():
                y1, d1, x1 = self._unit_values(route, t_arm, spec, keep_t)
                y0, d0, x0 = self._unit_values(route, c_arm, spec, keep_c)
                cuped = spec.covariate is not None
                lf = L.lift(
                    L.unit_moments(y1, d1, x1),
                    L.unit_moments(y0, d0, x0),
                    spec.kind,
                    alpha,
                    spec.planned_units,
                    cuped=cuped,
                )
                key = (route, challenger, spec.name)
                bounds = self._bounds.get(key, L.Bounds()).narrow(lf)
                self._bounds[key] = bounds
                units = int(y1.size + y0.size)
                out.append(
                    MetricResult(
                        route=route,
                        metric=spec.name,
                        role=spec.role,
                        challenger=challenger,
                        control=control,
                        units_challenger=int(y1.size),
                        units_control=int(y0.size),
                        control_value=float(lf.control),
                        challenger_value=float(lf.challenger),
                        abs=float(lf.abs),
                        rel=float(lf.rel),
                        ci_rel=(float(lf.ci_rel[0]), float(lf.ci_rel[1])),
                        cs_rel=(float(lf.cs_rel[0]), float(lf.cs_rel[1])),
                        bounds=bounds,
                        p_always=float(lf.p_always),
                        alpha=alpha,
                        cuped=cuped,
                        crossed_units=len(crossed),
                        decision=L.decide(spec, bounds, units, alpha),
                    )
                )
        return out


# ---------------------------------------------------------------------- the journal


def append_journal(path: Path | str, records: Iterable[Mapping[str, Any]]) -> int:
    """Append records as JSON lines (one ``write`` per batch, then fsync); return how many."""
    lines = [json.dumps(dict(r), separators=(",", ":"), sort_keys=True) + "\n" for r in records]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    return len(lines)


def read_journal(path: Path | str) -> Iterator[dict[str, Any]]:
    """The journal's records in order; a line that is not a JSON object (a torn last write) is skipped."""
    path = Path(path)
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


class FileJournal:
    """The ledger's journal in a JSON-lines file: replayed on start, tailed every interval.

    ``cohortgate outcomes import`` appends to the same file; the controller's own appends are
    recognised by their byte ranges (``O_APPEND`` writes land whole at the end) and not read back.
    Only complete lines are read: a line still being written is read at the next poll.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.offset = 0
        self._own: list[tuple[int, int]] = []

    def __repr__(self) -> str:
        return f"FileJournal({str(self.path)!r})"

    async def read_new(self) -> list[dict[str, Any]]:
        """Records appended since the last read (all of them the first time), except our own."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        out: list[dict[str, Any]] = []
        pos = self.offset
        for line in data[:end].splitlines(keepends=True):
            start, pos = pos, pos + len(line)
            if any(a <= start < b for a, b in self._own):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        self.offset += end
        self._own = [(a, b) for a, b in self._own if b > self.offset]
        return out

    async def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append (one write, then fsync); raises OSError, and the caller keeps the records."""
        if not records:
            return
        data = "".join(json.dumps(dict(r), separators=(",", ":"), sort_keys=True) + "\n" for r in records).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            end = f.tell()
        self._own.append((end - len(data), end))


class RedisJournal:
    """The ledger's journal in a Redis stream (`OUTCOMES_STREAM`): replayed on start, tailed every interval.

    A server-side producer ``XADD``s an entry whose ``record`` field is one JSON record (or the
    record's fields themselves); an outcome without ``t`` is dated by its entry id (the time Redis
    took it), so a replay judges it exactly as the first read did. The controller appends the
    outcomes its API accepted the same way and skips its own entries when tailing. Redis errors
    propagate (``redis_errors()``): the caller retries at the next interval.
    """

    def __init__(self, client: Any, stream: str = OUTCOMES_STREAM, batch: int = 10_000) -> None:
        self.client = client
        self.stream = stream
        self.batch = batch
        self.last_id = "0-0"
        self._own: set[str] = set()

    def __repr__(self) -> str:
        return f"RedisJournal({self.stream!r})"

    @staticmethod
    def _record(entry_id: str, fields: Mapping[str, Any]) -> dict[str, Any] | None:
        raw = fields.get("record")
        if raw is not None:
            try:
                record = json.loads(raw)
            except ValueError:
                return None
            if not isinstance(record, dict):
                return None
        else:
            record = dict(fields)
        if record.get("kind", "outcome") == "outcome" and record.get("t") is None:
            record["t"] = int(str(entry_id).split("-", 1)[0]) / 1000.0
        return record

    async def read_new(self) -> list[dict[str, Any]]:
        """Entries after the last one read (everything the first time), except our own; malformed
        entries come back as ``{"kind": "malformed"}`` so the ledger counts them as bad records."""
        out: list[dict[str, Any]] = []
        while True:
            entries = await self.client.xrange(self.stream, min=f"({self.last_id}", count=self.batch)
            for entry_id, fields in entries:
                entry_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                self.last_id = entry_id
                if entry_id in self._own:
                    self._own.discard(entry_id)
                    continue
                fields = {
                    (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                    for k, v in fields.items()
                }
                out.append(self._record(entry_id, fields) or {"kind": "malformed"})
            if len(entries) < self.batch:
                return out

    async def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        pipe = self.client.pipeline(transaction=False)
        for r in records:
            pipe.xadd(self.stream, {"record": json.dumps(dict(r), separators=(",", ":"), sort_keys=True)})
        for entry_id in await pipe.execute():
            self._own.add(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id))
