"""The controller loop in-process: synthetic outcomes -> windows -> verdicts -> state store -> "gateways".

A `Traffic` stand-in assigns users with the real cohort layout of the effective policy, which it
re-reads from the state store exactly as a gateway does, so "its users are back on control" is
checked against the same hashing the gateway uses. Time is simulated (one tick per second).
"""

from __future__ import annotations

import itertools

import pytest

from cohortgate.controller.loop import Controller
from cohortgate.controller.simulate import Behaviour, Traffic
from cohortgate.core.rollout import InvalidTransition, Phase, Signal
from cohortgate.store.events import REPORT, Event, InProcessSink
from cohortgate.store.state import InProcessState, effective_policy
from tests.controller.policies import make_policy


class Sim:
    def __init__(self, policy, behaviours, *, seed=1, force_split=None, store=None, start=1_000.0):
        self.policy = policy
        self.now = start
        self.store = store or InProcessState()
        self.sink = InProcessSink()
        self.controller = Controller(policy, self.store, self.sink, clock=lambda: self.now)
        self.traffic = Traffic(policy, "tabular", behaviours, seed=seed, force_split=force_split)
        self.store.watch(lambda states: self.traffic.set_policy(effective_policy(policy, states)))
        self.changes = []

    async def start(self):
        await self.controller.start()
        self.traffic.set_policy(effective_policy(self.policy, self.store.snapshot()))
        return self

    async def run(self, seconds, rps=200, until=None):
        for _ in range(seconds):
            self.controller.ingest(self.traffic.events(rps, self.now, self.now + 1), self.now)
            self.now += 1
            self.changes += await self.controller.tick()
            if until is not None and until(self):
                return


def canary_phase(sim):
    return sim.controller.states["tabular"].variants["canary"].phase


async def test_canary_failing_30_percent_is_rolled_back_within_300_of_its_requests():
    sim = await Sim(make_policy(), {"control": Behaviour(0.005), "canary": Behaviour(0.30)}).start()
    canary_units = {i for i in range(sim.traffic.population) if sim.traffic._variant_of_unit[i] == 1}
    await sim.run(60, until=lambda s: canary_phase(s) is Phase.ROLLED_BACK)
    assert canary_phase(sim) is Phase.ROLLED_BACK
    served = sim.traffic.served["canary"]
    assert 0 < served <= 300
    # afterwards none of its users reach it, and they are back on control
    await sim.run(20)
    assert sim.traffic.served["canary"] == served
    assert all(sim.traffic._variant_of_unit[i] == 0 for i in canary_units)
    record = (await sim.store.audit("tabular"))[0]
    assert record["action"] == "rollback" and record["variant"] == "canary"
    assert record["weights_after"] == {"control": 100, "canary": 0}
    assert record["evidence"]["p_error"] < 0.025 and record["evidence"]["window"]["errors"] > 0
    assert "error rate" in record["reason"]


async def test_a_canary_that_fails_everything_is_rolled_back_after_a_handful_of_requests():
    sim = await Sim(make_policy(), {"control": Behaviour(0.0), "canary": Behaviour(1.0)}).start()
    await sim.run(10, until=lambda s: canary_phase(s) is Phase.ROLLED_BACK)
    assert canary_phase(sim) is Phase.ROLLED_BACK
    assert sim.traffic.served["canary"] < 50


async def test_a_slow_canary_is_rolled_back_by_the_latency_test():
    sim = await Sim(
        make_policy(max_p99_ms=None),
        {"control": Behaviour(0.0, median_ms=20), "canary": Behaviour(0.0, median_ms=60)},
    ).start()
    await sim.run(60, until=lambda s: canary_phase(s) is Phase.ROLLED_BACK)
    assert canary_phase(sim) is Phase.ROLLED_BACK
    assert "slow requests" in sim.changes[-1].reason


async def test_a_canary_slower_by_less_than_the_margin_is_not_harm():
    # 20 % slower at a 1 ms median: real (thousands of samples show it) but far below the 5 ms margin
    sim = await Sim(
        make_policy(max_p99_ms=None, steps=None),
        {"control": Behaviour(0.0, median_ms=1.0), "canary": Behaviour(0.0, median_ms=1.2)},
    ).start()
    await sim.run(120, rps=400)
    assert canary_phase(sim) is not Phase.ROLLED_BACK, [c.reason for c in sim.changes]


async def test_healthy_canary_is_promoted_through_every_step():
    sim = await Sim(make_policy(interval_s=30), {"control": Behaviour(0.01), "canary": Behaviour(0.01)}).start()
    await sim.run(400, until=lambda s: canary_phase(s) is Phase.PROMOTED)
    assert canary_phase(sim) is Phase.PROMOTED
    steps = [dict(t.weights_after)["canary"] for t in sim.changes]
    assert steps == [25, 50, 100]
    assert [t.action for t in sim.changes] == ["promote"] * 3
    times = [r["ts"] for r in reversed(await sim.store.audit("tabular"))]
    assert all(b - a >= 30 for a, b in itertools.pairwise(times))  # one interval per step at least
    assert dict(sim.controller.states["tabular"].weights) == {"control": 0, "canary": 100}
    before = dict(sim.traffic.served)
    await sim.run(5)
    assert sim.traffic.served.get("control", 0) == before.get("control", 0)  # everyone on the canary now


async def test_broken_split_halts_the_experiment_as_srm():
    policy = make_policy(weights=(50, 50), steps=None)
    sim = await Sim(policy, {}, force_split=[0.6, 0.4]).start()
    await sim.run(30)
    state = sim.controller.states["tabular"]
    assert state.status == "halted"
    halt = [t for t in sim.changes if t.action == "halt"]
    assert len(halt) == 1 and "sample ratio mismatch" in halt[0].reason
    srm = halt[0].evidence["srm"]
    assert srm["mismatch"] and srm["p_chi2"] < 1e-3
    assert sim.controller.status()["routes"]["tabular"]["srm"]["mismatch"]


async def test_aa_split_through_the_loop_neither_halts_nor_rolls_back():
    policy = make_policy(weights=(50, 50), steps=None)
    sim = await Sim(policy, {"control": Behaviour(0.01), "canary": Behaviour(0.01)}, seed=5).start()
    await sim.run(100, rps=200)  # 20 000 requests
    assert sim.changes == []
    assert sim.controller.srm["tabular"]["checked"]


async def test_manual_actions_go_through_the_table_and_the_audit():
    sim = await Sim(make_policy(), {}).start()
    c = sim.controller
    [t] = await c.manual(Signal.PROMOTE, "tabular", "canary", "manual:alice")
    assert dict(t.weights_after) == {"control": 75, "canary": 25}
    await c.manual(Signal.ROLLBACK, "tabular", "canary", "manual:alice")
    with pytest.raises(InvalidTransition):
        await c.manual(Signal.PROMOTE, "tabular", "canary", "manual:alice")
    with pytest.raises(KeyError):
        await c.manual(Signal.ROLLBACK, "nope", "canary", "manual:alice")
    [t] = await c.manual(Signal.RESUME, "tabular", None, "manual:bob")
    assert t.after is Phase.PROMOTING and dict(t.weights_after) == {"control": 90, "canary": 10}
    records = await sim.store.audit("tabular")
    assert [r["actor"] for r in records] == ["manual:bob", "manual:alice", "manual:alice"]
    # each decision records the host's load beside both arms' latencies (issue 17.8: a latency verdict
    # on a starved machine shows it) -- and the evidence carries control's window next to the canary's
    host = records[-1]["host"]
    assert host["cpus"] >= 1 and host["load_1m"] >= 0 and set(host) >= {"load_1m", "load_5m", "load_15m"}


async def test_a_restart_keeps_the_controllers_weights(tmp_path):
    cache = tmp_path / "state.json"
    policy = make_policy()
    sim = await Sim(policy, {"control": Behaviour(0.0), "canary": Behaviour(1.0)}, store=InProcessState(cache)).start()
    await sim.run(10, until=lambda s: canary_phase(s) is Phase.ROLLED_BACK)
    assert canary_phase(sim) is Phase.ROLLED_BACK
    # a new process: the gateway reads the file, and so does a new controller
    store = InProcessState(cache)
    applied = effective_policy(policy, store.snapshot()).by_name["tabular"]
    assert [(v.name, v.weight, v.enabled) for v in applied.variants] == [("control", 100, True), ("canary", 0, False)]
    again = Controller(policy, store, InProcessSink(), clock=lambda: sim.now)
    await again.start()
    assert again.states["tabular"].variants["canary"].phase is Phase.ROLLED_BACK


async def test_shadow_reports_are_joined_with_their_primary_by_request_id():
    sim = await Sim(make_policy(), {}).start()
    events = []
    for i in range(100):
        rid = f"req-{i}"
        digest = "same" if i % 4 else "different"
        events.append(Event(REPORT, "", "control", 200, 10.0, rid, model="tabular", digest="same"))
        events.append(Event(REPORT, "", "challenger", 200, 14.0, rid, model="tabular", digest=digest))
    events.append(Event(REPORT, "", "challenger", 200, 14.0, "lonely", model="tabular", digest="x"))
    events.append(Event(REPORT, "", "mystery", 200, 1.0, "req-1", model="other", digest="x"))
    sim.controller.ingest(events, sim.now)
    shadow = sim.controller.status()["routes"]["tabular"]["shadows"]["challenger"]
    assert shadow["pairs"] == 100 and shadow["agreement"] == 0.75
    assert shadow["latency_delta_ms"]["p50"] == pytest.approx(4.0)
    assert sim.controller.shadows.unmatched == 1


async def test_control_over_the_error_limit_halts_and_alerts_instead_of_rolling_back():
    """Both arms fail 10 % against a 5 % limit: not the canary's fault -- halt, audit, alert, metric."""
    sim = await Sim(make_policy(steps=None), {"control": Behaviour(0.10), "canary": Behaviour(0.10)}).start()
    await sim.run(60)
    assert canary_phase(sim) is Phase.HALTED
    assert [t.action for t in sim.changes] == ["halt"]
    assert sim.changes[0].signal is Signal.CONTROL_BREACH
    record = (await sim.store.audit("tabular"))[0]
    assert record["action"] == "halt" and "control breaches the guardrail" in record["reason"]
    assert record["evidence"]["error_limit"]["p_control_over"] < 0.0125
    route = sim.controller.status()["routes"]["tabular"]
    assert route["status"] == "halted"
    assert route["alert"]["kind"] == "control_breach" and "control breaches" in route["alert"]["reason"]
    assert sim.controller.metrics.actions.labels("tabular", "control", "alert", "controller")._value.get() == 1
    # resumed by an operator: the alert clears, and control must show the breach afresh
    await sim.controller.manual(Signal.RESUME, "tabular", "canary", "alice")
    assert sim.controller.status()["routes"]["tabular"]["alert"] is None
    assert sim.controller.control_tests["tabular"].error_over.n == 0


async def test_a_canary_worse_than_a_breaching_control_is_still_rolled_back():
    sim = await Sim(make_policy(steps=None), {"control": Behaviour(0.10), "canary": Behaviour(0.40)}).start()
    await sim.run(60, until=lambda s: canary_phase(s) is Phase.ROLLED_BACK)
    assert canary_phase(sim) is Phase.ROLLED_BACK
    assert "vs control" in sim.changes[-1].reason


async def test_a_canary_over_the_limit_with_a_healthy_control_is_rolled_back_by_the_guardrail():
    # 12 % vs 1 %: the harm test and the guardrail both see it; either may fire first, and the
    # evidence recorded with the rollback shows control clearly under the limit
    sim = await Sim(make_policy(steps=None), {"control": Behaviour(0.01), "canary": Behaviour(0.12)}).start()
    await sim.run(120, until=lambda s: canary_phase(s) is Phase.ROLLED_BACK)
    assert canary_phase(sim) is Phase.ROLLED_BACK
    ev = sim.changes[-1].evidence
    assert ev["error_limit"]["p_control_under"] < 0.0125  # control is clearly under 5 %


async def test_p99_guardrail_is_a_test_on_the_share_of_slow_requests():
    """Control and canary alike with a p99 just under the limit (sigma 1.0, median 20 ms: p99 ~205 ms
    under a 250 ms limit): the old point estimate rolled back ~80 % of such runs; now nothing happens."""
    same = Behaviour(0.0, median_ms=20.0, sigma=1.0)
    sim = await Sim(make_policy(steps=None, weights=(50, 50)), {"control": same, "canary": same}, seed=3).start()
    await sim.run(120, rps=400)
    assert sim.changes == []
    limits = sim.controller.status()["routes"]["tabular"]["variants"]["canary"]["limits"]
    assert limits["p99"]["p_over"] > 0.0125 and limits["p99"]["p_control_under"] < 0.0125


async def test_an_edited_limit_restarts_the_limit_tests_but_keeps_the_harm_evidence():
    sim = await Sim(make_policy(steps=None), {"control": Behaviour(0.02), "canary": Behaviour(0.04)}).start()
    await sim.run(20)
    tests = sim.controller.tests[("tabular", "canary")]
    harm_p, seen = tests.error.p_value, tests.error_over.n
    assert harm_p < 1.0 and seen > 0
    await sim.controller.set_policy(make_policy(steps=None, max_error_rate=0.03))
    fresh = sim.controller.tests[("tabular", "canary")]
    assert fresh.error.p_value == harm_p and fresh.error_over.n == 0 and fresh.error_over.p0 == 0.03
    assert sim.controller.control_tests["tabular"].error_over.p0 == 0.03
