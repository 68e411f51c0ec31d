"""The demo's outcome story, through the controller's own code: `make demo` picks a winner and a loser.

`up --demo` plants conversion rates on policies/example.yaml's ``shop`` route
(`cohortgate.local.shoppers.demo_outcomes`) and `cohortgate traffic` plays the shoppers. Here the
same shoppers (the same ids, the same keyed-hash conversions) are assigned by the route's own cohort
hashing at the weights the rollout table sets, their outcomes go in as exposure tokens minted and
verified with a real key, and every simulated second the controller's `OutcomeGate` looks, the pure
`judge` decides and `rollout.apply` acts -- what `Controller.tick` does each interval. Time here is
the simulation's (visits at the demo's rate), never the wall clock: the integration test
(tests/integration/test_demo_outcomes.py) runs the real stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cohortgate.controller.gating import OutcomeGate
from cohortgate.controller.judge import Evidence, judge
from cohortgate.controller.windows import Summary
from cohortgate.core import cohorts
from cohortgate.core.exposure import mint, parse_keys
from cohortgate.core.policy import load_policy
from cohortgate.core.rollout import Phase, Signal, apply, initial_state
from cohortgate.local.shoppers import DEMO_VISITORS_RPS, converts, demo_outcomes, outcome_for, visitor

EXAMPLE = Path(__file__).resolve().parents[2] / "policies" / "example.yaml"
DEMO_SEED = 1  # `cohortgate traffic`'s default seed: what `make demo` runs
BUDGET_S = 300  # the README promises decisions within ~3 minutes at the demo's rate; 5 simulated minutes at most
HEALTHY = Summary(10_000, 0, 20.0, 30.0, 40.0)  # no harm: only the outcome metrics decide


def run_demo(seed: int, budget_s: int = BUDGET_S) -> dict[str, dict[str, Any]]:
    """Each challenger's decision: action, reason, evidence and the simulated second it came at."""
    policy = load_policy(EXAMPLE)
    found = demo_outcomes(policy)
    assert found is not None
    name, demo = found
    route = policy.by_name[name]
    keys = parse_keys("the-demo-exposure-key-for-this-test")
    now = [1_790_000_000.0]
    gate = OutcomeGate(policy, keys, clock=lambda: now[0])
    state = initial_state(route, now[0])
    decided: dict[str, dict[str, Any]] = {}
    n = 0
    for second in range(1, budget_s + 1):
        now[0] += 1.0
        weights = [state.weights[v.name] for v in route.variants]
        for _ in range(int(demo.rps)):
            n += 1
            who = visitor(seed, n)
            variant = route.variants[cohorts.assign(weights, route.salt_key, who)].name
            token = mint(keys[0], name, variant, f"u{n:x}", now[0])
            record = outcome_for(demo, seed, who, variant, token)
            assert record is not None
            assert gate.ledger.ingest(record) == "accepted"
        gate.look(name)
        for v in route.variants[1:]:
            if v.name in decided:
                continue
            rollout = route.rollout if route.rollout and route.rollout.variant == v.name else None
            ev = gate.with_outcomes(name, v.name, Evidence(window=HEALTHY, step=HEALTHY, control=HEALTHY))
            verdict = judge(v.name, state.variants[v.name], route.guardrails, rollout, now[0], ev)
            if verdict.signal not in (Signal.WIN, Signal.LOSS):
                continue
            state, t = apply(route, state, v.name, verdict.signal, now[0], verdict.reason, verdict.evidence)
            decided[v.name] = {
                "action": t.action,
                "phase": t.after,
                "reason": t.reason,
                "evidence": t.evidence,
                "second": second,
                "weights": dict(state.weights),
            }
        audit = gate.decisions(name, now[0], "controller:test", policy.digest)
        for record in audit:
            decided.setdefault(f"outcome:{record['variant']}", record)
        if all(v.name in decided for v in route.variants[1:]):
            break
    return decided


def test_the_demo_plants_a_winner_and_a_loser_on_the_shop_route():
    found = demo_outcomes(load_policy(EXAMPLE))
    assert found is not None
    route, demo = found
    assert route == "shop" and demo.model == "shop" and demo.metric == "conversion"
    assert demo.rates == {"control": 0.10, "big-images": 0.15, "small-images": 0.05}
    assert demo.rps == DEMO_VISITORS_RPS


def test_conversions_are_a_keyed_hash_of_seed_and_visitor_at_the_planted_rate():
    ids = [visitor(DEMO_SEED, n) for n in range(20_000)]
    first = [converts(DEMO_SEED, who, 0.10) for who in ids]
    assert first == [converts(DEMO_SEED, who, 0.10) for who in ids]  # the same seed, the same shoppers
    assert first != [converts(DEMO_SEED + 1, who, 0.10) for who in ids]
    assert 0.09 < sum(first) / len(ids) < 0.11  # 10 % within about 4.7 standard errors
    # a visitor who converts at 5 % also converts at 15 % (one uniform draw per visitor)
    assert all(converts(DEMO_SEED, w, 0.15) for w in ids if converts(DEMO_SEED, w, 0.05))


@pytest.mark.parametrize("seed", [DEMO_SEED, 2, 3, 4])
def test_the_winner_is_promoted_and_the_loser_rolled_back_on_conversion(seed):
    decided = run_demo(seed)
    win, loss = decided.get("big-images"), decided.get("small-images")
    assert win is not None and loss is not None, f"undecided within {BUDGET_S} simulated s: {sorted(decided)}"
    assert win["action"] == "promote" and win["phase"] is Phase.PROMOTED
    assert loss["action"] == "rollback" and loss["phase"] is Phase.ROLLED_BACK
    assert "primary metric worse than control: conversion" in loss["reason"]
    for d, verdict in ((win, "win"), (loss, "loss")):  # the evidence names the metric and its verdict
        (metric,) = d["evidence"]["outcomes"]
        assert (metric["metric"], metric["verdict"]) == ("conversion", verdict)
    # in either order the end is the same: the winner on the rollout's last step, control the holdout
    last = max((win, loss), key=lambda d: d["second"])
    assert last["weights"] == {"control": 40, "big-images": 60, "small-images": 0}
    # and the timeline has the metric's own records
    assert decided["outcome:big-images"]["metric"] == decided["outcome:small-images"]["metric"] == "conversion"
    assert (decided["outcome:big-images"]["to"], decided["outcome:small-images"]["to"]) == ("win", "loss")
