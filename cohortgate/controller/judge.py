"""One interval's verdict for one challenger: which `Signal` to feed the state machine, and why.

Pure: the loop gathers the numbers (windows, sequential tests), this decides. The order is the
order of precedence:

1. a rolled-back variant is left alone;
2. **breach** when an always-valid harm test rejects (error rate or slow-request rate worse than
   control at level alpha/2 each, so both together stay at alpha), or when an absolute guardrail
   is exceeded over the sliding window with at least ``min_samples`` requests;
3. **clean** for a promoting variant whose step has lasted ``interval_s`` and seen ``min_samples``;
4. otherwise **hold**, with the reason (how many samples or seconds are missing).

The sequential test needs no sample floor -- its error guarantee holds at every n -- so a canary
failing every request is rolled back after a handful of them, not after ``min_samples``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cohortgate.controller.windows import Summary
from cohortgate.core.policy import Guardrails, Rollout
from cohortgate.core.rollout import Phase, Signal, VariantState


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


def judge(
    variant: str,
    state: VariantState,
    guardrails: Guardrails,
    rollout: Rollout | None,
    now: float,
    window: Summary,
    step: Summary,
    control: Summary,
    p_error: float,
    p_latency: float,
) -> Verdict:
    """Decide one variant's signal for this interval (see the module docstring for the order)."""
    evidence: dict[str, Any] = {
        "window": window.to_json(),
        "step": step.to_json(),
        "control": control.to_json(),
        "p_error": p_error,
        "p_latency": p_latency,
        "alpha": guardrails.alpha,
        "min_samples": guardrails.min_samples,
        "max_error_rate": guardrails.max_error_rate,
        "max_p99_ms": guardrails.max_p99_ms,
    }
    if state.phase is Phase.ROLLED_BACK:
        return Verdict(variant, Signal.HOLD, "rolled back", evidence)

    half = guardrails.alpha / 2
    if p_error < half:
        return Verdict(
            variant,
            Signal.BREACH,
            f"error rate {window.error_rate:.1%} vs control {control.error_rate:.1%}: higher "
            f"(always-valid p={_fmt_p(p_error)} < {half:g})",
            evidence,
        )
    if p_latency < half:
        return Verdict(
            variant,
            Signal.BREACH,
            f"slow requests (over control's p95 + {guardrails.latency_margin_ms:g} ms) more frequent than on "
            f"control: p99 {_fmt_ms(window.p99_ms)} vs {_fmt_ms(control.p99_ms)} "
            f"(always-valid p={_fmt_p(p_latency)} < {half:g})",
            evidence,
        )
    if window.n >= guardrails.min_samples:
        if window.error_rate > guardrails.max_error_rate:
            return Verdict(
                variant,
                Signal.BREACH,
                f"error rate {window.error_rate:.1%} over {window.n} requests exceeds the guardrail "
                f"{guardrails.max_error_rate:.1%}",
                evidence,
            )
        if guardrails.max_p99_ms is not None and window.p99_ms is not None and window.p99_ms > guardrails.max_p99_ms:
            return Verdict(
                variant,
                Signal.BREACH,
                f"p99 {window.p99_ms:.0f} ms over {window.n} requests exceeds the guardrail "
                f"{guardrails.max_p99_ms:.0f} ms",
                evidence,
            )

    if state.phase is Phase.PROMOTING and rollout is not None:
        waited = now - state.since
        if step.n < guardrails.min_samples:
            return Verdict(
                variant, Signal.HOLD, f"needs {guardrails.min_samples - step.n} more samples on this step", evidence
            )
        if waited < rollout.interval_s:
            return Verdict(variant, Signal.HOLD, f"{rollout.interval_s - waited:.1f} s left on this step", evidence)
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
