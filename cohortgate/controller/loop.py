"""The controller service: consume outcomes, judge every interval, act, record why.

One `Controller` per process. While it holds the leader lock it reads events from its source (the
in-process sink, or the Redis stream through a consumer group), keeps per-route, per-variant
windows, and every ``interval_s``:

1. feeds each challenger's interval batch to its always-valid harm tests (errors, slow requests)
   and to the guardrail tests (over ``max_error_rate`` / ``max_p99_ms``), and control's batch to
   the same guardrail tests for control, each tempered by its arm's design effect (users differ);
2. checks the sample ratio of distinct units against the weights (SRM halts the experiment);
3. asks the pure `judge` for a signal per challenger and feeds it to the `rollout` table;
4. writes changed states to the state store (compare-and-set) and an audit record with the
   evidence (counts, rates, p-values), and publishes a status snapshot.

Followers (no lock) keep watching the store and serve status; manual actions are accepted by any
controller (they are compare-and-set writes the leader adopts through its watch).

Redis failures never crash the loop: the controller steps down, backs off, and resumes; states it
could not write stay pending and are written when Redis returns (re-seeding a Redis restarted empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cohortgate.controller.allocation import Allocator
from cohortgate.controller.fallbacks import FeatureFallbacks
from cohortgate.controller.gating import OutcomeGate
from cohortgate.controller.judge import (
    BackendEvidence,
    Evidence,
    LimitEvidence,
    Verdict,
    backends_json,
    judge,
    srm_verdicts,
)
from cohortgate.controller.leader import Leadership, SoloLeader
from cohortgate.controller.metrics import ControllerMetrics
from cohortgate.controller.provenance import ServedModels
from cohortgate.controller.quality import QualityMonitor, forget_variant
from cohortgate.controller.shadows import ShadowJoin
from cohortgate.controller.windows import (
    ERRORS,
    LAT_BINS,
    OVER,
    SLOW,
    RouteWindows,
    Summary,
    count_above,
    first_bin_above,
)
from cohortgate.core import rollout
from cohortgate.core.errors import CohortgateError
from cohortgate.core.policy import Guardrails, Policy, Route
from cohortgate.core.rollout import Phase, RouteState, Signal, Transition
from cohortgate.core.stats import HarmTest, LimitTest, pooled_design_effect, srm_check
from cohortgate.store.events import QUALITY, REPORT, REQUEST, Event, EventSource
from cohortgate.store.redis import redis_errors
from cohortgate.store.state import StateStore, StoreUnavailable, VersionConflict

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    interval_s: float = 1.0
    window_s: float = 60.0  # sliding window for guardrails and status
    apply_grace_s: float = 2.0  # after a weight change, gateways need this long before SRM counts again
    srm_alpha: float = 1e-3
    srm_min_expected: float = 5.0  # every category's expected unit count, before SRM is judged
    latency_quantile: float = 0.95  # "slow" = above this quantile of control's recent latencies
    latency_min_samples: int = 20  # control requests needed before a latency threshold exists
    max_batch: int = 10_000  # events per read
    status_ttl_s: float = 10.0
    reseed_s: float = 5.0  # how often a leader checks that the store still holds every route
    design_effect_s: float = 10.0  # how often the per-unit design effects are recomputed


P99_SHARE = 0.01  # p99 <= limit  <=>  at most 1 % of requests take longer than the limit


@dataclass(slots=True)
class _Tests:
    """A challenger's sequential tests (reset together when it restarts)."""

    guardrails: Guardrails
    error: HarmTest = field(default_factory=HarmTest)
    latency: HarmTest = field(default_factory=HarmTest)
    error_over: LimitTest = field(init=False)
    p99_over: LimitTest = field(init=False)

    def __post_init__(self) -> None:
        self.error_over = LimitTest(self.guardrails.max_error_rate)
        self.p99_over = LimitTest(P99_SHARE)


@dataclass(slots=True)
class _ControlTests:
    """Control's guardrail tests: is control itself over (or clearly under) each limit?"""

    guardrails: Guardrails
    error_over: LimitTest = field(init=False)
    error_under: LimitTest = field(init=False)
    p99_over: LimitTest = field(init=False)
    p99_under: LimitTest = field(init=False)

    def __post_init__(self) -> None:
        self.error_over = LimitTest(self.guardrails.max_error_rate)
        self.error_under = LimitTest(self.guardrails.max_error_rate, above=False)
        self.p99_over = LimitTest(P99_SHARE)
        self.p99_under = LimitTest(P99_SHARE, above=False)


def _rate(t: LimitTest) -> float:
    return t.bad / t.n if t.n else 0.0


class Controller:
    def __init__(
        self,
        policy: Policy,
        store: StateStore,
        source: EventSource,
        *,
        leader: Leadership | None = None,
        config: ControllerConfig | None = None,
        metrics: ControllerMetrics | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "controller",
        tracing: Any = None,
        outcomes: OutcomeGate | None = None,
    ) -> None:
        self.policy = policy
        self.store = store
        self.source = source
        self.leader = leader or SoloLeader()
        self.config = config or ControllerConfig()
        self.metrics = metrics or ControllerMetrics()
        self.clock = clock
        self.name = name
        self.tracing = tracing  # a cohortgate.support.tracing.Tracing: each decision is a span (off when None)
        self.states: dict[str, RouteState] = {}
        self.windows: dict[str, RouteWindows] = {}
        self.tests: dict[tuple[str, str], _Tests] = {}
        self.control_tests: dict[str, _ControlTests] = {}
        self.design_effects: dict[tuple[str, str], dict[str, float]] = {}
        self._deff_at: dict[str, tuple[float, int]] = {}  # route -> (when, requests tallied then)
        self.alerts: dict[str, dict[str, Any]] = {}  # route -> the control breach that halted it
        self.thresholds: dict[str, float | None] = {}
        self.verdicts: dict[tuple[str, str], Verdict] = {}
        self.srm: dict[str, dict[str, Any]] = {}
        self.shadows = ShadowJoin(policy)
        self.quality = QualityMonitor(policy, self.config.window_s)  # drift, segments, fairness (issue 20)
        self.allocation = Allocator()  # bandit routes' weights, every update_s (allocation.py)
        self.fallbacks = FeatureFallbacks(policy, self.config.window_s)  # feature fallbacks per variant (issue 22)
        self.models = ServedModels(policy, self.config.window_s, self.metrics.registry)  # served digests (issue 24)
        # outcome metrics: the ledger POST /outcomes feeds, its journal, the judge's evidence (gating.py)
        self.outcomes = outcomes if outcomes is not None else OutcomeGate.from_env(policy, clock=clock)
        self.pending: dict[str, tuple[RouteState, int | None]] = {}  # writes waiting for the store
        self.pending_audit: list[dict[str, Any]] = []
        self.events_seen = 0
        self.unknown_events = 0
        self.redis_ok: bool | None = None
        self._srm_regions: dict[str, frozenset[str] | None] = {}
        self._last_reseed = 0.0
        self._started = False
        self._flush_lock: asyncio.Lock | None = None
        for route in policy.routes:
            self._init_route(route)

    # ------------------------------------------------------------------ setup

    def _init_route(self, route: Route) -> None:
        self.windows[route.name] = RouteWindows(
            [v.name for v in route.variants], self.config.window_s, route.guardrails.max_p99_ms
        )
        self.thresholds[route.name] = None
        self.control_tests[route.name] = _ControlTests(route.guardrails)
        self._deff_at.pop(route.name, None)
        for v in route.variants[1:]:
            self.tests[(route.name, v.name)] = _Tests(route.guardrails)
        self.states.setdefault(route.name, rollout.initial_state(route, self.clock()))
        self._update_srm_regions(route.name)

    async def start(self) -> None:
        """Start the store and adopt what it holds, reconciled with the policy."""
        if self._started:
            return
        self._started = True
        await self.store.start()
        self.store.watch(self._on_store_change)
        await self.outcomes.start(self.store)  # replay the outcome journal
        try:
            stored = dict(await self.store.load())
        except StoreUnavailable:
            stored = dict(self.store.snapshot())
        now = self.clock()
        for route in self.policy.routes:
            known = stored.get(route.name)
            state = rollout.reconcile(route, known, now)
            self._adopt(route, state)
            if known is None or state.version != known.version:
                self.pending[route.name] = (state, known.version if known else None)
        await self._flush_pending()

    async def set_policy(self, policy: Policy, actor: str | None = None) -> None:
        """Judge by an edited policy from now on (the file changed, or SIGHUP).

        Unchanged routes keep their windows and tests; a route whose variants changed starts its
        windows afresh; each route's state is reconciled (`rollout.reconcile`: the file's weights
        apply unless the controller or an operator has acted). One audit record says so.
        """
        old, self.policy = self.policy, policy
        if old.digest == policy.digest:
            return
        self.shadows.set_policy(policy)
        self.quality.set_policy(policy)
        self.fallbacks.set_policy(policy)
        self.models.set_policy(policy)
        self.outcomes.set_policy(policy)
        for name in set(self.windows) - set(policy.by_name):
            for table in (
                self.windows,
                self.thresholds,
                self.states,
                self.srm,
                self._srm_regions,
                self.pending,
                self.control_tests,
                self.alerts,
            ):
                table.pop(name, None)
        for key in [k for k in (*self.tests, *self.verdicts) if k[0] not in policy.by_name]:
            self.tests.pop(key, None)
            self.verdicts.pop(key, None)
        now = self.clock()
        for route in policy.routes:
            before = old.by_name.get(route.name)
            if before is None or [v.name for v in before.variants] != [v.name for v in route.variants]:
                known = self.states.pop(route.name, None)
                for key in [k for k in self.tests if k[0] == route.name]:
                    del self.tests[key]
                self._init_route(route)
                state = rollout.reconcile(route, known, now)
                self.states[route.name] = state
                self._update_srm_regions(route.name)
            else:
                if before.guardrails != route.guardrails:  # new limits: the limit tests start afresh
                    limit = route.guardrails.max_p99_ms
                    self.windows[route.name].over_bin = LAT_BINS if limit is None else first_bin_above(limit)
                    self.control_tests[route.name] = _ControlTests(route.guardrails)
                    for v in route.variants[1:]:
                        fresh = _Tests(route.guardrails)  # the harm tests keep their evidence
                        old_tests = self.tests[(route.name, v.name)]
                        fresh.error, fresh.latency = old_tests.error, old_tests.latency
                        self.tests[(route.name, v.name)] = fresh
                known = self.states.get(route.name)
                state = rollout.reconcile(route, known, now)
                self._adopt(route, state)
            if known is None or state.version != known.version:
                self.pending[route.name] = (state, known.version if known else None)
        self.pending_audit.append(
            {
                "ts": now,
                "route": "",
                "action": "policy_reload",
                "actor": actor or f"controller:{self.name}",
                "reason": f"policy {old.digest[:12]} -> {policy.digest[:12]} ({policy.path})",
                "policy_digest": policy.digest,
            }
        )
        log.info("policy reloaded: %s -> %s", old.digest[:12], policy.digest[:12])
        await self._flush_pending()

    # ------------------------------------------------------------------ ingest

    def ingest(self, events: list[Event], now: float | None = None) -> None:
        """Account events into the windows (requests) and the shadow join (reports)."""
        now = self.clock() if now is None else now
        blocks: dict[str, tuple[list[int], list[int], list[float], list[object], list[bool], list[int]]] = {}
        for e in events:
            self.events_seen += 1
            if e.kind == REQUEST and not e.shadow_of:
                rw = self.windows.get(e.route)
                if rw is None:
                    self.unknown_events += 1
                    continue
                regions = self._srm_regions.get(e.route)
                b = blocks.setdefault(e.route, ([], [], [], [], [], []))
                b[0].append(rw.index.get(e.variant, -1))
                b[1].append(e.status)
                b[2].append(e.latency_ms)
                b[3].append(e.unit)
                b[4].append(regions is None or not e.region or e.region in regions)
                b[5].append(e.backend)
                self.quality.add_request(e)
                if e.exposure:  # a route with metrics: the unit counts as exposed, converting or not (issue 19)
                    self.outcomes.ledger.expose(e.exposure, e.route, e.variant, e.unit, e.request_id, now)
                if e.model_digest and (served := self.models.add(e, now)) is not None:
                    self.pending_audit.append({**served, "actor": f"controller:{self.name}"})  # a new digest
            elif e.kind == REPORT:
                self.shadows.add(e, now)
                self.fallbacks.add(e, now)
            elif e.kind == QUALITY:  # a sidecar's window from the Redis stream (over HTTP: the API's add_report)
                self.quality.add_json(e.quality)
        for name, (variant, status, latency, units, srm, backend) in blocks.items():
            self.unknown_events += self.windows[name].add_many(
                np.array(variant),
                np.array(status),
                np.array(latency, dtype=float),
                units,
                now,
                np.array(srm),
                np.array(backend, dtype=np.int64),
            )
        if events:
            self.metrics.consumed.labels("all").inc(len(events))

    def ingest_block(
        self,
        route: str,
        variant: np.ndarray,
        status: np.ndarray,
        latency_ms: np.ndarray,
        units: list[object] | np.ndarray,
        now: float | None = None,
    ) -> None:
        """Requests of one route as arrays (``variant``: index in the policy's order): what `ingest`
        does with request events, without building them -- for simulations of many runs."""
        now = self.clock() if now is None else now
        self.events_seen += len(variant)
        self.unknown_events += self.windows[route].add_many(variant, status, latency_ms, units, now)

    def _update_srm_regions(self, route_name: str) -> None:
        """Regions where every variant with traffic has a backend (elsewhere fallbacks skew counts)."""
        route = self.policy.by_name[route_name]
        st = self.states[route_name]
        live = [v for v in route.variants if st.weights.get(v.name, 0) > 0 and v.name not in st.disabled]
        regions: set[str] | None = None
        for v in live:
            regions = set(v.by_region) if regions is None else regions & set(v.by_region)
        self._srm_regions[route_name] = frozenset(regions or ())

    # ------------------------------------------------------------------ one interval

    async def tick(self, now: float | None = None) -> list[Transition]:
        """Judge every route once; persist and audit what changed. Returns the changes."""
        now = self.clock() if now is None else now
        self.metrics.ticks.inc()
        changes: list[Transition] = []
        await self.outcomes.poll()
        for route in self.policy.routes:
            changes.extend(self._judge_route(route, now))
        self.pending_audit.extend(self.allocation.tick(self, now))  # after the guardrails: a rollback stands
        await self._flush_pending()
        return changes

    def _refresh_design_effects(self, route: Route, now: float) -> None:
        """Per-unit design effects, every ``design_effect_s`` and whenever the tallies grew by a
        quarter since (young tests change fast). Any value keeps the tests valid under independent
        requests; a stale one only delays the correction for clustering."""
        variants = self.windows[route.name].variants
        seen = sum(int(w.tally.n[: w.tally.size].sum()) + w.tally.singles for w in variants.values())
        last = self._deff_at.get(route.name)
        if last is not None and now - last[0] < self.config.design_effect_s and seen < 1.25 * last[1]:
            return
        self._deff_at[route.name] = (now, seen)
        for name, w in variants.items():
            self.design_effects[(route.name, name)] = {
                "error": w.tally.design_effect(ERRORS),
                "slow": w.tally.design_effect(SLOW),
                "over": w.tally.design_effect(OVER),
            }

    def _update_tests(self, route: Route, state: RouteState, now: float) -> None:
        """Feed this interval's batches to every sequential test (the only place tests change)."""
        rw = self.windows[route.name]
        control = route.variants[0].name
        batches = {name: w.drain() for name, w in rw.variants.items()}
        cb = batches[control]
        threshold = self.thresholds[route.name]
        limit = route.guardrails.max_p99_ms
        self._refresh_design_effects(route, now)
        d0 = self.design_effects[(route.name, control)]
        ct = self.control_tests[route.name]
        ct.error_over.update(cb.errors, cb.n, 1 / d0["error"])
        ct.error_under.update(cb.errors, cb.n, 1 / d0["error"])
        if limit is not None:
            ct.p99_over.update(count_above(cb.hist, limit), cb.n, 1 / d0["over"])
            ct.p99_under.update(count_above(cb.hist, limit, straddling=True), cb.n, 1 / d0["over"])
        for v in route.variants[1:]:
            if state.variants[v.name].phase is Phase.ROLLED_BACK:
                continue
            b = batches[v.name]
            tests = self.tests[(route.name, v.name)]
            d1 = self.design_effects[(route.name, v.name)]
            tests.error_over.update(b.errors, b.n, 1 / d1["error"])
            if limit is not None:
                tests.p99_over.update(count_above(b.hist, limit), b.n, 1 / d1["over"])
            if b.n and cb.n:
                deff = float(pooled_design_effect(d1["error"], b.n, d0["error"], cb.n))
                tests.error.update(b.errors, b.n, cb.n, b.errors + cb.errors, 1 / deff)
                if threshold is not None:
                    xs, xc = count_above(b.hist, threshold), count_above(cb.hist, threshold)
                    deff = float(pooled_design_effect(d1["slow"], b.n, d0["slow"], cb.n))
                    tests.latency.update(xs, b.n, cb.n, xs + xc, 1 / deff)
        control_window = rw.variants[control].sliding(now)
        # next interval's "slow" threshold, fixed before its data arrives: control's p95 plus the
        # policy's margin, so a slowdown too small to matter never reads as harm
        p95 = control_window.summary().p95_ms
        self.thresholds[route.name] = (
            p95 + route.guardrails.latency_margin_ms
            if p95 is not None and control_window.n >= self.config.latency_min_samples
            else None
        )
        rw.set_slow_threshold(self.thresholds[route.name])

    def backend_evidence(self, route: Route, variant: str, now: float) -> tuple[BackendEvidence, ...]:
        """A variant's backends with requests in the sliding window, named by the policy's address."""
        backends = next((v.backends for v in route.variants if v.name == variant), ())
        return tuple(
            BackendEvidence(
                index, f"{backends[index].host}:{backends[index].port}" if index < len(backends) else "", summary
            )
            for index, summary in self.windows[route.name].variants[variant].backend_summaries(now).items()
        )

    def evidence(self, route: Route, variant: str, now: float, control: Summary | None = None) -> Evidence:
        """What the judge reads for one challenger now (the tests' p-values and the windows)."""
        rw = self.windows[route.name]
        w = rw.variants[variant]
        tests = self.tests[(route.name, variant)]
        ct = self.control_tests[route.name]
        g = route.guardrails
        if control is None:
            control = rw.variants[route.variants[0].name].sliding(now).summary()
        p99 = None
        if g.max_p99_ms is not None:
            p99 = LimitEvidence(
                g.max_p99_ms,
                P99_SHARE,
                tests.p99_over.p_value,
                ct.p99_over.p_value,
                ct.p99_under.p_value,
                _rate(tests.p99_over),
                _rate(ct.p99_over),
            )
        return Evidence(
            window=w.sliding(now).summary(),
            step=w.step.summary(),
            control=control,
            p_error=tests.error.p_value,
            p_latency=tests.latency.p_value,
            error_limit=LimitEvidence(
                g.max_error_rate,
                g.max_error_rate,
                tests.error_over.p_value,
                ct.error_over.p_value,
                ct.error_under.p_value,
                _rate(tests.error_over),
                _rate(ct.error_over),
            ),
            p99_limit=p99,
            design_effects=dict(self.design_effects.get((route.name, variant), {})),
            backends=self.backend_evidence(route, variant, now),
            control_backends=self.backend_evidence(route, route.variants[0].name, now),
        )

    def _judge_route(self, route: Route, now: float) -> list[Transition]:
        state = self.states[route.name]
        self._update_tests(route, state, now)
        control = self.windows[route.name].variants[route.variants[0].name].sliding(now).summary()
        srm = self._srm(route, state, now)
        self.outcomes.look(route.name)
        verdicts = [] if srm is None else srm_verdicts([v.name for v in route.variants[1:]], state, srm)
        for v in route.variants[1:]:
            verdict = judge(
                v.name,
                state.variants[v.name],
                route.guardrails,
                route.rollout if route.rollout and route.rollout.variant == v.name else None,
                now,
                self.outcomes.with_outcomes(route.name, v.name, self.evidence(route, v.name, now, control)),
            )
            self.verdicts[(route.name, v.name)] = verdict
            tests = self.tests[(route.name, v.name)]
            self.metrics.p_value.labels(route.name, v.name, "error").set(tests.error.p_value)
            self.metrics.p_value.labels(route.name, v.name, "latency").set(tests.latency.p_value)
            if verdict.signal is not Signal.HOLD:
                evidence = dict(verdict.evidence)
                if srm is not None:
                    evidence["srm"] = srm
                verdicts.append(Verdict(verdict.variant, verdict.signal, verdict.reason, evidence))
        verdicts += self.quality.verdicts(route, state, self.thresholds[route.name], now, {v.variant for v in verdicts})
        changes = []
        for verdict in verdicts:
            before = self.states[route.name]
            after, t = rollout.apply(
                route,
                before,
                verdict.variant,
                verdict.signal,
                now,
                verdict.reason,
                verdict.evidence,
                actor=f"controller:{self.name}",
            )
            if t.changed:
                changes.append(t)
                self._commit(route, before, after, t, f"controller:{self.name}", now)
                if verdict.signal is Signal.CONTROL_BREACH:
                    self._alert(route, verdict, now)
        self.pending_audit.extend(
            self.outcomes.decisions(route.name, now, f"controller:{self.name}", self.policy.digest)
        )
        return changes

    def _alert(self, route: Route, verdict: Verdict, now: float) -> None:
        """Control breaches a guardrail: the route's status says so until it is resumed."""
        if route.name not in self.alerts:
            log.error("ALERT %s: %s", route.name, verdict.reason)
        self.alerts[route.name] = {"kind": "control_breach", "since": now, "reason": verdict.reason}
        self.metrics.action(route.name, route.variants[0].name, "alert", "controller")

    def _srm(self, route: Route, state: RouteState, now: float) -> dict[str, Any] | None:
        rw = self.windows[route.name]
        live = [v.name for v in route.variants if state.weights.get(v.name, 0) > 0 and v.name not in state.disabled]
        if route.allocation is not None:  # sticky units keep their arm: counts need not follow moving weights
            self.srm[route.name] = {"checked": False, "reason": "bandit allocation: units are pinned, not hashed"}
            return None
        if len(live) < 2 or now < rw.srm_since:
            self.srm[route.name] = {
                "checked": False,
                "reason": "fewer than two live variants"
                if len(live) < 2
                else "waiting for gateways to apply new weights",
            }
            return None
        units = rw.unit_counts()
        counts = [units[n] for n in live]
        weights = [state.weights[n] for n in live]
        total = sum(counts)
        if total == 0 or min(total * w / sum(weights) for w in weights) < self.config.srm_min_expected:
            self.srm[route.name] = {
                "checked": False,
                "reason": f"too few units ({total})",
                "counts": dict(zip(live, counts, strict=True)),
            }
            return None
        r = srm_check(counts, weights, self.config.srm_alpha, rw.srm_p)
        rw.srm_p = r.p_always_valid
        doc = {
            "checked": True,
            "variants": live,
            "counts": dict(zip(live, counts, strict=True)),
            "weights": dict(zip(live, weights, strict=True)),
            "chi2": r.chi2,
            "p_chi2": r.p_chi2,
            "p_always_valid": r.p_always_valid,
            "alpha": self.config.srm_alpha,
            "mismatch": r.mismatch,
        }
        self.srm[route.name] = doc
        return doc

    # ------------------------------------------------------------------ state changes

    def _commit(
        self, route: Route, before: RouteState, after: RouteState, t: Transition, actor: str, now: float
    ) -> None:
        """Adopt a transition locally, queue its write (CAS on ``before.version``) and its audit record."""
        self._adopt(route, after)
        prior = self.pending.get(route.name)
        expected = prior[1] if prior is not None else before.version
        self.pending[route.name] = (after, expected)
        record = {
            "ts": now,
            "route": route.name,
            "variant": t.variant,
            "action": t.action,
            "signal": t.signal.value,
            "actor": actor,
            "from": t.before.value,
            "to": t.after.value,
            "weights_before": dict(t.weights_before),
            "weights_after": dict(t.weights_after),
            "reason": t.reason,
            "evidence": _jsonable(t.evidence),
            "version": after.version,
            "policy_digest": self.policy.digest,
            # the controller host's load when it decided: a latency verdict on a starved machine says so
            "host": _host_load(),
        }
        self.pending_audit.append(record)
        if self.tracing is not None:
            from cohortgate.controller.decision_trace import record_decision

            record_decision(self.tracing, record)
        self.metrics.action(route.name, t.variant, t.action, actor.split(":", 1)[0])
        log.info(
            "%s %s/%s: %s -> %s, weights %s (%s)",
            t.action,
            route.name,
            t.variant,
            t.before.value,
            t.after.value,
            dict(t.weights_after),
            t.reason,
        )

    def _adopt(self, route: Route, new: RouteState) -> None:
        """Make ``new`` the route's state and reset the windows and tests it invalidates."""
        old = self.states.get(route.name)
        self.states[route.name] = new
        if old is None or old is new:
            return
        rw = self.windows[route.name]
        if dict(old.weights) != dict(new.weights) or old.disabled != new.disabled:
            rw.reset_srm(self.clock() + self.config.apply_grace_s)
            self._update_srm_regions(route.name)
        for name, nv in new.variants.items():
            ov = old.variants.get(name)
            if ov is None:
                continue
            if ov.phase is Phase.ROLLED_BACK and nv.phase is not Phase.ROLLED_BACK:
                rw.variants[name].forget()  # a restarted experiment starts from scratch
                self.outcomes.restart(route.name, name, self.clock(), journal=bool(self.leader.held))
                forget_variant(self.quality, route.name, name)
                self.tests[(route.name, name)] = _Tests(route.guardrails)
            elif ov.phase is Phase.HALTED and nv.phase is not Phase.HALTED:
                # resumed: control must show a breach afresh (the operator has looked at it)
                self.control_tests[route.name] = _ControlTests(route.guardrails)
            elif ov.step != nv.step:
                rw.variants[name].new_step()
        if Phase.HALTED not in {v.phase for v in new.variants.values()}:
            self.alerts.pop(route.name, None)

    def _on_store_change(self, states: Mapping[str, RouteState]) -> None:
        """A state written elsewhere (CLI, another controller): adopt it if newer than ours."""
        for name, st in states.items():
            route = self.policy.by_name.get(name)
            mine = self.states.get(name)
            if route is None or mine is None or st.version <= mine.version:
                continue
            if name in self.pending:
                continue  # our own unwritten change; the CAS decides
            self._adopt(route, rollout.reconcile(route, st, self.clock()))

    async def _flush_pending(self) -> None:
        """Write pending states (compare-and-set) and audit records; keep them if the store is down.

        One flush at a time: a tick and an operator's action can both reach here, and two flushes
        interleaved at an ``await`` would write one record twice and pop another unwritten.
        """
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()  # created in the running loop
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        for name, (state, expected) in list(self.pending.items()):
            try:
                await self.store.put(state, expected)
            except VersionConflict as exc:
                log.warning("state of %s changed under us (%s); adopting the stored one", name, exc)
                self.pending.pop(name, None)
                self._set_redis(True)
                try:
                    stored = await self.store.load()
                except StoreUnavailable:
                    continue
                if name in stored:
                    route = self.policy.by_name[name]
                    self._adopt(route, rollout.reconcile(route, stored[name], self.clock()))
                continue
            except StoreUnavailable:
                self._set_redis(False)
                self.metrics.redis_error("put_state")
                return
            self.pending.pop(name, None)
            self._set_redis(True)
        while self.pending_audit:
            try:
                await self.store.append_audit(self.pending_audit[0])
            except StoreUnavailable:
                self._set_redis(False)
                self.metrics.redis_error("audit")
                del self.pending_audit[:-1000]  # bounded while the store is away
                return
            self.pending_audit.pop(0)

    async def reseed(self) -> None:
        """Re-write routes the store lost (a Redis restarted without persistence)."""
        try:
            stored = await self.store.load()
        except StoreUnavailable:
            self._set_redis(False)
            return
        self._set_redis(True)
        for name, state in self.states.items():
            if name not in stored and name not in self.pending:
                log.warning("state store lost route %r; writing our last state back (version %d)", name, state.version)
                self.pending[name] = (state, None)
        await self._flush_pending()

    def _set_redis(self, ok: bool) -> None:
        if self.redis_ok is not ok and self.redis_ok is not None:
            log.warning("state store %s", "reachable again" if ok else "unreachable; pending writes kept")
        self.redis_ok = ok

    # ------------------------------------------------------------------ manual actions

    async def manual(self, signal: Signal, route_name: str, variant: str | None, actor: str) -> list[Transition]:
        """Apply an operator's rollback/promote/resume now (raises InvalidTransition, KeyError)."""
        route = self.policy.by_name.get(route_name)
        if route is None:
            raise KeyError(f"no route named {route_name!r}")
        now = self.clock()
        stored = self.store.snapshot().get(route_name)
        if stored is not None and stored.version > self.states[route_name].version and route_name not in self.pending:
            self._adopt(route, rollout.reconcile(route, stored, now))
        if variant is None:
            if signal is not Signal.RESUME:
                raise rollout.InvalidTransition(f"{signal.value} needs a variant")
            targets = [
                n for n, v in self.states[route_name].variants.items() if v.phase in (Phase.HALTED, Phase.ROLLED_BACK)
            ]
            if not targets:
                raise rollout.InvalidTransition(
                    f"nothing to resume on route {route_name!r}: no variant is halted or rolled back"
                )
        else:
            targets = [variant]
        changes = []
        for name in targets:
            before = self.states[route_name]
            after, t = rollout.apply(
                route,
                before,
                name,
                signal,
                now,
                f"{signal.value} by {actor}",
                {"window": self._variant_status(route, name, now).get("window")},
                actor=actor,
            )
            if t.changed:
                changes.append(t)
                self._commit(route, before, after, t, actor, now)
        await self._flush_pending()
        if route_name in self.pending:
            raise StoreUnavailable(
                "the state store is unreachable; the action is queued and will be written when it returns"
            )
        return changes

    # ------------------------------------------------------------------ status

    def _variant_status(self, route: Route, name: str, now: float) -> dict[str, Any]:
        st = self.states[route.name]
        w = self.windows[route.name].variants[name]
        doc: dict[str, Any] = {
            "weight": int(st.weights.get(name, 0)),
            "enabled": name not in st.disabled,
            "window": w.sliding(now).summary().to_json(),
            "step_requests": w.step.n,
            "backends": backends_json(self.backend_evidence(route, name, now)),  # issue 17.8
        }
        if name == route.variants[0].name:
            doc["phase"] = "control"
            return doc
        vs = st.variants[name]
        tests = self.tests[(route.name, name)]
        verdict = self.verdicts.get((route.name, name))
        ev = self.evidence(route, name, now)
        doc.update(
            phase=vs.phase.value,
            step=vs.step,
            since=vs.since,
            reason=vs.reason,
            p_error=tests.error.p_value,
            p_latency=tests.latency.p_value,
            odds_ratio_error=tests.error.odds_ratio,
            limits={
                "error": None if ev.error_limit is None else ev.error_limit.to_json(),
                "p99": None if ev.p99_limit is None else ev.p99_limit.to_json(),
            },
            design_effects=ev.design_effects,
            verdict=None if verdict is None else {"signal": verdict.signal.value, "reason": verdict.reason},
        )
        return doc

    def status(self, now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        routes = {}
        for route in self.policy.routes:
            st = self.states[route.name]
            routes[route.name] = {
                "status": st.status,
                "version": st.version,
                "updated_at": st.updated_at,
                "updated_by": st.updated_by,
                "rollout": None
                if route.rollout is None
                else {
                    "variant": route.rollout.variant,
                    "steps": list(route.rollout.steps),
                    "interval_s": route.rollout.interval_s,
                },
                "guardrails": {
                    "max_error_rate": route.guardrails.max_error_rate,
                    "max_p99_ms": route.guardrails.max_p99_ms,
                    "min_samples": route.guardrails.min_samples,
                    "alpha": route.guardrails.alpha,
                    "alpha_split": "harm tests alpha/4 each, error and p99 guardrails alpha/4 each",
                },
                "srm": self.srm.get(route.name, {"checked": False}),
                # set while the route is halted because control itself breaches a guardrail
                "alert": self.alerts.get(route.name),
                "latency_threshold_ms": self.thresholds.get(route.name),
                "variants": {v.name: self._variant_status(route, v.name, now) for v in route.variants},
                "shadows": self.shadows.summary(route.name),
                "quality": self.quality.status(route.name),
                "allocation": self.allocation.report(self, route) if route.allocation is not None else None,
                "features": self.fallbacks.summary(route.name, now),  # None: the route joins no features
                "models": self.models.summary(route.name),  # routed vs served model digests per backend
                "outcomes": self.outcomes.summary(route.name),
            }
        return {
            "generated_at": now,
            "controller": {
                "name": self.name,
                "leader": bool(self.leader.held),
                "store": "ok" if self.redis_ok in (True, None) else "unreachable",
                "pending_writes": sorted(self.pending),
                "policy": self.policy.path,
                "policy_digest": self.policy.digest,
                "events": self.events_seen,
                "unknown_events": self.unknown_events,
                "interval_s": self.config.interval_s,
                # why the store started with every challenger at 0 % (no readable state file), or None
                "safe_mode": getattr(self.store, "safe_mode", None),
            },
            "routes": routes,
        }

    # ------------------------------------------------------------------ the service loop

    async def run(self, stop: asyncio.Event) -> None:
        """Lead (or wait to), consume, tick every interval, until ``stop`` is set. Never raises Redis errors."""
        await self.start()
        interval = self.config.interval_s
        next_tick = time.monotonic() + interval
        was_leader = False
        backoff = 0.1
        while not stop.is_set():
            try:
                leading = await self.leader.acquire_or_renew()
                self.metrics.leader.set(1 if leading else 0)
                if leading and not was_leader:
                    log.info("controller %s is the leader", self.name)
                    await self._on_elected()
                elif was_leader and not leading:
                    log.warning("controller %s lost the leader lock; standing by", self.name)
                was_leader = leading
                wait = max(0.0, next_tick - time.monotonic())
                if leading:
                    events = await self.source.read(self.config.max_batch, min(wait, interval))
                    self.ingest(events)
                    await self.source.ack()
                else:
                    await _sleep_or_stop(stop, min(wait, interval))
                if time.monotonic() >= next_tick:
                    next_tick = max(next_tick + interval, time.monotonic())
                    if not leading:
                        await self.outcomes.poll()  # a follower's API takes outcomes too: journal them
                    if leading:
                        await self.tick()
                        if self.clock() - self._last_reseed >= self.config.reseed_s:
                            self._last_reseed = self.clock()
                            await self.reseed()
                        await self._publish_status()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except (*redis_errors(), StoreUnavailable) as exc:
                self._set_redis(False)
                self.metrics.redis_error("loop")
                log.debug("controller loop: Redis error %s; retrying in %.1f s", exc, backoff)
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 2.0)
            except CohortgateError:
                log.exception("controller loop error")
                await _sleep_or_stop(stop, interval)
        await self.leader.release()

    async def _on_elected(self) -> None:
        """A new leader: pick up what the store holds and what a dead leader left unacknowledged."""
        try:
            stored = await self.store.load()
        except StoreUnavailable:
            stored = {}
        for name, st in stored.items():
            route = self.policy.by_name.get(name)
            if route is not None and name not in self.pending and st.version > self.states[name].version:
                self._adopt(route, rollout.reconcile(route, st, self.clock()))
        claim = getattr(self.source, "claim_stale", None)
        if claim is not None:
            self.ingest(await claim())
            await self.source.ack()

    async def _publish_status(self) -> None:
        try:
            await self.store.publish_status(self.status(), self.config.status_ttl_s)
        except StoreUnavailable:
            self._set_redis(False)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    if seconds <= 0:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Summary):
        return value.to_json()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def _host_load() -> dict[str, Any]:
    """Load averages and CPU count of the controller's host (where Envoy and the sidecars usually run too)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        return {"cpus": os.cpu_count()}
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2), "cpus": os.cpu_count()}
