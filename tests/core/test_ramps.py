"""Issue 16.9 in the rollout: a raise that would move units between other variants is refused.

With weights {control 21, v1 16, v2 1, v3 62}, raising v1 to 35 moved users from control to v3 (and
from v3 to v1). No stateless layout keeps that ramp monotone (see cohortgate/core/cohorts.py), so
the state machine refuses it: a hold with the reason for the controller's automatic step, 409
`InvalidTransition` naming who would move for an operator's promote. Rollbacks are never refused.
"""

from __future__ import annotations

import pytest

from cohortgate.core import cohorts
from cohortgate.core.policy import parse_policy
from cohortgate.core.rollout import InvalidTransition, Phase, Signal, apply, initial_state

NAMES = ("control", "v1", "v2", "v3")


def route(weights: tuple[int, ...], steps: tuple[int, ...] = (16, 35, 100)):
    lines = [
        "version: 1",
        "jwt: {issuer: i, audience: a, jwks: jwks.json}",
        "routes:",
        "  - name: r",
        "    match: {model: m}",
        "    residency: {default_region: eu}",
        "    variants:",
    ]
    for i, (name, w) in enumerate(zip(NAMES, weights, strict=True)):
        lines.append(
            f"      - {{name: {name}, weight: {w}, backends: [{{url: 'http://127.0.0.1:{9001 + i}', region: eu}}]}}"
        )
    lines.append(f"    rollout: {{variant: v1, steps: {list(steps)}, interval_s: 30}}")
    return parse_policy("\n".join(lines) + "\n").routes[0]


def test_the_findings_ramp_is_held_automatically_and_refused_by_hand():
    r = route((21, 16, 1, 62))
    state = initial_state(r)
    assert state.variants["v1"].phase is Phase.PROMOTING
    after, transition = apply(r, state, "v1", Signal.CLEAN, now=1.0)
    assert after is state and not transition.changed
    assert transition.reason.startswith(
        "raising 'v1' from 16% to 35% would move 19% of all units from 'control' to 'v3', "
        "19% of all units from 'v3' to 'v1'"
    )
    with pytest.raises(InvalidTransition, match=r"cannot promote r/v1: raising 'v1' from 16% to 35% would move"):
        apply(r, state, "v1", Signal.PROMOTE, now=1.0)
    rolled, _ = apply(r, state, "v1", Signal.ROLLBACK, now=1.0)  # lowering is never refused
    assert dict(rolled.weights) == {"control": 37, "v1": 0, "v2": 1, "v3": 62}


def test_a_ramp_that_fits_the_lane_is_taken_and_moves_only_control_units():
    r = route((74, 16, 0, 10), steps=(16, 35, 100))
    state = initial_state(r)
    stepped, transition = apply(r, state, "v1", Signal.CLEAN, now=1.0)
    assert transition.changed and dict(stepped.weights) == {"control": 55, "v1": 35, "v2": 0, "v3": 10}
    assert cohorts.moves([74, 16, 0, 10], [55, 35, 0, 10]) == {(0, 1): 19 * cohorts.PER_PERCENT}
    held, transition = apply(r, stepped, "v1", Signal.CLEAN, now=100.0)  # 100 % would overfill the lane
    assert held is stepped and "would move" in transition.reason
