"""The experiment state machine: table entries, and invariants under any sequence of signals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cohortgate.core import rollout
from cohortgate.core.rollout import InvalidTransition, Phase, RouteState, Signal
from tests.controller.policies import make_policy

POLICY = make_policy(weights=(80, 10, 10), steps=[10, 25, 50])
ROUTE = POLICY.by_name["tabular"]


def test_initial_state_follows_the_policy():
    st0 = rollout.initial_state(ROUTE, now=5.0)
    assert dict(st0.weights) == {"control": 80, "canary": 10, "beta": 10}
    assert st0.variants["canary"].phase is Phase.PROMOTING and st0.variants["canary"].step == 0
    assert st0.variants["beta"].phase is Phase.RUNNING
    assert st0.status == "promoting"


def test_clean_intervals_walk_the_steps_then_promote():
    s = rollout.initial_state(ROUTE)
    seen = []
    for t in range(1, 4):
        s, tr = rollout.apply(ROUTE, s, "canary", Signal.CLEAN, now=float(t))
        seen.append((tr.action, s.variants["canary"].phase, dict(s.weights)))
    assert seen[0] == ("promote", Phase.PROMOTING, {"control": 65, "canary": 25, "beta": 10})
    assert seen[1] == ("promote", Phase.PROMOTED, {"control": 40, "canary": 50, "beta": 10})
    assert seen[2][0] == "hold" and seen[2][1] is Phase.PROMOTED  # no entry: an automatic hold
    assert s.version == 2


def test_breach_rolls_back_and_resume_restarts_from_the_policy_weight():
    s = rollout.initial_state(ROUTE)
    s, _ = rollout.apply(ROUTE, s, "canary", Signal.CLEAN, 1.0)
    s, tr = rollout.apply(ROUTE, s, "canary", Signal.BREACH, 2.0, reason="errors")
    assert tr.action == "rollback" and dict(s.weights) == {"control": 90, "canary": 0, "beta": 10}
    assert s.disabled == {"canary"}
    s, tr = rollout.apply(ROUTE, s, "canary", Signal.RESUME, 3.0)
    assert tr.action == "resume"
    assert s.variants["canary"].phase is Phase.PROMOTING and s.variants["canary"].step == 0
    assert dict(s.weights) == {"control": 80, "canary": 10, "beta": 10}


def test_srm_halts_and_resume_returns_to_the_phase_it_left():
    s = rollout.initial_state(ROUTE)
    s, tr = rollout.apply(ROUTE, s, "beta", Signal.SRM, 1.0)
    assert tr.action == "halt" and s.status == "halted"
    s, tr = rollout.apply(ROUTE, s, "beta", Signal.CLEAN, 2.0)
    assert tr.action == "hold"  # no promotion while halted
    s, _ = rollout.apply(ROUTE, s, "beta", Signal.RESUME, 3.0)
    assert s.variants["beta"].phase is Phase.RUNNING and s.variants["beta"].resume_to is None


@pytest.mark.parametrize("phase_signal", [None, Signal.CLEAN])
def test_control_breach_halts_keeps_the_weights_and_a_second_one_is_a_hold(phase_signal):
    s = rollout.initial_state(ROUTE)
    if phase_signal is not None:
        s, _ = rollout.apply(ROUTE, s, "canary", phase_signal, 0.5)
    weights = dict(s.weights)
    phase = s.variants["canary"].phase
    s, tr = rollout.apply(ROUTE, s, "canary", Signal.CONTROL_BREACH, 1.0, "control over 5 %")
    assert tr.action == "halt" and s.variants["canary"].phase is Phase.HALTED
    assert dict(s.weights) == weights and s.variants["canary"].resume_to is phase
    s2, tr = rollout.apply(ROUTE, s, "canary", Signal.CONTROL_BREACH, 2.0)
    assert tr.action == "hold" and s2 is s
    s, tr = rollout.apply(ROUTE, s, "canary", Signal.RESUME, 3.0)
    assert s.variants["canary"].phase is phase


def test_a_breach_wins_over_a_halt():
    s = rollout.initial_state(ROUTE)
    s, _ = rollout.apply(ROUTE, s, "canary", Signal.SRM, 1.0)
    s, tr = rollout.apply(ROUTE, s, "canary", Signal.BREACH, 2.0)
    assert tr.action == "rollback" and s.variants["canary"].phase is Phase.ROLLED_BACK


def test_manual_signals_that_make_no_sense_raise():
    s = rollout.initial_state(ROUTE)
    with pytest.raises(InvalidTransition):
        rollout.apply(ROUTE, s, "canary", Signal.RESUME, 1.0)
    with pytest.raises(InvalidTransition):
        rollout.apply(ROUTE, s, "control", Signal.ROLLBACK, 1.0)
    s, _ = rollout.apply(ROUTE, s, "canary", Signal.ROLLBACK, 1.0)
    with pytest.raises(InvalidTransition):
        rollout.apply(ROUTE, s, "canary", Signal.PROMOTE, 2.0)


def test_manual_promote_without_a_rollout_takes_controls_share():
    s = rollout.initial_state(ROUTE)
    s, tr = rollout.apply(ROUTE, s, "beta", Signal.PROMOTE, 1.0)
    assert tr.action == "promote" and dict(s.weights) == {"control": 0, "canary": 10, "beta": 90}


def test_state_round_trips_through_json():
    s = rollout.initial_state(ROUTE, 1.0)
    s, _ = rollout.apply(ROUTE, s, "beta", Signal.SRM, 2.0, reason="srm")
    assert RouteState.from_json(s.to_json()) == s


def test_reconcile_fits_a_stored_state_to_a_changed_policy():
    two = make_policy(weights=(90, 10))
    stored = rollout.initial_state(two.by_name["tabular"])
    stored, _ = rollout.apply(two.by_name["tabular"], stored, "canary", Signal.ROLLBACK, 1.0)
    fitted = rollout.reconcile(ROUTE, stored)  # a new variant `beta` appeared: weights no longer sum to 100
    assert dict(fitted.weights) == {"control": 80, "canary": 10, "beta": 10}
    assert fitted.version > stored.version
    same = rollout.reconcile(two.by_name["tabular"], stored)
    assert same is stored


signals = st.lists(
    st.tuples(st.sampled_from(["canary", "beta"]), st.sampled_from(list(Signal))), min_size=1, max_size=40
)


@settings(max_examples=200, deadline=None)
@given(signals)
def test_any_signal_sequence_leaves_a_valid_state(seq):
    s = rollout.initial_state(ROUTE)
    for t, (variant, signal) in enumerate(seq):
        before = s
        try:
            s, tr = rollout.apply(ROUTE, s, variant, signal, float(t))
        except InvalidTransition:
            assert signal in rollout.MANUAL
            continue
        assert sum(s.weights.values()) == 100 and all(w >= 0 for w in s.weights.values())
        for name, vs in s.variants.items():
            if vs.phase is Phase.ROLLED_BACK:
                assert s.weights[name] == 0
            assert -1 <= vs.step < len(ROUTE.rollout.steps)
            assert (vs.resume_to is not None) == (vs.phase is Phase.HALTED)
        assert s.version == before.version + (1 if tr.changed else 0)
