"""The pure verdict: precedence, the alpha split at its exact boundaries, and the control-breach rule."""

from __future__ import annotations

import dataclasses

import pytest

from cohortgate.controller.judge import Evidence, LimitEvidence, alpha_split, judge, srm_verdicts
from cohortgate.controller.windows import Summary
from cohortgate.core.policy import Guardrails, Rollout
from cohortgate.core.rollout import Phase, RouteState, Signal, VariantState

ALPHA = 0.05
GUARD = Guardrails(max_error_rate=0.05, max_p99_ms=250.0, min_samples=200, alpha=ALPHA)
SUMMARY = Summary(1000, 10, 20.0, 40.0, 60.0)
RUNNING = VariantState(Phase.RUNNING)


def evidence(**kw) -> Evidence:
    err = {k[4:]: v for k, v in kw.items() if k.startswith("err_")}
    p99 = {k[4:]: v for k, v in kw.items() if k.startswith("p99_")}
    rest = {k: v for k, v in kw.items() if not k.startswith(("err_", "p99_"))}
    return Evidence(
        window=SUMMARY,
        step=SUMMARY,
        control=SUMMARY,
        error_limit=LimitEvidence(0.05, 0.05, **err),
        p99_limit=LimitEvidence(250.0, 0.01, **p99),
        **rest,
    )


def verdict(ev: Evidence, state: VariantState = RUNNING, rollout: Rollout | None = None, now: float = 0.0):
    return judge("canary", state, GUARD, rollout, now, ev)


def test_the_alpha_split_spends_exactly_alpha_on_four_tests():
    s = alpha_split(ALPHA)
    assert s.harm_error == s.harm_latency == s.limit_error == s.limit_p99 == pytest.approx(ALPHA / 4)
    assert s.harm_error + s.harm_latency + s.limit_error + s.limit_p99 == pytest.approx(ALPHA)


@pytest.mark.parametrize("field", ["p_error", "p_latency"])
def test_a_harm_test_breaches_just_below_its_share_and_holds_just_above_it(field):
    """The boundary is alpha/4 exactly: a verdict at alpha/2 or alpha*2 (a 2x or 8x looser test) fails here."""
    share = ALPHA / 4
    assert verdict(evidence(**{field: share * 0.999})).signal is Signal.BREACH
    for p in (share * 1.001, share * 1.5, ALPHA / 2 * 0.99, ALPHA * 0.99):
        v = verdict(evidence(**{field: p}))
        assert v.signal is Signal.HOLD and v.reason == "healthy", (p, v.reason)


@pytest.mark.parametrize("g", ["err", "p99"])
def test_a_guardrail_rolls_back_only_when_the_canary_is_over_and_control_is_under(g):
    share = ALPHA / 4
    over = verdict(evidence(**{f"{g}_p_over": share * 0.99, f"{g}_p_control_under": share * 0.99}))
    assert over.signal is Signal.BREACH and "exceeds the guardrail" in over.reason
    # control not clearly under the limit: not the canary's fault (yet) -- hold and say why
    unsure = verdict(evidence(**{f"{g}_p_over": share * 0.99, f"{g}_p_control_under": 0.5}))
    assert unsure.signal is Signal.HOLD and "not clearly under" in unsure.reason
    # the canary's evidence just above its share: nothing
    weak = verdict(evidence(**{f"{g}_p_over": share * 1.01, f"{g}_p_control_under": 1e-9}))
    assert weak.signal is Signal.HOLD and weak.reason == "healthy"


@pytest.mark.parametrize("g", ["err", "p99"])
def test_control_over_the_limit_halts_instead_of_rolling_back(g):
    share = ALPHA / 4
    v = verdict(evidence(**{f"{g}_p_over": 1e-9, f"{g}_p_control_over": share * 0.99}))
    assert v.signal is Signal.CONTROL_BREACH and "control breaches the guardrail" in v.reason
    assert verdict(evidence(**{f"{g}_p_control_over": share * 1.01})).signal is Signal.HOLD
    halted = VariantState(Phase.HALTED, reason="control breaches ...")
    again = verdict(evidence(**{f"{g}_p_control_over": 1e-9}), state=halted)
    assert again.signal is Signal.HOLD  # already halted: no second alert


def test_a_canary_significantly_worse_than_control_is_rolled_back_even_when_control_breaches():
    v = verdict(evidence(p_error=1e-6, err_p_control_over=1e-9, err_p_over=1e-9))
    assert v.signal is Signal.BREACH and "vs control" in v.reason
    halted = VariantState(Phase.HALTED)
    assert verdict(evidence(p_error=1e-6), state=halted).signal is Signal.BREACH


def test_promotion_needs_samples_and_time_but_guardrails_need_neither():
    ro = Rollout("canary", (10, 50, 100), 30.0)
    promoting = VariantState(Phase.PROMOTING, step=0, since=0.0)
    few = dataclasses.replace(evidence(), step=Summary(10, 0, 1.0, 1.0, 1.0))
    assert "more samples" in verdict(few, promoting, ro, now=100.0).reason
    assert "s left" in verdict(evidence(), promoting, ro, now=10.0).reason
    assert verdict(evidence(), promoting, ro, now=30.0).signal is Signal.CLEAN
    tiny = dataclasses.replace(evidence(p_error=1e-4), window=Summary(5, 5, 1.0, 1.0, 1.0))
    assert verdict(tiny, promoting, ro, now=1.0).signal is Signal.BREACH


def test_a_rolled_back_variant_is_left_alone():
    v = verdict(evidence(p_error=1e-9, err_p_control_over=1e-9), state=VariantState(Phase.ROLLED_BACK))
    assert v.signal is Signal.HOLD and v.reason == "rolled back"


def test_srm_halts_every_active_challenger_and_nothing_without_a_mismatch():
    state = RouteState(
        "r",
        {"control": 80, "a": 10, "b": 10},
        {"a": VariantState(Phase.RUNNING), "b": VariantState(Phase.ROLLED_BACK)},
    )
    srm = {"mismatch": True, "counts": [1, 2], "weights": [1, 1], "chi2": 9.0, "p_chi2": 1e-4, "p_always_valid": 1e-4}
    assert [(v.variant, v.signal) for v in srm_verdicts(["a", "b"], state, srm)] == [("a", Signal.SRM)]
    assert srm_verdicts(["a", "b"], state, {**srm, "mismatch": False}) == []
