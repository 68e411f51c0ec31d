"""Adaptive allocation in the controller: every ``update_s``, a bandit route's weights from its rewards.

For each route whose policy sets ``allocation``, `Allocator.tick` reads the outcome ledger's
per-unit rewards (``allocation.reward``), asks the pure strategy (`cohortgate.core.bandit`) for the
weights of new units, and publishes them like any effective weights: a new `RouteState` version
written through the controller's pending writes (compare-and-set), with an audit record
(action ``allocate``); every gateway applies it within a second. Exposed units do not move: the
gateway pins them with their signed assignment note (core/sticky.py).

Safety comes first: a rolled-back arm gets 0 % and is left out; while any arm is halted (control
over a guardrail, SRM) the weights are frozen; every live arm keeps ``min_share``. Guardrail tests
and rollbacks are the controller's usual ones, unchanged.

With ``allocation.segments`` (a contextual bandit over declared segments) each segment gets its own
weights from the rewards of the units served in it -- the segment rides in the signed exposure token,
so a client cannot move its rewards to another segment -- and they are published beside the route's
pooled weights (``RouteState.segment_weights``); a thin segment starts from the pooled tallies.

Each unit's propensity -- the share its arm had when the unit first appeared -- is recorded so the
report can give inverse-propensity-weighted estimates (`report`): bandit-allocated data need
weighting, and the plain per-arm means are shown beside them only to say so.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import deque
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from cohortgate.core import bandit
from cohortgate.core.policy import Route
from cohortgate.core.rollout import Phase, RouteState

if TYPE_CHECKING:
    from cohortgate.controller.loop import Controller
    from cohortgate.controller.outcomes import OutcomeLedger

log = logging.getLogger(__name__)

HISTORY = 360  # allocation points kept per route (an hour at the default 10 s)
WEIGHTING_NOTE = (
    "Bandit-allocated data need weighting: each arm's units were admitted with a share that moved over "
    "time, so the plain per-arm means are biased; read the inverse-propensity-weighted (Hajek) estimates."
)


def _seed(route: Route, step: int) -> np.random.Generator:
    """Reproducible draws: the policy's seed, the route and the update's number."""
    assert route.allocation is not None
    salt = int.from_bytes(hashlib.blake2b(route.name.encode(), digest_size=8).digest(), "big")
    return np.random.default_rng([route.allocation.seed, salt, step])


class Allocator:
    """The controller's bandit: weights per route, their history, each unit's propensity."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}  # route -> when its weights were last computed
        self.steps: dict[str, int] = {}
        self.history: dict[str, deque[dict[str, Any]]] = {}
        self.reasons: dict[str, str] = {}  # route -> why the last update held, if it did
        self.propensity: dict[str, dict[tuple[str, str], float]] = {}  # route -> (arm, unit) -> share

    @staticmethod
    def ledger(controller: Controller) -> OutcomeLedger | None:
        outcomes = getattr(controller, "outcomes", None)
        return getattr(outcomes, "ledger", None)

    def tick(self, controller: Controller, now: float) -> list[dict[str, Any]]:
        """Recompute every due bandit route; return the audit records of the weights it changed."""
        records = []
        for route in controller.policy.routes:
            al = route.allocation
            if al is None or now - self.last.get(route.name, -math.inf) < al.update_s:
                continue
            self.last[route.name] = now
            record = self._update(controller, route, now)
            if record is not None:
                records.append(record)
        return records

    def _stats(
        self, controller: Controller, route: Route, state: RouteState
    ) -> tuple[dict[str, bandit.ArmStats], dict[str, dict[str, bandit.ArmStats]]]:
        """Per live arm, its reward tallies, pooled and per segment (segmented routes); newly seen
        units get the propensity in force before this update (their segment's, on a segmented route)."""
        al = route.allocation
        assert al is not None
        ledger = self.ledger(controller)
        rewards = ledger.unit_rewards(route.name, al.reward, al.reward_kind) if ledger is not None else {}
        where = ledger.segments.get(route.name, {}) if ledger is not None and al.segment_defs else {}
        props = self.propensity.setdefault(route.name, {})
        out = {}
        by_segment: dict[str, dict[str, bandit.ArmStats]] = {}
        for v in route.variants:
            units, y = rewards.get(v.name, ([], np.zeros(0)))
            for u in units:
                weights = state.segment_weights.get(where.get(u, ""), state.weights)
                props.setdefault((v.name, u), max(weights.get(v.name, 0), 1) / 100)
            if v.name in state.disabled:
                continue
            out[v.name] = bandit.ArmStats.of(y)
            if where:
                segs = np.array([where.get(u, "") for u in units], dtype=object)
                for segment in set(segs) - {""}:
                    by_segment.setdefault(segment, {})[v.name] = bandit.ArmStats.of(y[segs == segment])
        return out, by_segment

    def _update(self, controller: Controller, route: Route, now: float) -> dict[str, Any] | None:
        al = route.allocation
        assert al is not None
        state = controller.states[route.name]
        stats, by_segment = self._stats(controller, route, state)
        if any(v.phase is Phase.HALTED for v in state.variants.values()):
            self.reasons[route.name] = "halted: the weights are frozen until the route is resumed"
            return None
        step = self.steps[route.name] = self.steps.get(route.name, 0) + 1
        rng = _seed(route, step)
        live = bandit.allocate(
            al.strategy, stats, al.reward_kind, al.reward_direction, al.min_share, rng, epsilon=al.epsilon
        )
        weights = {v.name: live.get(v.name, 0) for v in route.variants}
        segments: dict[str, dict[str, int]] = {}
        if al.segment_defs:
            per = bandit.allocate_segments(
                al.strategy,
                by_segment,
                al.reward_kind,
                al.reward_direction,
                al.min_share,
                rng,
                epsilon=al.epsilon,
                segments=al.segment_names(),
                pooled=stats,
            )
            known = set(al.segment_names())
            segments = {s: {v.name: w.get(v.name, 0) for v in route.variants} for s, w in per.items() if s in known}
        self.reasons.pop(route.name, None)
        self._remember(route.name, now, weights, stats, segments, by_segment)
        before = {s: dict(w) for s, w in state.segment_weights.items()}
        if weights == dict(state.weights) and segments == before:
            return None
        new = replace(
            state,
            segment_weights=MappingProxyType({s: MappingProxyType(w) for s, w in segments.items()}),
            weights=MappingProxyType(weights),
            version=state.version + 1,
            updated_at=now,
            updated_by=f"allocation:{controller.name}",
        )
        prior = controller.pending.get(route.name)
        controller.pending[route.name] = (new, prior[1] if prior is not None else state.version)
        controller._adopt(route, new)
        record = {
            "ts": now,
            "route": route.name,
            "variant": "",
            "action": "allocate",
            "signal": "allocate",
            "actor": f"allocation:{controller.name}",
            "from": "",
            "to": "",
            "weights_before": dict(state.weights),
            "weights_after": weights,
            **({"segment_weights_before": before, "segment_weights_after": segments} if segments else {}),
            "reason": f"{al.strategy} on {al.reward}: "
            + ", ".join(f"{n} {s.n} units mean {s.mean:.4g}" for n, s in stats.items()),
            "evidence": {n: {"units": s.n, "mean": s.mean} for n, s in stats.items()},
            "version": new.version,
            "policy_digest": controller.policy.digest,
        }
        log.info("allocate %s: %s -> %s", route.name, dict(state.weights), weights)
        return record

    def _remember(
        self,
        route: str,
        now: float,
        weights: dict[str, int],
        stats: dict[str, bandit.ArmStats],
        segments: dict[str, dict[str, int]],
        by_segment: dict[str, dict[str, bandit.ArmStats]],
    ) -> None:
        points = self.history.setdefault(route, deque(maxlen=HISTORY))
        point: dict[str, Any] = {
            "t": now,
            "weights": dict(weights),
            "posterior": {n: _posterior(s) for n, s in stats.items()},
        }
        if segments:
            point["segments"] = {
                s: {
                    "weights": dict(w),
                    "posterior": {n: _posterior(x) for n, x in by_segment.get(s, {}).items()},
                }
                for s, w in segments.items()
            }
        points.append(point)

    def report(self, controller: Controller, route: Route) -> dict[str, Any]:
        """The route's allocation: weights over time, posterior means with intervals, IPW estimates."""
        al = route.allocation
        assert al is not None
        ledger = self.ledger(controller)
        rewards = ledger.unit_rewards(route.name, al.reward, al.reward_kind) if ledger is not None else {}
        props = self.propensity.get(route.name, {})
        estimates = {}
        for v in route.variants:
            units, y = rewards.get(v.name, ([], np.zeros(0)))
            p = np.array([props.get((v.name, u), 1.0) for u in units], dtype=float)
            e = bandit.ipw(v.name, y, p)
            estimates[v.name] = {
                "units": e.units,
                "mean_unweighted": _num(e.naive),
                "mean_ipw": _num(e.ipw),
                "se_ipw": _num(e.ipw_se),
                "interval_ipw": [_num(e.ci[0]), _num(e.ci[1])],
            }
        state = controller.states.get(route.name)
        return {
            "route": route.name,
            "strategy": al.strategy,
            "reward": al.reward,
            "update_s": al.update_s,
            "min_share": al.min_share,
            "segments": list(al.segments),
            "weights": dict(state.weights) if state is not None else {},
            "segment_weights": {s: dict(w) for s, w in state.segment_weights.items()} if state is not None else {},
            "held": self.reasons.get(route.name),
            "history": list(self.history.get(route.name, ())),
            "estimates": estimates,
            "weighting": WEIGHTING_NOTE,
        }


def _posterior(s: bandit.ArmStats) -> dict[str, Any]:
    """The arm's mean with a 95 % interval (normal approximation; Beta(1+s, 1+f) mean for binary)."""
    if s.n == 0:
        return {"units": 0, "mean": None, "interval": [None, None]}
    sd = math.sqrt(s.var / s.n) if s.n >= 2 else math.nan
    return {
        "units": s.n,
        "mean": _num(s.mean),
        "interval": [_num(s.mean - 1.96 * sd), _num(s.mean + 1.96 * sd)],
    }


def _num(v: float) -> float | None:
    return None if not math.isfinite(v) else round(float(v), 6)
