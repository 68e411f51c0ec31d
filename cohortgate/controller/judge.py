"""One interval's verdict for one challenger: which `Signal` to feed the state machine, and why.

Pure (no clock, no I/O, no asyncio): the loop gathers the always-valid p-values (stats) and the
window summaries into an `Evidence`, this decides. The order is the order of precedence:

1. a rolled-back variant is left alone;
2. **breach** when a harm test rejects: error rate or slow-request rate worse than control;
3. for each absolute guardrail (``max_error_rate``; ``max_p99_ms`` as "more than 1 % of requests
   slower than it"):

   * **control_breach** (halt + alert) when *control* is over the limit with confidence: the limit
     then says nothing about the challenger, and rolling it back would hide an incident;
   * **breach** when the challenger is over the limit with confidence and control is below it
     with confidence;
   * otherwise a **hold** that says the challenger looks over the limit but control is too close
     to it to blame the challenger (the harm tests still decide);

4. **loss** (a rollback) when an outcome metric says the challenger is worse: the primary metric's
   always-valid interval lies on the bad side of 0, or a guardrail metric is *inferior* (worse than
   control by more than its margin) -- see docs/outcomes.md;
5. **win** for the rollout's variant when ``promote_on_win`` is set, the primary metric wins and every
   guardrail metric is non-inferior: straight to the rollout's last step;
6. **clean** for a promoting variant whose step has lasted ``interval_s``, seen ``min_samples`` and
   whose guardrail metrics are all shown *non-inferior* (a pending or inconclusive one holds the
   step, and the reason says which);
7. otherwise **hold**, with the reason (how many samples or seconds are missing).

Outcome metrics have their own budget: each metric's confidence sequence runs at the ledger's alpha
(Bonferroni-divided across challengers, `cohortgate.core.lift.per_challenger`), apart from the
harm tests' ``alpha`` below; their A/A rates through this function are in docs/outcomes.md.

The alpha split (`alpha_split`): ``alpha`` bounds the chance of ever rolling back a challenger that
is no worse than control and within the limits, at any time. The harm tests get half (alpha/4
each), the absolute guardrails the other half (alpha/4 each; the p99 share is unused without a
p99 limit). Each test is always valid, so by the union bound the sum stays within alpha however
often the loop looks. The control-side checks of a guardrail use the same share: when the
challenger's rate really is over the limit (A/A with control over it too), a rollback needs
control to look *below* the limit, which happens with probability at most that share.

Sequential tests need no sample floor -- their guarantee holds at every n -- so a canary failing
every request is rolled back after a handful of them; ``min_samples`` only gates promotion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cohortgate.controller.windows import Summary
from cohortgate.core.policy import Guardrails, Rollout
from cohortgate.core.rollout import ACTIVE, Phase, RouteState, Signal, VariantState


@dataclass(frozen=True, slots=True)
class AlphaSplit:
    """Each always-valid test's share of the false-rollback budget ``alpha``."""

    harm_error: float
    harm_latency: float
    limit_error: float
    limit_p99: float


def alpha_split(alpha: float) -> AlphaSplit:
    harm = alpha / 2  # the two harm tests share one half ...
    limits = alpha / 2  # ... the two absolute guardrails the other
    return AlphaSplit(harm / 2, harm / 2, limits / 2, limits / 2)


@dataclass(frozen=True, slots=True)
class LimitEvidence:
    """One absolute guardrail: always-valid p-values for "over the limit" / "under the limit".

    ``rate`` / ``control_rate``: the share of bad requests (errors, or slower than the p99 limit)
    since the tests began, for the reason an operator reads.
    """

    limit: float  # max_error_rate, or max_p99_ms
    p0: float  # the rate the limit allows: max_error_rate, or 1 % for the p99
    p_over: float = 1.0  # the challenger is over the limit
    p_control_over: float = 1.0  # control is over the limit
    p_control_under: float = 1.0  # control is under the limit
    rate: float = 0.0
    control_rate: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {
            "limit": self.limit,
            "p_over": self.p_over,
            "p_control_over": self.p_control_over,
            "p_control_under": self.p_control_under,
            "rate": round(self.rate, 6),
            "control_rate": round(self.control_rate, 6),
        }


@dataclass(frozen=True, slots=True)
class BackendEvidence:
    """One backend of a variant (index N of ``cg.ROUTE.VARIANT.N``), its sliding window.

    A variant served by several backends can be slow because one of them is (a starved host, a
    bad node) rather than because of its model: the per-backend windows let an operator tell.
    """

    index: int
    address: str  # host:port in the policy ("" when the policy no longer names it)
    window: Summary

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "address": self.address, **self.window.to_json()}


def backends_json(backends: tuple[BackendEvidence, ...]) -> dict[str, dict[str, Any]]:
    return {str(b.index): b.to_json() for b in backends}


@dataclass(frozen=True, slots=True)
class Evidence:
    """Everything the verdict reads for one challenger in one interval."""

    window: Summary  # challenger, sliding window (for reasons and the audit)
    step: Summary  # challenger, this rollout step
    control: Summary  # control, sliding window
    p_error: float = 1.0  # harm test: more errors than control
    p_latency: float = 1.0  # harm test: more slow requests than control
    error_limit: LimitEvidence | None = None
    p99_limit: LimitEvidence | None = None
    design_effects: Mapping[str, float] = field(default_factory=dict)
    outcomes: tuple[OutcomeEvidence, ...] = ()  # the challenger's outcome metrics (none declared: empty)
    backends: tuple[BackendEvidence, ...] = ()  # the challenger's, per backend
    control_backends: tuple[BackendEvidence, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "window": self.window.to_json(),
            "step": self.step.to_json(),
            "control": self.control.to_json(),
            "p_error": self.p_error,
            "p_latency": self.p_latency,
            "error_limit": None if self.error_limit is None else self.error_limit.to_json(),
            "p99_limit": None if self.p99_limit is None else self.p99_limit.to_json(),
            "design_effects": {k: round(v, 3) for k, v in self.design_effects.items()},
            "outcomes": [o.to_json() for o in self.outcomes],
            "backends": backends_json(self.backends),
            "control_backends": backends_json(self.control_backends),
        }


@dataclass(frozen=True, slots=True)
class OutcomeEvidence:
    """One outcome metric of one challenger at this look (from the ledger: `cohortgate.controller.gating`).

    ``verdict`` is `cohortgate.core.lift.Verdict`'s value (win, loss, non_inferior, inferior,
    inconclusive, pending); ``interval`` the always-valid relative interval (running intersection).
    """

    metric: str
    role: str  # primary | secondary | guardrail
    verdict: str
    lift: float  # relative
    interval: tuple[float, float]  # relative, always valid
    units: int  # both arms
    planned_units: int
    reason: str
    margin: float | None = None

    def to_json(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return round(v, 6) if v == v and abs(v) != float("inf") else None

        return {
            "metric": self.metric,
            "role": self.role,
            "verdict": self.verdict,
            "lift": num(self.lift),
            "interval": [num(self.interval[0]), num(self.interval[1])],
            "units": self.units,
            "planned_units": self.planned_units,
            "margin": self.margin,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    variant: str
    signal: Signal
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)


def _fmt_p(p: float) -> str:
    return f"{p:.2g}"


def _fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ms"


def backend_note(backends: tuple[BackendEvidence, ...], errors: bool = False) -> str:
    """Which of a variant's backends is worst (the highest p99, or error rate), when it has two or
    more with requests in the window: "" otherwise. Facts only: no threshold decides here."""
    seen = [b for b in backends if b.window.n]
    if len(seen) < 2:
        return ""
    if errors:
        seen.sort(key=lambda b: (b.window.error_rate, b.index), reverse=True)
        worst, rest = seen[0], ", ".join(f"#{b.index} {b.window.error_rate:.1%}" for b in seen[1:])
        return f"; most errors on backend #{worst.index} {worst.address} ({worst.window.error_rate:.1%}; {rest})"
    seen.sort(key=lambda b: (b.window.p99_ms or 0.0, b.index), reverse=True)
    worst, rest = seen[0], ", ".join(f"#{b.index} {_fmt_ms(b.window.p99_ms)}" for b in seen[1:])
    return f"; slowest backend #{worst.index} {worst.address} (p99 {_fmt_ms(worst.window.p99_ms)}; {rest})"


def _limit_verdict(
    variant: str, state: VariantState, name: str, g: LimitEvidence, share: float, evidence: dict[str, Any], ev: Evidence
) -> Verdict | None:
    """The verdict one absolute guardrail gives, or None when it has nothing to say."""
    what = "error rate" if name == "error" else f"share of requests slower than {g.limit:g} ms (p99 limit)"
    allowed = f"{g.p0:.1%}"
    if g.p_control_over < share:
        if state.phase is Phase.HALTED:
            return Verdict(variant, Signal.HOLD, state.reason or "halted", evidence)
        return Verdict(
            variant,
            Signal.CONTROL_BREACH,
            f"control breaches the guardrail: its {what} {g.control_rate:.2%} is over {allowed} "
            f"(always-valid p={_fmt_p(g.p_control_over)} < {share:g}); not the challenger's fault, "
            "experiment halted, operator alerted" + backend_note(ev.control_backends, errors=name == "error"),
            evidence,
        )
    if g.p_over < share:
        if g.p_control_under < share:
            return Verdict(
                variant,
                Signal.BREACH,
                f"{what} {g.rate:.2%} exceeds the guardrail {allowed} (always-valid p={_fmt_p(g.p_over)} "
                f"< {share:g}; control {g.control_rate:.2%} is under it)"
                + backend_note(ev.backends, errors=name == "error"),
                evidence,
            )
        return Verdict(
            variant,
            Signal.HOLD,
            f"{what} {g.rate:.2%} is over the guardrail {allowed}, but control ({g.control_rate:.2%}) is "
            "not clearly under it: waiting for the harm test or for control's evidence",
            evidence,
        )
    return None


def judge(
    variant: str,
    state: VariantState,
    guardrails: Guardrails,
    rollout: Rollout | None,
    now: float,
    ev: Evidence,
) -> Verdict:
    """Decide one variant's signal for this interval (see the module docstring for the order)."""
    split = alpha_split(guardrails.alpha)
    evidence: dict[str, Any] = {
        **ev.to_json(),
        "alpha": guardrails.alpha,
        "alpha_split": {
            "harm_error": split.harm_error,
            "harm_latency": split.harm_latency,
            "limit_error": split.limit_error,
            "limit_p99": split.limit_p99,
        },
        "min_samples": guardrails.min_samples,
        "max_error_rate": guardrails.max_error_rate,
        "max_p99_ms": guardrails.max_p99_ms,
    }
    if state.phase is Phase.ROLLED_BACK:
        return Verdict(variant, Signal.HOLD, "rolled back", evidence)

    window, control = ev.window, ev.control
    if ev.p_error < split.harm_error:
        return Verdict(
            variant,
            Signal.BREACH,
            f"error rate {window.error_rate:.1%} vs control {control.error_rate:.1%}: higher "
            f"(always-valid p={_fmt_p(ev.p_error)} < {split.harm_error:g})" + backend_note(ev.backends, errors=True),
            evidence,
        )
    if ev.p_latency < split.harm_latency:
        return Verdict(
            variant,
            Signal.BREACH,
            f"slow requests (over control's p95 + {guardrails.latency_margin_ms:g} ms) more frequent than on "
            f"control: p99 {_fmt_ms(window.p99_ms)} vs {_fmt_ms(control.p99_ms)} "
            f"(always-valid p={_fmt_p(ev.p_latency)} < {split.harm_latency:g})" + backend_note(ev.backends),
            evidence,
        )
    held: Verdict | None = None
    for name, g, share in (("error", ev.error_limit, split.limit_error), ("p99", ev.p99_limit, split.limit_p99)):
        if g is None:
            continue
        v = _limit_verdict(variant, state, name, g, share, evidence, ev)
        if v is not None and v.signal is not Signal.HOLD:
            return v
        held = held or v
    lost = _outcome_loss(variant, ev, evidence)
    if lost is not None:
        return lost
    if held is not None:
        return held

    if state.phase is Phase.PROMOTING and rollout is not None:
        won = _outcome_win(variant, rollout, ev, evidence)
        if won is not None:
            return won
        waited = now - state.since
        step = ev.step
        if step.n < guardrails.min_samples:
            return Verdict(
                variant, Signal.HOLD, f"needs {guardrails.min_samples - step.n} more samples on this step", evidence
            )
        if waited < rollout.interval_s:
            return Verdict(variant, Signal.HOLD, f"{rollout.interval_s - waited:.1f} s left on this step", evidence)
        waiting = _guardrails_waiting(ev.outcomes)
        if waiting:
            return Verdict(variant, Signal.HOLD, f"step held: {waiting}", evidence)
        nxt = rollout.steps[min(state.step + 1, len(rollout.steps) - 1)]
        return Verdict(
            variant,
            Signal.CLEAN,
            f"clean for {waited:.0f} s with {step.n} requests (error rate {step.error_rate:.1%}); next step {nxt}%",
            evidence,
        )
    if state.phase is Phase.HALTED:
        return Verdict(variant, Signal.HOLD, state.reason or "halted", evidence)
    return Verdict(variant, Signal.HOLD, "healthy", evidence)


def _fmt_outcome(o: OutcomeEvidence) -> str:
    lo, hi = o.interval
    units = f"{o.units} units of {o.planned_units} planned"
    return f"{o.metric} {o.lift:+.2%} [{lo:+.2%}, {hi:+.2%}] always valid, {units}"


def _outcome_loss(variant: str, ev: Evidence, evidence: dict[str, Any]) -> Verdict | None:
    """A rollback when the primary metric loses or a guardrail metric is inferior (secondaries only report)."""
    for o in ev.outcomes:
        if o.role == "primary" and o.verdict == "loss":
            what = "primary metric worse than control"
        elif o.role == "guardrail" and o.verdict == "inferior":
            what = f"guardrail metric worse than control by more than its margin {o.margin:g}"
        else:
            continue
        return Verdict(variant, Signal.LOSS, f"{what}: {_fmt_outcome(o)}", evidence)
    return None


def _guardrails_waiting(outcomes: tuple[OutcomeEvidence, ...]) -> str:
    """Why the guardrail metrics do not yet let a step advance ("" when all are non-inferior)."""
    notes = []
    for o in outcomes:
        if o.role != "guardrail" or o.verdict == "non_inferior":
            continue
        if o.verdict == "inconclusive":
            notes.append(
                f"guardrail metric {o.metric} is inconclusive at its planned units (non-inferiority by "
                f"{o.margin:g} not shown: {_fmt_outcome(o)}); an operator promotes or rolls back"
            )
        else:
            notes.append(f"guardrail metric {o.metric} not yet shown non-inferior by {o.margin:g} ({_fmt_outcome(o)})")
    return "; ".join(notes)


def _outcome_win(variant: str, rollout: Rollout, ev: Evidence, evidence: dict[str, Any]) -> Verdict | None:
    """Straight to the last step: ``promote_on_win``, the primary wins, every guardrail metric non-inferior."""
    if not rollout.promote_on_win or rollout.variant != variant:
        return None
    primary = next((o for o in ev.outcomes if o.role == "primary" and o.verdict == "win"), None)
    if primary is None:
        return None
    waiting = _guardrails_waiting(ev.outcomes)
    if waiting:
        return Verdict(variant, Signal.HOLD, f"primary metric wins ({_fmt_outcome(primary)}), but {waiting}", evidence)
    return Verdict(
        variant,
        Signal.WIN,
        f"primary metric better than control: {_fmt_outcome(primary)}; guardrail metrics non-inferior; "
        f"promote_on_win: straight to {rollout.steps[-1]}%",
        evidence,
    )


def srm_verdicts(challengers: list[str], state: RouteState, srm: Mapping[str, Any]) -> list[Verdict]:
    """An SRM halt for every active challenger when the sample-ratio check says mismatch."""
    if not srm.get("mismatch"):
        return []
    reason = (
        f"sample ratio mismatch: units {srm['counts']} vs weights {srm['weights']} "
        f"(chi2={srm['chi2']:.1f}, p={srm['p_chi2']:.2g}; always-valid p={srm['p_always_valid']:.2g}); "
        "assignment looks broken, experiment halted"
    )
    return [
        Verdict(name, Signal.SRM, reason, {"srm": dict(srm)})
        for name in challengers
        if state.variants[name].phase in ACTIVE
    ]
