"""What the dashboard draws, computed without I/O: per-second counts and the page document.

`Recorder` counts what the controller consumes, one bucket per second of arrival, so the page can
plot requests/s, error rate and p50/p99 per variant (the controller's own windows answer different
questions: a 60 s sliding total, a batch per tick). It also counts requests by region and the
processor's denials by code and region, which never reach the controller's windows.

`view` joins the controller's status document (the one `cohortgate status` prints), the policy's
weights, the audit log and the recorder's snapshot into one JSON-able document the page renders
as is; empty and error states are sentences here, not guesses in JavaScript.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cohortgate.controller.report import signed_margin
from cohortgate.controller.windows import is_error
from cohortgate.core.errors import Denial
from cohortgate.store.events import Event

DENIAL_BY_STATUS = {d.status: d.code for d in Denial}
MAX_LATENCIES = 5_000  # per variant per second; enough for a p99, bounded under a flood
AUDIT_SHOWN = 50
# Seconds of per-second history kept and sent: the page shows 2 min by default but reaches back far
# enough to keep the last rollback in view, or as far as this if the reader picks it.
HORIZON_S = 900


def denial_code(status: int) -> str:
    """The processor's denial code for an Envoy-logged status (each code has its own status)."""
    return DENIAL_BY_STATUS.get(status, f"http_{status}" if status else "no_response")


def clock_text(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


@dataclass(slots=True)
class _Second:
    t: int
    n: int = 0
    errors: int = 0
    lat: list[float] = field(default_factory=list)
    quantiles: tuple[float | None, float | None] | None = None  # (p50, p99), once the second is over

    def close(self) -> tuple[float | None, float | None]:
        if self.quantiles is None:
            if self.lat:
                p50, p99 = np.percentile(np.asarray(self.lat), [50, 99])
                self.quantiles = (round(float(p50), 3), round(float(p99), 3))
            else:
                self.quantiles = (None, None)
            self.lat = []
        return self.quantiles


class Recorder:
    """Per-second outcomes per (route, variant), requests by region, denials by code and region."""

    def __init__(self, horizon_s: int = HORIZON_S, clock: Callable[[], float] = time.time) -> None:
        self.horizon_s = horizon_s
        self.clock = clock
        self._seconds: dict[tuple[str, str], deque[_Second]] = {}
        self._first: dict[tuple[str, str], int] = {}
        self.regions: dict[str, Counter[str]] = {}
        self.region_errors: dict[str, Counter[str]] = {}
        self.denials_by_code: Counter[str] = Counter()
        self.denials_by_region: Counter[str] = Counter()
        self._denial_seconds: deque[list[int]] = deque()
        self.requests = 0

    def observe(self, event: Event, now: float | None = None) -> None:
        """One primary request outcome (what the controller's windows also count)."""
        if not event.route or not event.variant or event.shadow_of:
            return
        second = int(self.clock() if now is None else now)
        key = (event.route, event.variant)
        buckets = self._seconds.get(key)
        if buckets is None:
            buckets = self._seconds[key] = deque()
            self._first[key] = second
        if not buckets or buckets[-1].t != second:
            if buckets:
                buckets[-1].close()
            buckets.append(_Second(second))
            while buckets and buckets[0].t <= second - self.horizon_s:
                buckets.popleft()
        b = buckets[-1]
        b.n += 1
        err = is_error(event.status)
        b.errors += err
        if len(b.lat) < MAX_LATENCIES:
            b.lat.append(event.latency_ms)
        region = event.region or "unknown"
        self.regions.setdefault(event.route, Counter())[region] += 1
        if err:
            self.region_errors.setdefault(event.route, Counter())[region] += 1
        self.requests += 1

    def observe_denial(self, event: Event, now: float | None = None) -> None:
        """A request the processor refused (Envoy logged it without a variant)."""
        second = int(self.clock() if now is None else now)
        self.denials_by_code[denial_code(event.status)] += 1
        self.denials_by_region[event.region or "unknown"] += 1
        if not self._denial_seconds or self._denial_seconds[-1][0] != second:
            self._denial_seconds.append([second, 0])
            while self._denial_seconds and self._denial_seconds[0][0] <= second - self.horizon_s:
                self._denial_seconds.popleft()
        self._denial_seconds[-1][1] += 1

    def series(self, route: str, variant: str, now: float | None = None) -> list[list[Any]]:
        """``[t, requests/s, error rate, p50 ms, p99 ms]`` per completed second; quiet seconds are 0/None."""
        now_s = int(self.clock() if now is None else now)
        buckets = self._seconds.get((route, variant))
        if not buckets:
            return []
        start = max(self._first[(route, variant)], now_s - self.horizon_s)
        by_t = {b.t: b for b in buckets}
        out: list[list[Any]] = []
        for t in range(start, now_s):  # the current second is still filling: left out
            b = by_t.get(t)
            if b is None or b.n == 0:
                out.append([t, 0, None, None, None])
                continue
            p50, p99 = b.close()
            out.append([t, b.n, round(b.errors / b.n, 6), p50, p99])
        return out

    def last_rate(self, route: str, variant: str, now: float | None = None) -> int:
        """Requests in the last completed second."""
        now_s = int(self.clock() if now is None else now)
        for b in reversed(self._seconds.get((route, variant), ())):
            if b.t == now_s - 1:
                return b.n
            if b.t < now_s - 1:
                break
        return 0

    def has_traffic(self, route: str) -> bool:
        return any(r == route for r, _ in self._seconds)

    def denials(self, now: float | None = None) -> dict[str, Any]:
        now_s = int(self.clock() if now is None else now)
        per_s = dict((t, n) for t, n in self._denial_seconds)
        start = now_s - min(self.horizon_s, 60)
        return {
            "total": sum(self.denials_by_code.values()),
            "last_60s": sum(n for t, n in per_s.items() if start <= t < now_s),
            "by_code": _ranked(self.denials_by_code),
            "by_region": _ranked(self.denials_by_region),
        }


def _ranked(counter: Mapping[str, int]) -> list[list[Any]]:
    return [[k, v] for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


# --------------------------------------------------------------------------- the page document


def outcomes_view(route: str, data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The lift panel of a route with outcome metrics (None without): the catalog entry, and per metric
    and challenger the lift, its always-valid band over time, samples per arm, verdict and reason.

    ``data``: ``{"design", "results", "history", "labels"?}`` as `cohortgate.controller.report` reads
    them (labels: per variant accuracy from served predictions joined with late labels)."""
    if not data:
        return None
    design = data.get("design") or {}
    decls = {m["name"]: m for m in design.get("metrics", ())}
    series = {(s["metric"], s["challenger"]): s["points"] for s in data.get("history") or ()}
    metrics = []
    for r in data.get("results") or ():
        decl = decls.get(r["metric"], {})
        margin = signed_margin(decl)
        metrics.append(
            {
                "metric": r["metric"],
                "challenger": r["challenger"],
                "control": r["control"],
                "role": r["role"],
                "kind": decl.get("kind"),
                "direction": decl.get("direction", "increase"),
                "verdict": r.get("verdict"),
                "reason": r.get("reason") or "",
                "units": r.get("units") or {},
                "value": r.get("value") or {},
                "lift": (r.get("lift") or {}).get("relative"),
                "interval": r.get("interval_always_valid"),
                "fixed": r.get("interval_fixed_horizon"),
                "planned_units": decl.get("planned_units"),
                "margin": margin,
                "points": [p[:4] for p in series.get((r["metric"], r["challenger"]), ())],
            }
        )
    declared = ", ".join(decls)
    return {
        "experiment": design.get("experiment"),
        "metrics": metrics,
        "empty": None
        if metrics or not decls
        else f"no outcomes yet on route {route} (metrics: {declared}); clients post them with the exposure token",
        "labels": [_label_row(x) for x in data.get("labels") or ()],
    }


def _label_row(x: Mapping[str, Any]) -> dict[str, Any]:
    """One variant's accuracy from labels (`cohortgate.controller.labels`), as the panel's table shows it."""
    return {
        "variant": x.get("variant"),
        "labels": x.get("labels", 0),
        **{k: x.get(k) for k in ("accuracy", "log_loss", "mae")},
        "vs_control": x.get("vs_control") or {},
    }


def tripped_guardrails(variant: Mapping[str, Any], guardrails: Mapping[str, Any]) -> list[str]:
    """Which guardrails this variant's numbers trip now (the verdict's order: tests, then limits)."""
    out = []
    alpha = float(guardrails.get("alpha") or 0.05)
    p_error, p_latency = variant.get("p_error"), variant.get("p_latency")
    if p_error is not None and p_error < alpha / 2:
        out.append(f"error-rate sequential test (p={p_error:.2g} < {alpha / 2:g})")
    if p_latency is not None and p_latency < alpha / 2:
        out.append(f"latency sequential test (p={p_latency:.2g} < {alpha / 2:g})")
    window = variant.get("window") or {}
    n = window.get("requests") or 0
    if n >= (guardrails.get("min_samples") or 0):
        max_err = guardrails.get("max_error_rate")
        if max_err is not None and (window.get("error_rate") or 0) > max_err:
            out.append(f"max_error_rate {max_err:.1%} (window {window['error_rate']:.1%} over {n})")
        max_p99 = guardrails.get("max_p99_ms")
        p99 = window.get("p99_ms")
        if max_p99 is not None and p99 is not None and p99 > max_p99:
            out.append(f"max_p99_ms {max_p99:g} (window p99 {p99:.0f} ms over {n})")
    return out


def srm_view(srm: Mapping[str, Any] | None) -> dict[str, Any]:
    srm = srm or {}
    if not srm.get("checked"):
        return {"state": "unchecked", "text": f"not checked: {srm.get('reason') or 'no data yet'}"}
    counts = ", ".join(f"{k} {v}" for k, v in (srm.get("counts") or {}).items())
    weights = ", ".join(f"{k} {v}%" for k, v in (srm.get("weights") or {}).items())
    p = f"χ²={srm.get('chi2', 0):.1f}, p={srm.get('p_chi2', 1):.2g}, always-valid p={srm.get('p_always_valid', 1):.2g}"
    if srm.get("mismatch"):
        return {
            "state": "mismatch",
            "text": f"sample ratio mismatch: units {counts} vs weights {weights} ({p}); experiment halted",
        }
    return {"state": "ok", "text": f"units {counts} fit weights {weights} ({p})"}


def features_view(features: Mapping[str, Any] | None) -> list[dict[str, Any]] | None:
    """Per variant of a route with ``features:``: how often its fallback served (None: no features)."""
    if features is None:
        return None
    return [
        {
            "name": name,
            "reports": d.get("reports", 0),
            "rate": d.get("rate"),
            "reasons": ", ".join(f"{r} {n}" for r, n in (d.get("reasons") or {}).items()),
        }
        for name, d in features.items()
    ]


def quality_view(quality: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A route with ``quality:`` (docs/quality.md): the drift panel (per feature, per variant: against
    control on the same window, and control against its reference), the segment table, the
    four-fifths ratios, and the switch or alert in force (None: no quality block)."""
    if quality is None:
        return None

    def fmt(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}"

    drift = []
    for variant, kinds in sorted((quality.get("drift") or {}).items()):
        for kind, doc in sorted(kinds.items()):
            moved = doc.get("drifted") or {}
            for feature, d in sorted((doc.get("features") or {}).items()):
                drift.append(
                    [
                        variant,
                        "vs control, " + kind,
                        feature,
                        fmt(d.get("psi")),
                        fmt(d.get("js")),
                        fmt(d.get("wasserstein")),
                        f"{d.get('p_value', 1):.2g}",
                        ", ".join(moved.get(feature, [])) or "–",
                    ]
                )
    control = quality.get("control_drift") or {}
    for feature, d in sorted((control.get("features") or {}).items()):
        moved = (control.get("drifted") or {}).get(feature, [])
        drift.append(
            [
                "control",
                "vs reference, inputs",
                feature,
                fmt(d.get("psi")),
                fmt(d.get("js")),
                fmt(d.get("wasserstein")),
                f"{d.get('p_value', 1):.2g}",
                ", ".join(moved) or "–",
            ]
        )
    tests = quality.get("segment_tests") or {}
    segments = []
    for seg, values in sorted((quality.get("segments") or {}).items()):
        for value, per in sorted(values.items()):
            for variant, w in per.items():
                t = (tests.get(variant) or {}).get(f"{seg}={value}")
                segments.append(
                    [
                        f"{seg}={value}",
                        variant,
                        w.get("requests", 0),
                        f"{w.get('error_rate', 0):.2%}",
                        "–" if w.get("p95_ms") is None else f"{w['p95_ms']:.1f} ms",
                        "–" if t is None else f"{t['errors']['p_value']:.2g} / {t['slow']['p_value']:.2g}",
                    ]
                )
    impact = [
        [variant, seg, r.get("low"), r.get("high"), f"{r.get('ratio', 0):.2f}", f"{r.get('upper', 0):.2f}"]
        for variant, segs in sorted((quality.get("impact") or {}).items())
        for seg, r in sorted(segs.items())
    ]
    switch, alert = quality.get("switch"), quality.get("alert")
    notice = None
    if switch:
        notice = f"switched to {switch['fallback']}: {switch['reason']}"
    elif alert:
        notice = alert.get("reason")
    return {
        "drift": drift,
        "segments": segments,
        "impact": impact,
        "thresholds": quality.get("thresholds") or {},
        "notice": notice,
    }


def allocation_view(allocation: Mapping[str, Any] | None, points: int = 12) -> dict[str, Any] | None:
    """A bandit route's allocation: the weights over the last ``points`` updates per arm, each arm's
    posterior mean with its interval, and the IPW estimate (None: fixed weights)."""
    if not allocation:
        return None
    history = list(allocation.get("history") or ())[-points:]
    arms = list((allocation.get("weights") or {}).keys())
    latest = history[-1]["posterior"] if history else {}
    estimates = allocation.get("estimates") or {}
    return {
        "title": f"{allocation.get('strategy')} on {allocation.get('reward')}, every {allocation.get('update_s'):g} s, "
        f"floor {allocation.get('min_share', 0):.0%}",
        "arms": arms,
        "times": [p["t"] for p in history],
        "over_time": [[a, *[p["weights"].get(a, 0) for p in history]] for a in arms],
        "arms_now": [
            [
                a,
                (latest.get(a) or {}).get("units", 0),
                (latest.get(a) or {}).get("mean"),
                (latest.get(a) or {}).get("interval") or [None, None],
                (estimates.get(a) or {}).get("mean_ipw"),
                (estimates.get(a) or {}).get("interval_ipw") or [None, None],
            ]
            for a in arms
        ],
        "held": allocation.get("held"),
        "weighting": allocation.get("weighting", ""),
        "segments": _segment_allocation(allocation, arms, history),
    }


def _segment_allocation(
    allocation: Mapping[str, Any], arms: list[str], history: list[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Per segment of a contextual bandit (``allocation.segments``), sorted by name: its weights per arm
    over the same updates as the pooled table (None where an update had no weights for it yet) and each
    arm's latest posterior mean with its interval. The published ``segment_weights`` come first: a segment
    whose history has scrolled out still shows its weights now. Empty on an unsegmented route."""
    published = allocation.get("segment_weights") or {}
    names = set(published)
    for p in history:
        names.update(p.get("segments") or {})
    out = []
    for name in sorted(names):
        points = [(p.get("segments") or {}).get(name) for p in history]
        latest = next((pt["posterior"] for pt in reversed(points) if pt and pt.get("posterior")), {})
        now = published.get(name) or next((pt["weights"] for pt in reversed(points) if pt), {})
        out.append(
            {
                "name": name,
                "over_time": [[a, *[(pt["weights"].get(a, 0) if pt else None) for pt in points]] for a in arms],
                "arms_now": [
                    [
                        a,
                        now.get(a),
                        (latest.get(a) or {}).get("units", 0),
                        (latest.get(a) or {}).get("mean"),
                        (latest.get(a) or {}).get("interval") or [None, None],
                    ]
                    for a in arms
                ],
            }
        )
    return out


def audit_view(record: Mapping[str, Any]) -> dict[str, Any]:
    """One audit record as the timeline shows it: when, what, who or what decided, and why."""
    ev = record.get("evidence") or {}
    window = ev.get("window") if isinstance(ev, Mapping) else None
    evidence = {}
    if isinstance(ev, Mapping):
        for k in ("p_error", "p_latency"):
            if isinstance(ev.get(k), int | float):
                evidence[k] = ev[k]
    if isinstance(window, Mapping):
        evidence.update(
            samples=window.get("requests"), error_rate=window.get("error_rate"), p99_ms=window.get("p99_ms")
        )
    ts = float(record.get("ts") or 0.0)
    return {
        "ts": ts,
        "time": clock_text(ts),
        "route": record.get("route", ""),
        "variant": record.get("variant", ""),
        "action": record.get("action", ""),
        "actor": record.get("actor", ""),
        "from": record.get("from"),
        "to": record.get("to"),
        "weights": record.get("weights_after"),
        "reason": record.get("reason", ""),
        "evidence": evidence,
    }


def _variant_view(
    route: Mapping[str, Any], name: str, doc: Mapping[str, Any], policy_weight: int | None, rps: int, control: bool
) -> dict[str, Any]:
    window = doc.get("window") or {}
    out: dict[str, Any] = {
        "name": name,
        "control": control,
        "policy_weight": policy_weight,
        "weight": doc.get("weight"),
        "enabled": doc.get("enabled", True),
        "phase": doc.get("phase", "control" if control else "unknown"),
        "step": doc.get("step"),
        "since": doc.get("since"),
        "reason": doc.get("reason") or "",
        "rps": rps,
        "window": window,
        "verdict": doc.get("verdict"),
    }
    if not control:
        guardrails = route.get("guardrails") or {}
        out["evidence"] = {
            "samples": window.get("requests", 0),
            "step_samples": doc.get("step_requests"),
            "min_samples": guardrails.get("min_samples"),
            "p_error": doc.get("p_error"),
            "p_latency": doc.get("p_latency"),
            "odds_ratio_error": doc.get("odds_ratio_error"),
            "alpha": guardrails.get("alpha"),
            "tripped": tripped_guardrails(doc, guardrails),
        }
    return out


def view(
    status: Mapping[str, Any] | None,
    *,
    policy_weights: Mapping[str, Mapping[str, int]],
    recorder: Recorder,
    audit: Iterable[Mapping[str, Any]],
    now: float,
    allow_actions: bool = False,
    store_down_since: float | None = None,
    audit_error: str | None = None,
    outcomes: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The whole page as data (see the module docstring). ``outcomes``: route -> its lift data
    (`outcomes_view`), for the routes that declare outcome metrics."""
    notices: list[dict[str, str]] = []
    controller = dict((status or {}).get("controller") or {})
    if status is None:
        notices.append({"level": "error", "text": "no controller status yet: no leader has published one"})
    if store_down_since is not None:
        notices.append(
            {
                "level": "error",
                "text": f"controller cannot reach the state store (Redis) since {clock_text(store_down_since)}",
            }
        )
    if controller.get("pending_writes"):
        routes = ", ".join(controller["pending_writes"])
        notices.append({"level": "warn", "text": f"state changes waiting for the store: {routes}"})
    if status is not None and not controller.get("leader"):
        who = controller.get("served_by")
        notices.append(
            {
                "level": "info",
                "text": f"this controller ({who}) is standing by; showing leader {controller.get('name')}'s snapshot"
                if who
                else "this controller is not the leader and no leader has published a status in the last 10 s",
            }
        )
    if audit_error:
        notices.append({"level": "warn", "text": f"cannot read the audit log: {audit_error}"})
    if controller.get("safe_mode"):
        notices.append(
            {
                "level": "error",
                "text": f"SAFE MODE: {controller['safe_mode']}; every challenger serves 0 % until an operator "
                "resumes it",
            }
        )
    for name, route in sorted(((status or {}).get("routes") or {}).items()):
        alert = route.get("alert")
        if alert:  # control itself over a guardrail: the world changed, not the canary
            notices.append({"level": "error", "text": f"{name}: experiment halted: {alert.get('reason', '')}"})

    records = [audit_view(r) for r in audit][:AUDIT_SHOWN]
    records.sort(key=lambda r: -r["ts"])

    routes_out = []
    for name, route in ((status or {}).get("routes") or {}).items():
        variants = route.get("variants") or {}
        pw = policy_weights.get(name, {})
        vs = [
            _variant_view(route, v, doc, pw.get(v), recorder.last_rate(name, v, now), i == 0)
            for i, (v, doc) in enumerate(variants.items())
        ]
        seen = sum((v["window"].get("requests") or 0) for v in vs)
        empty = None
        if not seen and not recorder.has_traffic(name):
            empty = f"no traffic yet on route {name}"
        elif not seen:
            empty = f"no recent traffic on route {name} (nothing in the controller's sliding window)"
        shadows = [
            {
                "name": s,
                "pairs": d.get("pairs", 0),
                "agreement": d.get("agreement"),
                "latency_delta_ms": d.get("latency_delta_ms"),
                "shadow_errors": d.get("shadow_errors", 0),
            }
            for s, d in (route.get("shadows") or {}).items()
        ]
        req = recorder.regions.get(name, Counter())
        errs = recorder.region_errors.get(name, Counter())
        routes_out.append(
            {
                "name": name,
                "status": route.get("status", ""),
                "version": route.get("version"),
                "updated_at": route.get("updated_at"),
                "updated_by": route.get("updated_by"),
                "rollout": route.get("rollout"),
                "guardrails": route.get("guardrails") or {},
                "srm": srm_view(route.get("srm")),
                "variants": vs,
                "shadows": shadows,
                "features": features_view(route.get("features")),
                "quality": quality_view(route.get("quality")),
                "allocation": allocation_view(route.get("allocation")),
                "regions": [[r, n, errs.get(r, 0)] for r, n in _ranked(req)],
                "series": {v["name"]: recorder.series(name, v["name"], now) for v in vs},
                "markers": [r for r in records if r["route"] == name],
                "empty": empty,
                "outcomes": outcomes_view(name, (outcomes or {}).get(name)),
            }
        )
    if status is not None and not routes_out:
        notices.append({"level": "info", "text": "the policy has no routes"})
    return {
        "generated_at": now,
        "time": clock_text(now),
        "controller": {
            "name": controller.get("name"),
            "leader": controller.get("leader"),
            "store": controller.get("store"),
            "events": controller.get("events"),
            "interval_s": controller.get("interval_s"),
            "policy": controller.get("policy"),
            "policy_digest": (controller.get("policy_digest") or "")[:12],
        },
        "allow_actions": allow_actions,
        "notices": notices,
        "routes": routes_out,
        "denials": recorder.denials(now),
        "audit": records,
        "horizon_s": recorder.horizon_s,
    }
