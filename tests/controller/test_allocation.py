"""The controller's bandit, end to end through its own code: decide() assigns and pins each unit, the
outcome ledger tallies rewards, `Controller.tick` recomputes the weights every ``update_s``.

The demo route (policies/bandit.yaml) has three arms converting at 4 %, 6 % and 12 %; 80 % of the
requests come from new users, 20 % from returning ones who echo their assignment note.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cohortgate.controller.loop import Controller
from cohortgate.core import rollout, sticky
from cohortgate.core.decide import Facts, decide
from cohortgate.core.policy import Policy, load_policy
from cohortgate.core.rollout import Phase, Signal
from cohortgate.dashboard.view import allocation_view
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState

ROOT = Path(__file__).resolve().parents[2]
APP = "spiffe://cohortgate.local/app-demo"
KEYS = (sticky.sticky_key(b"allocation-test-key-0123456789"),)
RATES = {"control": 0.04, "canary": 0.06, "challenger": 0.12}
REQUESTS_PER_UPDATE = 200  # requests between two updates (update_s = 10 s of simulated time)
WITHIN = 4_000  # the stated number of requests: by then most new units go to the best arm


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def serving(controller: Controller) -> Policy:
    """What a gateway serves: the policy with the controller's published weights applied."""
    st = controller.states["ranker"]
    return controller.policy.with_weights({"ranker": dict(st.weights)}, {"ranker": st.disabled})


def request(policy: Policy, unit: str, note: str | None) -> tuple[str, str, str]:
    claims = {"sub": unit, "residency": "eu", "scope": "predict"}
    d = decide(policy, Facts("POST", "/v2/models/ranker/infer", {}, APP, claims, f"r-{unit}", note, KEYS))
    assert d.allowed
    return d.variant, d.sticky, d.assignment  # type: ignore[return-value]


async def run(controller: Controller, clock: Clock, requests: int, seed: int = 7, breach: str | None = None):
    """Drive ``requests`` requests; return (per-update shares of new units, units' arms, switches)."""
    rng = np.random.default_rng(seed)
    ledger = controller.outcomes.ledger
    arms: dict[str, str] = {}
    notes: dict[str, str] = {}
    switches = 0
    shares = []
    new_in_update: list[str] = []
    for i in range(requests):
        policy = serving(controller)
        returning = bool(arms) and rng.random() < 0.2
        unit = list(arms)[int(rng.integers(len(arms)))] if returning else f"user-{len(arms)}"
        variant, note, how = request(policy, unit, notes.get(unit))
        if unit in arms:
            switches += variant != arms[unit]
            assert how == "sticky"
        else:
            new_in_update.append(variant)
        arms[unit], notes[unit] = variant, note
        rid = f"{unit}-{i}"
        ledger.ingest(
            {"kind": "exposure", "route": "ranker", "variant": variant, "unit": unit, "t": clock.now, "request_id": rid}
        )
        if rng.random() < RATES[variant]:
            ledger.ingest({"kind": "outcome", "metric": "conversion", "value": 1, "request_id": rid, "t": clock.now})
        if (i + 1) % REQUESTS_PER_UPDATE == 0:
            shares.append({a: new_in_update.count(a) / max(1, len(new_in_update)) for a in RATES})
            new_in_update = []
            clock.now += 10.0
            await controller.tick()
    return shares, arms, switches


@pytest.fixture
def controller() -> tuple[Controller, Clock]:
    clock = Clock()
    policy = load_policy(ROOT / "policies" / "bandit.yaml")
    return Controller(policy, InProcessState(), InProcessSink(), clock=clock), clock


async def test_the_bandit_moves_new_units_to_the_best_arm_and_nobody_switches(controller):
    ctl, clock = controller
    await ctl.start()
    shares, arms, switches = await run(ctl, clock, WITHIN)
    weights = dict(ctl.states["ranker"].weights)
    assert switches == 0  # returning users always kept their first arm
    assert max(weights, key=weights.__getitem__) == "challenger" and weights["challenger"] >= 70
    assert min(weights.values()) >= 5  # min_share keeps every arm exploring
    assert shares[-1]["challenger"] >= 0.6  # the last update's new units went mostly to the best arm
    assert shares[0]["challenger"] < 0.5  # and they did not at the start
    report = ctl.status()["routes"]["ranker"]["allocation"]
    assert report["weights"] == weights and len(report["history"]) == WITHIN // REQUESTS_PER_UPDATE
    assert "need weighting" in report["weighting"]
    view = allocation_view(report)  # the dashboard's panel: weights per arm over the last updates
    assert view is not None and len(view["times"]) == 12
    assert [row[0] for row in view["over_time"]] == list(RATES) and view["over_time"][2][-1] == weights["challenger"]
    est = report["estimates"]
    assert est["challenger"]["mean_ipw"] > est["control"]["mean_ipw"]
    assert sum(e["units"] for e in est.values()) == len(arms)
    audit = [r for r in await ctl.store.audit("ranker", 1000) if r["action"] == "allocate"]
    assert audit and audit[0]["weights_after"] == weights  # newest first: the weights now served
    stored = (await ctl.store.load())["ranker"]
    assert dict(stored.weights) == weights and stored.updated_by.startswith("allocation:")


async def test_a_rolled_back_arm_stays_at_zero_and_its_units_move(controller):
    ctl, clock = controller
    await ctl.start()
    _, arms, _ = await run(ctl, clock, 600)
    await ctl.manual(Signal.ROLLBACK, "ranker", "canary", "operator")
    clock.now += 10.0
    await ctl.tick()
    st = ctl.states["ranker"]
    assert st.weights["canary"] == 0 and st.variants["canary"].phase is Phase.ROLLED_BACK
    assert sum(st.weights.values()) == 100 and st.weights["control"] >= 5 and st.weights["challenger"] >= 5
    policy = serving(ctl)
    for unit, arm in arms.items():
        note = sticky.mint(KEYS[0], "ranker", "ranker-bandit-2026-11", unit, arm)
        variant, _, _ = request(policy, unit, note)
        assert variant != "canary"
        if arm != "canary":
            assert variant == arm


async def test_a_halted_route_freezes_its_weights(controller):
    ctl, clock = controller
    await ctl.start()
    await run(ctl, clock, 400)
    before = dict(ctl.states["ranker"].weights)
    st, _ = rollout.apply(ctl.policy.by_name["ranker"], ctl.states["ranker"], "canary", Signal.SRM, clock.now)
    ctl.states["ranker"] = st
    await run(ctl, clock, 400, seed=8)
    assert dict(ctl.states["ranker"].weights) == before
    assert "halted" in ctl.status()["routes"]["ranker"]["allocation"]["held"]
