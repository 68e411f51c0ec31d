"""Model-quality guardrails (issue 20): drift, segments, disparate impact, drift-aware switching.

The loop hands this module what it sees -- each request's segment label from the access log
(`add_request`), each sidecar's `QualityReport` (`add_report`, via ``POST /reports/quality``,
`contract.QUALITY_REPORTS_PATH`) -- and, once per interval, asks it for verdicts (`verdicts`). The
statistics are pure (`cohortgate.core.drift`, `cohortgate.core.fairness`); this module only keeps
the windows and decides which signal a result is. A route's ``quality.alpha`` is split
(Bonferroni) so that a challenger no worse than control
anywhere is rolled back with probability at most ``alpha`` over the whole experiment::

    segment harm tests   alpha/2   over 2 metrics (errors, slow requests) x every segment value
    four-fifths rule     alpha/4   over the segments
    drift (chi-square gate) alpha/4   half inputs, half predictions; spent over looks as 6/(pi^2 j^2)

Signals, in order of precedence, for each active challenger:

1. **segment harm** (`BREACH`): worse than control in one segment value beyond ``margin``
   (`fairness.MarginHarmTest`, always valid);
2. **disparate impact** (`BREACH`): its positive-rate ratio between a segment's values is under
   ``four_fifths`` with confidence, while control's is not (a world with unequal base rates is
   not the challenger's doing);
3. **input drift** (`BREACH`): its inputs differ from control's on the same window (control and
   challenger serve one population split by a hash, so a difference is the challenger's pipeline);
4. **prediction drift** (`BREACH`): its outputs differ from control's on the same window by more
   than ``prediction_drift`` (JS distance).

**Drift-aware switching.** Control's inputs are compared with a reference: its own first
windows after the controller started (``min_samples`` values per feature), disjoint from every
later window. When control drifts past the thresholds (the world changed, not the canary) and the
route names a ``fallback`` challenger that is running, the fallback is promoted (it takes
control's share) with the evidence in the audit trail. It moves back by an operator's rollback of
the fallback (which also makes the drifted world the new reference); a policy edit of the quality
block starts the route's quality state afresh, the weights staying as decided until an operator acts.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from cohortgate.controller.judge import Verdict
from cohortgate.controller.windows import SegmentWindows, count_above
from cohortgate.core import drift, rollout
from cohortgate.core.fairness import ImpactRatio, MarginHarmTest, impact_ratio
from cohortgate.core.policy import Policy, Quality, Route
from cohortgate.core.rollout import ACTIVE, Phase, RouteState, Signal
from cohortgate.core.sketch import QualityReport
from cohortgate.store.events import Event
from cohortgate.support.logs import Throttle

log = logging.getLogger(__name__)
throttled = Throttle(log)  # a misconfigured sidecar sends a bad report every window: one line per 30 s
STREAM_REJECTED = "quality-stream-report-rejected"
MIN_SEGMENT_TOTAL = 100  # requests a segment value needs before its positive rate counts
ALPHA_SPEND = 6 / math.pi**2  # sum over j >= 1 of 1/j^2 is pi^2/6: look j gets alpha * ALPHA_SPEND / j^2


def spent(alpha: float, look: int) -> float:
    """The level of the ``look``-th (1-based) drift comparison: the looks' levels sum to ``alpha``."""
    return alpha * ALPHA_SPEND / look**2


@dataclass(frozen=True, slots=True)
class QualitySplit:
    """Each quality signal's share of ``alpha``, per test (after Bonferroni)."""

    segment_test: float  # one (segment value, metric) harm test
    impact: float  # one segment's four-fifths bound
    drift: float  # one kind of drift comparison (inputs, predictions, control), before spending


def quality_split(q: Quality) -> QualitySplit:
    values = sum(len(s.values) + 1 for s in q.segments)
    return QualitySplit(
        segment_test=q.alpha / 2 / max(2 * values, 1),
        impact=q.alpha / 4 / max(len(q.segments), 1),
        drift=q.alpha / 8,
    )


def _thresholds(q: Quality, alpha: float, outputs: bool = False) -> drift.Thresholds:
    if outputs:
        return drift.Thresholds(None, q.prediction_drift, None, q.min_samples, alpha)
    return drift.Thresholds(q.psi, q.js, q.wasserstein, q.min_samples, alpha)


@dataclass(slots=True)
class _Window:
    """A (route, variant)'s recent quality reports, merged on demand."""

    reports: deque[QualityReport] = field(default_factory=deque)
    positives: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (segment, value) -> [pos, n]

    def current(self, since: float) -> QualityReport | None:
        while self.reports and self.reports[0].window_end <= since:
            self.reports.popleft()
        out = None
        for r in self.reports:
            out = r if out is None else out.merge(r)
        return out


@dataclass(slots=True)
class _RouteQuality:
    quality: Quality
    segments: SegmentWindows
    tests: dict[str, dict[tuple[str, str], tuple[MarginHarmTest, MarginHarmTest]]]
    windows: dict[str, _Window]
    baseline: QualityReport | None = None  # control's reference window
    baseline_parts: list[QualityReport] = field(default_factory=list)
    looks: dict[str, int] = field(default_factory=dict)  # comparison -> how many times judged
    dirty: bool = False
    threshold: float | None = None  # the slow-request threshold fixed before the current batch
    drift: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> latest drift documents
    control_drift: dict[str, Any] | None = None
    impact: dict[str, dict[str, Any]] = field(default_factory=dict)
    switch: dict[str, Any] | None = None  # the drift-aware switch in force
    alert: dict[str, Any] | None = None


class QualityMonitor:
    """Keeps every route's quality windows and tests; gives verdicts once per interval."""

    def __init__(self, policy: Policy, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.routes: dict[str, _RouteQuality] = {}
        self.rejected = 0  # reports naming no route/variant of the policy
        self.policy = policy
        for route in policy.routes:
            if route.quality is not None:
                self.routes[route.name] = self._fresh(route, route.quality)

    @staticmethod
    def _fresh(route: Route, q: Quality) -> _RouteQuality:
        names = [v.name for v in route.variants]
        declared = {s.name: s.values for s in q.segments}
        sw = SegmentWindows(names, declared)
        tests = {n: {k: (MarginHarmTest(q.margin), MarginHarmTest(q.margin)) for k in sw.totals} for n in names[1:]}
        return _RouteQuality(q, sw, tests, {n: _Window() for n in names})

    def set_policy(self, policy: Policy) -> None:
        """A route whose variants or quality block changed starts its quality state afresh."""
        old, self.policy = self.policy, policy
        for name in list(self.routes):
            if name not in policy.by_name or policy.by_name[name].quality is None:
                del self.routes[name]
        for route in policy.routes:
            before = old.by_name.get(route.name)
            if route.quality is None:
                continue
            same = (
                before is not None
                and before.quality == route.quality
                and [v.name for v in before.variants] == [v.name for v in route.variants]
            )
            if not same or route.name not in self.routes:
                self.routes[route.name] = self._fresh(route, route.quality)

    # ------------------------------------------------------------------ ingest

    def add_request(self, e: Event) -> None:
        """One primary request's outcome (the loop's ingest calls this for each)."""
        rq = self.routes.get(e.route)
        if rq is not None and rq.quality.segments:
            rq.segments.add(e.variant, e.segment, e.status, e.latency_ms)

    def route_of(self, report: QualityReport) -> str | None:
        """The route a report belongs to: its own, else the one route serving its model with that variant."""
        if report.route is not None:
            route = self.policy.by_name.get(report.route)
            return route.name if route is not None and _has_variant(route, report.variant) else None
        names = [r.name for r in self.policy.routes if r.model == report.model and _has_variant(r, report.variant)]
        return names[0] if len(names) == 1 else None

    def add_report(self, report: QualityReport, positives: Mapping[str, Any] | None = None) -> bool:
        """One sidecar window; its ``segments`` (or ``positives``, same shape: ``{"segment=value":
        {"positive": x, "total": n}}``) feed the four-fifths rule. False when the report names no
        route/variant with a quality block."""
        name = self.route_of(report)
        rq = self.routes.get(name) if name is not None else None
        if rq is None:
            self.rejected += 1
            return False
        w = rq.windows[report.variant]
        w.reports.append(report)
        if rq.baseline is None and report.variant == self.policy.by_name[name].variants[0].name:  # type: ignore[index]
            self._grow_baseline(rq, report)
        declared = {s.name: s.values for s in rq.quality.segments}
        for key, doc in (report.segments if positives is None else positives).items():
            seg, _, value = str(key).partition("=")
            if seg not in declared or not isinstance(doc, Mapping):
                continue
            value = value if value in declared[seg] else "other"
            x, n = doc.get("positive"), doc.get("total")
            if isinstance(x, int) and isinstance(n, int) and 0 <= x <= n:
                cell = w.positives.setdefault((seg, value), [0, 0])
                cell[0] += x
                cell[1] += n
        rq.dirty = True
        return True

    def add_json(self, text: str) -> str | None:
        """A report as its JSON text (the Redis ``QUALITY_STREAM`` entry's ``report`` field); the reason
        it was not taken, or None. Counted in ``rejected`` like one the API refuses."""
        try:
            doc = orjson.loads(text)
            if not isinstance(doc, dict):
                raise ValueError("a quality report must be a JSON object")
            report = QualityReport.from_json(doc)
        except (orjson.JSONDecodeError, ValueError) as exc:
            self.rejected += 1
            why = str(exc)
        else:
            if self.add_report(report):
                return None
            why = f"no route with a quality block serves model {report.model!r} variant {report.variant!r}"
        throttled.warning("a quality report from the stream was not taken: %s", why, key=STREAM_REJECTED)
        return why

    def _grow_baseline(self, rq: _RouteQuality, report: QualityReport) -> None:
        """Control's first reports become the reference once every input has ``min_samples`` values;
        they are then taken out of the live window, so reference and later windows never overlap."""
        rq.baseline_parts.append(report)
        merged = rq.baseline_parts[0]
        for r in rq.baseline_parts[1:]:
            merged = merged.merge(r)
        if merged.inputs and min(s.total for s in merged.inputs.values()) >= rq.quality.min_samples:
            rq.baseline = merged
            rq.baseline_parts = []
            rq.windows[report.variant].reports.clear()

    # ------------------------------------------------------------------ each interval

    def verdicts(
        self, route: Route, state: RouteState, threshold: float | None, now: float, taken: set[str] | None = None
    ) -> list[Verdict]:
        """This interval's quality signals for ``route`` (at most one per challenger, plus a switch);
        ``taken``: challengers another check already signalled this interval (left alone here)."""
        rq = self.routes.get(route.name)
        if rq is None:
            return []
        q = rq.quality
        split = quality_split(q)
        control = route.variants[0].name
        out: dict[str, Verdict] = {}
        self._watch_switch(rq, state)  # before this interval's switch: ``state`` predates it
        self._segment_tests(rq, route, state, split, out)
        rq.threshold = threshold  # fixed before the next batch arrives
        if rq.dirty:
            rq.dirty = False
            since = now - self.window_s
            current = {n: w.current(since) for n, w in rq.windows.items()}
            self._impact(rq, route, state, split, out)
            self._drift(rq, route, state, current, split, out)
            switch = self._control_drift(rq, route, state, current.get(control), split)
            if switch is not None:
                out.setdefault(switch.variant, switch)
        if taken and q.fallback in taken and rq.switch is not None and q.fallback in out:
            rq.switch = None  # another signal moved the fallback this interval: try again next time
        return [v for name, v in out.items() if not taken or name not in taken]

    def _segment_tests(
        self, rq: _RouteQuality, route: Route, state: RouteState, split: QualitySplit, out: dict[str, Verdict]
    ) -> None:
        if not rq.quality.segments:
            return
        control = route.variants[0].name
        batches = rq.segments.drain()
        for v in route.variants[1:]:
            vs = state.variants[v.name]
            if vs.phase is Phase.ROLLED_BACK:
                continue
            worst: tuple[float, str, tuple[str, str], MarginHarmTest] | None = None
            for key, per in batches.items():
                err, slow = rq.tests[v.name][key]
                b, cb = per[v.name], per[control]
                if b.n and cb.n:
                    err.update(b.errors, b.n, cb.n, b.errors + cb.errors)
                    if rq.threshold is not None:
                        xs, xc = count_above(b.hist, rq.threshold), count_above(cb.hist, rq.threshold)
                        slow.update(xs, b.n, cb.n, xs + xc)
                for metric, t in (("errors", err), ("slow requests", slow)):
                    if t.p_value < split.segment_test and (worst is None or t.p_value < worst[0]):
                        worst = (t.p_value, metric, key, t)
            if worst is not None and vs.phase in ACTIVE and v.name not in out:
                p, metric, (seg, value), t = worst
                doc = t.to_json()
                out[v.name] = Verdict(
                    v.name,
                    Signal.BREACH,
                    f"worse than control in segment {seg}={value}: {metric} {doc['rate']:.1%} vs "
                    f"{doc['control_rate']:.1%}, beyond the {rq.quality.margin:g} odds margin "
                    f"(always-valid p={p:.2g} < {split.segment_test:.2g}, alpha split over segments)",
                    {"quality": {"signal": "segment_harm", "segment": seg, "value": value, "metric": metric, **doc}},
                )

    def _impact(
        self, rq: _RouteQuality, route: Route, state: RouteState, split: QualitySplit, out: dict[str, Verdict]
    ) -> None:
        floor = rq.quality.four_fifths
        if floor is None or not rq.quality.segments:
            return
        control = route.variants[0].name

        def ratios(variant: str) -> dict[str, ImpactRatio]:
            cells = rq.windows[variant].positives
            found = {}
            for s in rq.quality.segments:
                counts = {v: (x, n) for (seg, v), (x, n) in cells.items() if seg == s.name}
                r = impact_ratio(counts, split.impact, MIN_SEGMENT_TOTAL)
                if r is not None:
                    found[s.name] = r
            return found

        base = ratios(control)
        for v in route.variants[1:]:
            mine = ratios(v.name)
            rq.impact[v.name] = {k: r.to_json() for k, r in mine.items()}
            if state.variants[v.name].phase not in ACTIVE or v.name in out:
                continue
            for seg, r in mine.items():
                c = base.get(seg)
                if r.upper < floor and (c is None or c.ratio >= floor):
                    out[v.name] = Verdict(
                        v.name,
                        Signal.BREACH,
                        f"disparate impact in segment {seg}: positive rate of {r.low} {r.rates[r.low]:.1%} is "
                        f"{r.ratio:.2f} of {r.high}'s {r.rates[r.high]:.1%}, under the {floor:g} floor "
                        f"(always-valid upper bound {r.upper:.2f}); control's ratio "
                        + ("unknown" if c is None else f"{c.ratio:.2f}"),
                        {
                            "quality": {
                                "signal": "disparate_impact",
                                "segment": seg,
                                "floor": floor,
                                **r.to_json(),
                                "control": None if c is None else c.to_json(),
                            }
                        },
                    )
                    break
        rq.impact[control] = {k: r.to_json() for k, r in base.items()}

    def _look(self, rq: _RouteQuality, key: str, alpha: float) -> float:
        rq.looks[key] = rq.looks.get(key, 0) + 1
        return spent(alpha, rq.looks[key])

    def _drift(
        self,
        rq: _RouteQuality,
        route: Route,
        state: RouteState,
        current: Mapping[str, QualityReport | None],
        split: QualitySplit,
        out: dict[str, Verdict],
    ) -> None:
        q = rq.quality
        control = route.variants[0].name
        c = current.get(control)
        if c is None:
            return
        for v in route.variants[1:]:
            r = current.get(v.name)
            if r is None or state.variants[v.name].phase is Phase.ROLLED_BACK:
                continue
            doc: dict[str, Any] = {}
            found: list[tuple[str, drift.DriftSummary, float]] = []
            for kind, ref, cur, outputs in (
                ("inputs", c.inputs, r.inputs, False),
                ("outputs", c.outputs, r.outputs, True),
            ):
                if outputs and q.prediction_drift is None:
                    continue
                probe = drift.summarize(ref, cur, _thresholds(q, 1.0, outputs))
                if not probe.judged:
                    doc[kind] = probe.to_json()
                    continue
                alpha = self._look(rq, f"{v.name}:{kind}", split.drift)
                s = drift.rejudge(probe, _thresholds(q, alpha, outputs))
                doc[kind] = {**s.to_json(), "alpha": alpha}
                if s.drifted:
                    found.append((kind, s, alpha))
            rq.drift[v.name] = doc
            if found and v.name not in out and state.variants[v.name].phase in ACTIVE:
                kind, s, alpha = found[0]
                feature = max(s.drifted, key=lambda f: s.features[f].js)
                d = s.features[feature]
                what = "inputs" if kind == "inputs" else "predictions"
                out[v.name] = Verdict(
                    v.name,
                    Signal.BREACH,
                    f"{what} drift against control on the same window: {len(s.drifted)} of {s.judged} "
                    f"{'features' if kind == 'inputs' else 'outputs'} moved; {feature}: JS {d.js:.3f}, PSI "
                    f"{d.psi:.3f} (chi-square p={d.p_value:.2g} < {alpha / max(s.judged, 1):.2g})",
                    {"quality": {"signal": "input_drift" if kind == "inputs" else "prediction_drift", **s.to_json()}},
                )

    def _control_drift(
        self,
        rq: _RouteQuality,
        route: Route,
        state: RouteState,
        current: QualityReport | None,
        split: QualitySplit,
    ) -> Verdict | None:
        q = rq.quality
        if rq.baseline is None or current is None:
            return None
        probe = drift.summarize(rq.baseline.inputs, current.inputs, _thresholds(q, 1.0))
        if not probe.judged:
            return None
        alpha = self._look(rq, "control", split.drift)
        s = drift.rejudge(probe, _thresholds(q, alpha))
        rq.control_drift = {
            **s.to_json(),
            "alpha": alpha,
            "reference": [rq.baseline.window_start, rq.baseline.window_end],
        }
        if not s.drifted or rq.switch is not None:
            return None
        feature = max(s.drifted, key=lambda f: s.features[f].js)
        reason = (
            f"control's inputs drifted from its reference: {len(s.drifted)} of {s.judged} features moved; "
            f"{feature}: JS {s.features[feature].js:.3f}, PSI {s.features[feature].psi:.3f}"
        )
        evidence = {"quality": {"signal": "control_drift", "fallback": q.fallback, **rq.control_drift}}
        if q.fallback is None:
            rq.alert = {"kind": "control_drift", "reason": reason + "; no fallback named: nothing switched"}
            return None
        try:  # pure: would the switch go through the table?
            _, t = rollout.apply(route, state, q.fallback, Signal.PROMOTE, 0.0)
        except rollout.InvalidTransition as exc:
            rq.alert = {"kind": "control_drift", "reason": f"{reason}; cannot switch to {q.fallback}: {exc}"}
            return None
        if not t.changed:
            return None
        rq.switch = {"fallback": q.fallback, "reason": reason}
        rq.alert = None
        return Verdict(q.fallback, Signal.PROMOTE, f"drift-aware switch to {q.fallback}: {reason}", evidence)

    def _watch_switch(self, rq: _RouteQuality, state: RouteState) -> None:
        """An operator moved traffic back (the fallback is no longer promoted): the drifted world is
        the new reference, and the next switch needs a new drift."""
        fb = rq.switch["fallback"] if rq.switch is not None else None
        if fb is not None and state.variants[fb].phase is not Phase.PROMOTED:
            rq.switch = None
            rq.baseline = None
            rq.baseline_parts = []
            rq.looks.pop("control", None)

    # ------------------------------------------------------------------ status

    def status(self, route_name: str) -> dict[str, Any] | None:
        rq = self.routes.get(route_name)
        if rq is None:
            return None
        q = rq.quality
        segments: dict[str, dict[str, dict[str, Any]]] = {}
        for (seg, value), per in rq.segments.totals.items():
            segments.setdefault(seg, {})[value] = {n: c.summary().to_json() for n, c in per.items()}
        tests = {
            v: {f"{seg}={val}": {"errors": e.to_json(), "slow": s.to_json()} for (seg, val), (e, s) in per.items()}
            for v, per in rq.tests.items()
        }
        split = quality_split(q)
        return {
            "thresholds": {
                "psi": q.psi,
                "js": q.js,
                "wasserstein": q.wasserstein,
                "prediction_drift": q.prediction_drift,
                "min_samples": q.min_samples,
                "margin": q.margin,
                "four_fifths": q.four_fifths,
                "alpha": q.alpha,
                "alpha_split": {"segment_test": split.segment_test, "impact": split.impact, "drift": split.drift},
            },
            "fallback": q.fallback,
            "segments": segments,
            "segment_tests": tests,
            "drift": rq.drift,
            "control_drift": rq.control_drift,
            "reference": None if rq.baseline is None else [rq.baseline.window_start, rq.baseline.window_end],
            "impact": rq.impact,
            "switch": rq.switch,
            "alert": rq.alert,
        }


def _has_variant(route: Route, name: str) -> bool:
    return any(v.name == name for v in route.variants)


def forget_variant(monitor: QualityMonitor, route: str, variant: str) -> None:
    """A restarted challenger (resumed after a rollback) is judged afresh."""
    rq = monitor.routes.get(route)
    if rq is None or variant not in rq.tests:
        return
    q = rq.quality
    rq.tests[variant] = {k: (MarginHarmTest(q.margin), MarginHarmTest(q.margin)) for k in rq.tests[variant]}
    rq.segments.forget(variant)
    rq.windows[variant] = _Window()
    rq.looks = {k: n for k, n in rq.looks.items() if not k.startswith(f"{variant}:")}
    rq.drift.pop(variant, None)
