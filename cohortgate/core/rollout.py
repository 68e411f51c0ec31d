"""The experiment state machine, as a transition table (pure: no clock, no I/O).

Each challenger variant of a route has a phase; signals move it::

    RUNNING ──breach/rollback──▶ ROLLED_BACK ──resume──▶ RUNNING | PROMOTING (policy weight again)
    PROMOTING ──clean/promote──▶ PROMOTING (next step) … ▶ PROMOTED (last step reached)
    PROMOTING ──win──▶ PROMOTED (the rollout's last step at once: promote_on_win)
    any active | HALTED ──loss──▶ ROLLED_BACK (an outcome metric says worse: docs/outcomes.md)
    any active ──srm | control_breach──▶ HALTED ──resume──▶ the phase it left
    HALTED ──breach──▶ ROLLED_BACK

``control_breach``: control itself is over an absolute guardrail, so the limit says nothing about
the challenger; the experiment halts (no promotion) and the operator is alerted. A breach always
wins over a halt: an experiment whose assignment is broken still must not keep
serving a failing model. Automatic signals with no entry leave the state alone (a hold); manual
ones with no entry raise `InvalidTransition`, so an operator learns why nothing happened.

A raise (a rollout step, a promote, a resume) that would move units between variants other than
control and the one raised is refused, saying who would move: a hold for automatic signals,
`InvalidTransition` for manual ones. That happens only with three or more challengers and a full
lane of the cohort layout (see cohorts.py); lowering, rollbacks included, is never refused.

`RouteState` is what the state store persists and every gateway applies: the effective weights
(control takes whatever the challengers leave) and the phases, with a version for compare-and-set.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from cohortgate.core import cohorts
from cohortgate.core.policy import Route


class Phase(enum.StrEnum):
    RUNNING = "running"  # serving at a fixed weight, watched by the guardrails
    PROMOTING = "promoting"  # a rollout in progress: moves up one step per clean interval
    PROMOTED = "promoted"  # reached the rollout's last step (or promoted by hand)
    ROLLED_BACK = "rolled_back"  # weight 0, disabled: its users are back on control
    HALTED = "halted"  # sample-ratio mismatch or control over a guardrail: no automatic promotion


class Signal(enum.StrEnum):
    CLEAN = "clean"  # an interval passed with enough samples and no breach
    BREACH = "breach"  # a guardrail or a sequential test says the variant is worse
    SRM = "srm"  # assignment counts do not fit the weights
    CONTROL_BREACH = "control_breach"  # control itself exceeds an absolute guardrail: halt and alert
    WIN = "win"  # the primary outcome metric wins and every guardrail metric is non-inferior
    LOSS = "loss"  # the primary outcome metric loses, or a guardrail metric is inferior
    ROLLBACK = "rollback"  # by hand
    PROMOTE = "promote"  # by hand
    RESUME = "resume"  # by hand
    HOLD = "hold"  # nothing to do


MANUAL = frozenset({Signal.ROLLBACK, Signal.PROMOTE, Signal.RESUME})


class Effect(enum.StrEnum):
    KEEP = "keep"
    ZERO = "zero"  # weight to 0, users back to control
    NEXT = "next"  # next rollout step
    LAST = "last"  # the rollout's last step at once (a win)
    ALL = "all"  # take control's whole share (manual promote without a rollout)
    BACK = "back"  # return to the phase held before a halt
    RESTART = "restart"  # the policy file's weight and initial phase


P, S, E = Phase, Signal, Effect
ACTIVE = (P.RUNNING, P.PROMOTING, P.PROMOTED)

TABLE: Mapping[tuple[Phase, Signal], tuple[Phase | None, Effect]] = MappingProxyType(
    {
        **{(p, S.BREACH): (P.ROLLED_BACK, E.ZERO) for p in (*ACTIVE, P.HALTED)},
        **{(p, S.ROLLBACK): (P.ROLLED_BACK, E.ZERO) for p in (*ACTIVE, P.HALTED)},
        **{(p, S.LOSS): (P.ROLLED_BACK, E.ZERO) for p in (*ACTIVE, P.HALTED)},
        **{(p, S.SRM): (P.HALTED, E.KEEP) for p in ACTIVE},
        **{(p, S.CONTROL_BREACH): (P.HALTED, E.KEEP) for p in ACTIVE},
        (P.RUNNING, S.PROMOTE): (P.PROMOTED, E.ALL),
        (P.PROMOTING, S.CLEAN): (P.PROMOTING, E.NEXT),
        (P.PROMOTING, S.PROMOTE): (P.PROMOTING, E.NEXT),
        (P.PROMOTING, S.WIN): (P.PROMOTED, E.LAST),
        (P.HALTED, S.RESUME): (None, E.BACK),  # None: the phase recorded when it halted
        (P.ROLLED_BACK, S.RESUME): (None, E.RESTART),  # None: the initial phase for this variant
    }
)


class InvalidTransition(ValueError):
    """A manual action that makes no sense in the current phase (the API answers 409)."""


@dataclass(frozen=True, slots=True)
class VariantState:
    phase: Phase
    step: int = -1  # index into the rollout's steps; -1 before the first step or without a rollout
    since: float = 0.0  # when this phase/step began (controller clock, epoch seconds)
    reason: str = ""
    resume_to: Phase | None = None  # the phase a HALTED variant returns to


@dataclass(frozen=True, slots=True)
class RouteState:
    route: str
    weights: Mapping[str, int]  # every variant, control included; sums to 100
    variants: Mapping[str, VariantState]  # challengers only
    version: int = 0
    updated_at: float = 0.0
    updated_by: str = ""
    # a segmented bandit route: segment -> variant -> weight (each sums to 100); empty: ``weights`` for all
    segment_weights: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def disabled(self) -> frozenset[str]:
        return frozenset(n for n, v in self.variants.items() if v.phase is Phase.ROLLED_BACK)

    @property
    def status(self) -> str:
        """One word for the route: halted wins, then the rollout's phase, else running."""
        phases = {v.phase for v in self.variants.values()}
        if Phase.HALTED in phases:
            return Phase.HALTED.value
        for p in (Phase.PROMOTING, Phase.PROMOTED, Phase.ROLLED_BACK):
            if p in phases:
                return p.value
        return Phase.RUNNING.value

    def to_json(self) -> dict[str, Any]:
        segments = {s: dict(w) for s, w in self.segment_weights.items()}
        extra = {"segment_weights": segments} if segments else {}  # absent: old readers see what they know
        return {
            "route": self.route,
            "weights": dict(self.weights),
            "variants": {
                n: {
                    "phase": v.phase.value,
                    "step": v.step,
                    "since": v.since,
                    "reason": v.reason,
                    "resume_to": v.resume_to.value if v.resume_to else None,
                }
                for n, v in self.variants.items()
            },
            "version": self.version,
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
            "status": self.status,
            **extra,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RouteState:
        return cls(
            route=str(data["route"]),
            weights=MappingProxyType({str(k): int(v) for k, v in data["weights"].items()}),
            variants=MappingProxyType(
                {
                    str(n): VariantState(
                        phase=Phase(v["phase"]),
                        step=int(v.get("step", -1)),
                        since=float(v.get("since", 0.0)),
                        reason=str(v.get("reason", "")),
                        resume_to=Phase(v["resume_to"]) if v.get("resume_to") else None,
                    )
                    for n, v in data["variants"].items()
                }
            ),
            version=int(data.get("version", 0)),
            updated_at=float(data.get("updated_at", 0.0)),
            updated_by=str(data.get("updated_by", "")),
            segment_weights=MappingProxyType(
                {
                    str(s): MappingProxyType({str(k): int(v) for k, v in w.items()})
                    for s, w in (data.get("segment_weights") or {}).items()
                }
            ),
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """What one signal did: the before/after of phase and weights (the audit record's core)."""

    route: str
    variant: str
    signal: Signal
    before: Phase
    after: Phase
    weights_before: Mapping[str, int]
    weights_after: Mapping[str, int]
    reason: str = ""
    evidence: Mapping[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.before is not self.after or dict(self.weights_before) != dict(self.weights_after)

    @property
    def action(self) -> str:
        """rollback | promote | halt | resume | hold: the verb an operator reads in the audit."""
        if self.after is Phase.ROLLED_BACK and self.before is not Phase.ROLLED_BACK:
            return "rollback"
        if self.after is Phase.HALTED and self.before is not Phase.HALTED:
            return "halt"
        if self.signal is Signal.RESUME:
            return "resume"
        if dict(self.weights_before) != dict(self.weights_after):
            return "promote"
        return "hold"


def initial_phase(route: Route, variant: str) -> tuple[Phase, int]:
    """The phase and step a variant starts in, from the policy file."""
    ro = route.rollout
    if ro is None or ro.variant != variant:
        return Phase.RUNNING, -1
    weight = route.variants[route.variant_index(variant)].weight
    step = max((i for i, s in enumerate(ro.steps) if s <= weight), default=-1)
    if step == len(ro.steps) - 1:
        return Phase.PROMOTED, step
    return Phase.PROMOTING, step


def initial_state(route: Route, now: float = 0.0) -> RouteState:
    """The state the policy file describes: its weights, rollout at the step its weight reached."""
    variants = {}
    for v in route.variants[1:]:
        phase, step = initial_phase(route, v.name)
        variants[v.name] = VariantState(phase, step, since=now)
    return RouteState(
        route=route.name,
        weights=MappingProxyType({v.name: v.weight for v in route.variants}),
        variants=MappingProxyType(variants),
        updated_at=now,
        updated_by="policy",
    )


def _rebalance(route: Route, weights: dict[str, int], variant: str, target: int) -> dict[str, int]:
    """Set ``variant`` to ``target`` (capped by what other challengers hold); control takes the rest."""
    control = route.variants[0].name
    others = sum(w for n, w in weights.items() if n not in (control, variant))
    weights[variant] = max(0, min(target, 100 - others))
    weights[control] = 100 - others - weights[variant]
    return weights


def _ramp_problem(route: Route, before: Mapping[str, int], after: Mapping[str, int]) -> str | None:
    """`cohorts.ramp_problem` for a route's named weights (see the layout notes in cohorts.py)."""
    names = [v.name for v in route.variants]
    old, new = [before.get(n, 0) for n in names], [after.get(n, 0) for n in names]
    if old == new or sum(old) != 100 or sum(new) != 100:
        return None
    return cohorts.ramp_problem(old, new, names)


def apply(
    route: Route,
    state: RouteState,
    variant: str,
    signal: Signal,
    now: float,
    reason: str = "",
    evidence: Mapping[str, Any] | None = None,
    actor: str = "controller",
) -> tuple[RouteState, Transition]:
    """Feed one signal for one variant; return the new state and what happened.

    Unknown (phase, signal) pairs are holds for automatic signals and `InvalidTransition` for
    manual ones. The returned state's version is bumped only when something changed.
    """
    if variant not in state.variants:
        raise InvalidTransition(f"{variant!r} is not a challenger of route {route.name!r}")
    current = state.variants[variant]
    entry = TABLE.get((current.phase, signal))
    hold = Transition(
        route.name, variant, signal, current.phase, current.phase, state.weights, state.weights, reason, evidence or {}
    )
    if entry is None:
        if signal in MANUAL:
            raise InvalidTransition(f"cannot {signal.value} {route.name}/{variant} while it is {current.phase.value}")
        return state, hold
    target, effect = entry
    weights = dict(state.weights)
    step = current.step
    resume_to = current.resume_to
    if effect is Effect.ZERO:
        weights = _rebalance(route, weights, variant, 0)
    elif effect is Effect.ALL:
        weights = _rebalance(route, weights, variant, 100)
    elif effect in (Effect.NEXT, Effect.LAST):
        steps = route.rollout.steps if route.rollout else (100,)
        step = len(steps) - 1 if effect is Effect.LAST else min(step + 1, len(steps) - 1)
        weights = _rebalance(route, weights, variant, steps[step])
        if weights == dict(state.weights):  # capped by the other challengers: nowhere to grow
            return state, hold
        if step == len(steps) - 1:
            target = Phase.PROMOTED
    elif effect is Effect.BACK:
        target = current.resume_to or Phase.RUNNING
    elif effect is Effect.RESTART:
        target, step = initial_phase(route, variant)
        weights = _rebalance(route, weights, variant, route.variants[route.variant_index(variant)].weight)
    assert target is not None
    if effect in (Effect.ALL, Effect.NEXT, Effect.LAST, Effect.RESTART):  # a raise: refuse one that moves others' units
        problem = _ramp_problem(route, state.weights, weights)
        if problem is not None:
            if signal in MANUAL:
                raise InvalidTransition(f"cannot {signal.value} {route.name}/{variant}: {problem}")
            return state, replace(hold, reason=problem)
    if target is Phase.HALTED:
        resume_to = current.phase
    elif current.phase is Phase.HALTED:
        resume_to = None
    new_variant = VariantState(target, step, since=now, reason=reason, resume_to=resume_to)
    if new_variant.phase is current.phase and weights == dict(state.weights) and step == current.step:
        return state, hold
    variants = dict(state.variants)
    variants[variant] = new_variant
    new_state = replace(
        state,
        weights=MappingProxyType(weights),
        variants=MappingProxyType(variants),
        version=state.version + 1,
        updated_at=now,
        updated_by=actor,
    )
    return new_state, Transition(
        route.name, variant, signal, current.phase, target, state.weights, new_state.weights, reason, evidence or {}
    )


def reconcile(route: Route, state: RouteState | None, now: float = 0.0) -> RouteState:
    """Fit a stored state to the current policy: new variants join, removed ones leave.

    A state that only ever came from the policy file follows the file (an edited weight applies);
    one the controller or an operator changed keeps its weights until the route is resumed. If the
    stored weights no longer sum to 100 over the policy's variants, the policy wins.
    """
    fresh = initial_state(route, now)
    if state is None:
        return fresh
    if state.updated_by == "policy":  # nobody has acted on the route: the file's weights speak
        same = dict(state.weights) == dict(fresh.weights) and {
            n: (v.phase, v.step) for n, v in state.variants.items()
        } == {n: (v.phase, v.step) for n, v in fresh.variants.items()}
        return state if same else replace(fresh, version=state.version + 1)
    names = [v.name for v in route.variants]
    weights = {n: int(state.weights.get(n, fresh.weights[n])) for n in names}
    variants = {n: state.variants.get(n, fresh.variants[n]) for n in names[1:]}
    if sum(weights.values()) != 100 or any(w < 0 for w in weights.values()):
        return replace(fresh, version=state.version + 1)
    if weights == dict(state.weights) and variants == dict(state.variants):
        return state
    return replace(
        state,
        weights=MappingProxyType(weights),
        variants=MappingProxyType(variants),
        version=state.version + 1,
        updated_at=now,
    )
