"""Outcome metrics gate the rollout (issue 19): the judge's rules, the controller's tick, the API.

A step advances only when every guardrail metric is non-inferior; a primary loss or an inferior
guardrail rolls back; a primary win promotes to the last step when ``promote_on_win`` says so; an
inconclusive guardrail holds the step and is never a win. Each decision is audited with its
evidence (metric, lift, interval, units).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from cohortgate.controller.api import make_app
from cohortgate.controller.gating import OutcomeGate
from cohortgate.controller.judge import Evidence, OutcomeEvidence, judge
from cohortgate.controller.loop import Controller
from cohortgate.controller.windows import Summary
from cohortgate.core import rollout
from cohortgate.core.errors import PolicyError
from cohortgate.core.exposure import mac_key, mint
from cohortgate.core.policy import parse_policy
from cohortgate.core.rollout import Phase, Signal, VariantState
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState

TOKEN = "gating-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "gating-test-key-0123456789abcdef"
KEY = mac_key(SECRET.encode())


def policy_text(promote_on_win: bool = False, planned: int = 600, metrics: bool = True) -> str:
    text = f"""
version: 1
jwt: {{issuer: https://auth.test, audience: test, jwks: jwks.json}}
routes:
  - name: shop
    match: {{path_prefix: /v2/models/shop}}
    variants:
      - {{name: control, weight: 90, backends: [{{url: "http://127.0.0.1:9", region: eu}}]}}
      - {{name: canary, weight: 10, backends: [{{url: "http://127.0.0.1:9", region: eu}}]}}
    guardrails: {{min_samples: 10, max_p99_ms: null}}
    rollout: {{variant: canary, steps: [10, 50, 100], interval_s: 1, promote_on_win: {str(promote_on_win).lower()}}}
"""
    if metrics:
        text += f"""    metrics:
      - {{name: conversion, kind: binary, role: primary, planned_units: {planned}}}
      - {{name: revenue, kind: mean, role: guardrail, margin: 0.05, planned_units: {planned}}}
      - {{name: clicks, kind: mean, role: secondary, planned_units: {planned}}}
"""
    return (
        text
        + """  - name: outcomes
    kind: outcomes
    match: {path_prefix: /v1/outcomes, methods: [POST]}
    variants:
      - {name: controller, weight: 100, backends: [{url: "http://127.0.0.1:9480", region: eu}]}
"""
    )


def policy(**kwargs):
    return parse_policy(policy_text(**kwargs), filename="gating-test.yaml", base_dir=Path("/tmp"))


# ---------------------------------------------------------------------- the policy option


def test_promote_on_win_needs_a_primary_metric():
    text = policy_text(promote_on_win=True, metrics=False)
    with pytest.raises(PolicyError) as err:
        parse_policy(text, filename="gating-test.yaml", base_dir=Path("/tmp"))
    message = str(err.value)
    assert "promote_on_win needs a primary metric" in message
    assert "gating-test.yaml:" in message  # with its position
    assert policy(promote_on_win=True).by_name["shop"].rollout.promote_on_win is True
    assert policy().by_name["shop"].rollout.promote_on_win is False


# ---------------------------------------------------------------------- the judge's rules (pure)

HEALTHY = Summary(500, 0, 20.0, 30.0, 40.0)


def outcome(metric: str, role: str, verdict: str, lo: float = -0.1, hi: float = 0.1) -> OutcomeEvidence:
    return OutcomeEvidence(
        metric,
        role,
        verdict,
        (lo + hi) / 2,
        (lo, hi),
        800,
        600,
        f"{verdict} reason",
        0.05 if role == "guardrail" else None,
    )


def decide(*outcomes: OutcomeEvidence, promote_on_win: bool = False, phase: Phase = Phase.PROMOTING):
    route = policy(promote_on_win=promote_on_win).by_name["shop"]
    ev = Evidence(window=HEALTHY, step=HEALTHY, control=HEALTHY, outcomes=outcomes)
    state = VariantState(phase, 0, since=0.0)
    return route, judge("canary", state, route.guardrails, route.rollout, 100.0, ev)


def test_a_step_waits_for_every_guardrail_metric_to_be_non_inferior():
    _, v = decide(outcome("conversion", "primary", "pending"), outcome("revenue", "guardrail", "pending"))
    assert v.signal is Signal.HOLD
    assert "guardrail metric revenue not yet shown non-inferior by 0.05" in v.reason
    _, v = decide(outcome("conversion", "primary", "pending"), outcome("revenue", "guardrail", "non_inferior"))
    assert v.signal is Signal.CLEAN
    _, v = decide()  # a route without metrics: the harm tests alone decide, as before
    assert v.signal is Signal.CLEAN


def test_an_inconclusive_guardrail_holds_the_step_and_is_never_a_win():
    _, v = decide(
        outcome("conversion", "primary", "win", 0.01, 0.2),
        outcome("revenue", "guardrail", "inconclusive"),
        promote_on_win=True,
    )
    assert v.signal is Signal.HOLD
    assert "inconclusive at its planned units" in v.reason and "an operator promotes or rolls back" in v.reason
    _, v = decide(outcome("conversion", "primary", "inconclusive"), outcome("revenue", "guardrail", "non_inferior"))
    assert v.signal is Signal.CLEAN  # an inconclusive primary only reports: the step's own rules apply


@pytest.mark.parametrize(
    ("metric", "role", "verdict", "rolls_back"),
    [
        ("conversion", "primary", "loss", True),
        ("revenue", "guardrail", "inferior", True),
        ("clicks", "secondary", "loss", False),  # secondaries are reported, never acted on
        ("revenue", "guardrail", "loss", False),  # worse, but within the margin: not a rollback
    ],
)
def test_a_primary_loss_or_an_inferior_guardrail_rolls_back(metric, role, verdict, rolls_back):
    route, v = decide(outcome(metric, role, verdict, -0.3, -0.1), phase=Phase.RUNNING)
    assert (v.signal is Signal.LOSS) is rolls_back
    if rolls_back:
        assert metric in v.reason and "[-30.00%, -10.00%]" in v.reason
        state, t = rollout.apply(route, rollout.initial_state(route), "canary", v.signal, 100.0, v.reason)
        assert state.variants["canary"].phase is Phase.ROLLED_BACK and state.weights["canary"] == 0
        assert t.action == "rollback"


def test_a_primary_win_promotes_to_the_last_step_only_when_the_policy_says_so():
    wins = (outcome("conversion", "primary", "win", 0.05, 0.4), outcome("revenue", "guardrail", "non_inferior"))
    route, v = decide(*wins, promote_on_win=True)
    assert v.signal is Signal.WIN and "straight to 100%" in v.reason
    state, t = rollout.apply(route, rollout.initial_state(route), "canary", v.signal, 100.0, v.reason)
    assert state.variants["canary"].phase is Phase.PROMOTED and dict(state.weights) == {"control": 0, "canary": 100}
    assert t.action == "promote"
    _, v = decide(*wins, promote_on_win=False)
    assert v.signal is Signal.CLEAN  # one step at a time, as without metrics
    _, v = decide(wins[0], outcome("revenue", "guardrail", "pending"), promote_on_win=True)
    assert v.signal is Signal.HOLD and "primary metric wins" in v.reason


def test_win_and_loss_follow_the_transition_table():
    assert rollout.TABLE[(Phase.PROMOTING, Signal.WIN)] == (Phase.PROMOTED, rollout.Effect.LAST)
    for phase in (Phase.RUNNING, Phase.PROMOTING, Phase.PROMOTED, Phase.HALTED):
        assert rollout.TABLE[(phase, Signal.LOSS)] == (Phase.ROLLED_BACK, rollout.Effect.ZERO)
    assert (Phase.RUNNING, Signal.WIN) not in rollout.TABLE  # no rollout, nothing to promote along


# ---------------------------------------------------------------------- through the controller's tick


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def feed_requests(controller: Controller, n: int = 40) -> None:
    """Healthy requests, 90/10 like the weights, so the harm side of the judge lets the step advance."""
    variant = np.array([0] * 9 * n + [1] * n)
    controller.ingest_block(
        "shop", variant, np.full(10 * n, 200), np.full(10 * n, 20.0), [f"r{i}" for i in range(10 * n)]
    )


def outcome_records(
    n: int, conv: tuple[float, float], revenue: tuple[float, float], seed: int = 0, prefix: str = "u", sd: float = 0.1
) -> list[dict]:
    """Exposures and outcomes (by request id) for ``n`` units per arm: control's rates first."""
    rng = np.random.default_rng(seed)
    out = []
    for arm, variant in enumerate(("control", "canary")):
        for i in range(n):
            rid = f"{prefix}-{variant}-{i}"
            out.append(
                {"kind": "exposure", "route": "shop", "variant": variant, "unit": rid, "t": 1.0, "request_id": rid}
            )
            if rng.random() < conv[arm]:
                out.append({"kind": "outcome", "metric": "conversion", "value": 1, "request_id": rid, "t": 2.0})
            out.append(
                {
                    "kind": "outcome",
                    "metric": "revenue",
                    "value": revenue[arm] + rng.normal(0, sd),
                    "request_id": rid,
                    "t": 2.0,
                }
            )
    return out


async def controller_for(clock: Clock, **kwargs) -> Controller:
    sink = InProcessSink()
    await sink.start()
    c = Controller(policy(**kwargs), InProcessState(), sink, clock=clock)
    await c.start()
    return c


async def test_the_tick_holds_a_step_until_the_guardrail_metric_is_non_inferior():
    clock = Clock()
    c = await controller_for(clock)
    clock.t += 5
    feed_requests(c)
    # revenue noisy enough that 5 % non-inferiority is not yet shown on 100 units per arm
    c.outcomes.ledger.ingest_many(outcome_records(100, (0.3, 0.3), (10.0, 10.0), sd=5.0))
    assert await c.tick() == []
    verdict = c.verdicts[("shop", "canary")]
    assert verdict.signal is Signal.HOLD and "guardrail metric revenue not yet shown non-inferior" in verdict.reason
    assert c.states["shop"].weights["canary"] == 10

    # a tight revenue (low spread) on many more units: non-inferior, and the step advances
    c.outcomes.ledger.ingest_many(outcome_records(600, (0.3, 0.3), (10.0, 10.0), seed=1, prefix="v"))
    clock.t += 5
    feed_requests(c)
    changes = await c.tick()
    assert [(t.signal, t.after) for t in changes] == [(Signal.CLEAN, Phase.PROMOTING)]
    assert c.states["shop"].weights["canary"] == 50
    audit = await c.store.audit("shop")
    outcomes = [a for a in audit if a["action"] == "outcome"]
    assert {(a["metric"], a["to"]) for a in outcomes} >= {("revenue", "non_inferior")}
    step = next(a for a in audit if a["action"] == "promote")
    revenue = next(o for o in step["evidence"]["outcomes"] if o["metric"] == "revenue")
    assert revenue["verdict"] == "non_inferior" and revenue["units"] > 1000
    assert revenue["interval"][0] > -0.05  # the evidence: the interval rules out "worse by 5 %"


async def test_the_tick_rolls_back_on_a_primary_loss_with_its_evidence_audited():
    clock = Clock()
    c = await controller_for(clock)
    c.outcomes.ledger.ingest_many(outcome_records(300, (0.5, 0.1), (10.0, 10.0)))
    changes = await c.tick()
    assert [(t.signal, t.action) for t in changes] == [(Signal.LOSS, "rollback")]
    assert c.states["shop"].weights == {"control": 100, "canary": 0}
    audit = await c.store.audit("shop")
    rollback = next(a for a in audit if a["action"] == "rollback")
    assert rollback["signal"] == "loss" and "primary metric worse than control: conversion" in rollback["reason"]
    conv = next(o for o in rollback["evidence"]["outcomes"] if o["metric"] == "conversion")
    assert conv["verdict"] == "loss" and conv["lift"] < -0.5 and conv["interval"][1] < 0 and conv["units"] == 600
    decided = next(a for a in audit if a["action"] == "outcome" and a["metric"] == "conversion")
    assert decided["from"] == "pending" and decided["to"] == "loss"
    assert decided["evidence"]["outcome"]["units"] == {"challenger": 300, "control": 300}
    assert c.status()["routes"]["shop"]["outcomes"]["metrics"]

    # an operator resumes it: the outcome experiment starts afresh instead of rolling back at once
    await c.manual(Signal.RESUME, "shop", "canary", "operator:test")
    assert c.states["shop"].variants["canary"].phase is Phase.PROMOTING
    assert await c.tick() == []
    assert {r.metric: r.units_challenger for r in c.outcomes.latest["shop"]} == {}  # no canary tallies yet
    c.outcomes.ledger.ingest_many(outcome_records(300, (0.3, 0.3), (10.0, 10.0), seed=5, prefix="w"))
    await c.tick()
    conv = next(r for r in c.outcomes.latest["shop"] if r.metric == "conversion")
    assert conv.units_challenger == 300 and conv.decision.verdict.value != "loss"
    assert c.states["shop"].variants["canary"].phase is Phase.PROMOTING


# ---------------------------------------------------------------------- through the API (aiohttp_client)


async def test_outcomes_posted_with_exposure_tokens_promote_on_a_win(aiohttp_client, monkeypatch):
    monkeypatch.setenv("COHORTGATE_EXPOSURE_KEY", SECRET)
    clock = Clock(time.time())
    sink = InProcessSink()
    await sink.start()
    controller = Controller(policy(promote_on_win=True), InProcessState(), sink, clock=clock)
    await controller.start()
    client = await aiohttp_client(make_app(controller, TOKEN, sink))
    rng = np.random.default_rng(7)
    batch = []
    for variant, p in (("control", 0.2), ("canary", 0.6)):
        for i in range(300):
            tok = mint(KEY, "shop", variant, f"{variant}{i:04d}", clock.t)
            if rng.random() < p:
                batch.append({"exposure": tok, "metric": "conversion", "value": 1})
            batch.append({"exposure": tok, "metric": "revenue", "value": 10.0 + float(rng.normal(0, 0.1))})
    head, tag = tok.rsplit(".", 1)
    forged = f"{head}.{'B' if tag[0] == 'A' else 'A'}{tag[1:]}"
    batch.append({"exposure": forged, "metric": "revenue", "value": 1})  # refused, counted
    resp = await client.post("/outcomes", json=batch, headers=AUTH)
    assert resp.status == 202
    body = await resp.json()
    assert body["accepted"] == len(batch) - 1 and body["counts"]["forged"] == 1
    assert controller.states["shop"].weights["canary"] == 10
    changes = await controller.tick()
    assert [(t.signal, t.after) for t in changes] == [(Signal.WIN, Phase.PROMOTED)]
    assert dict(controller.states["shop"].weights) == {"control": 0, "canary": 100}
    audit = await controller.store.audit("shop")
    promote = next(a for a in audit if a["action"] == "promote")
    assert "primary metric better than control: conversion" in promote["reason"]
    got = await (await client.get("/outcomes?route=shop", headers=AUTH)).json()
    conv = next(r for r in got["results"] if r["metric"] == "conversion")
    assert conv["verdict"] == "win"  # the same ledger the API shows


# ---------------------------------------------------------------------- the journal survives a restart


async def test_the_file_journal_survives_a_restart_and_takes_imports(tmp_path):
    journal = tmp_path / "state" / "outcomes.jsonl"
    clock = Clock()
    sink = InProcessSink()
    first = Controller(
        policy(), InProcessState(), sink, clock=clock, outcomes=OutcomeGate(policy(), None, journal, clock=clock)
    )
    await first.start()
    records = outcome_records(150, (0.3, 0.2), (10.0, 10.0))
    first.outcomes.ledger.ingest_many(records)  # what POST /outcomes does
    await first.tick()  # journaled at the interval
    before = {
        (r.metric, r.challenger): (r.units_challenger, r.units_control, r.challenger_value)
        for r in first.outcomes.latest["shop"]
    }
    assert journal.exists() and first.outcomes.ledger.unjournaled == []

    # an import appends rows by request id while the controller runs: read at the next interval
    from cohortgate.controller.outcomes import append_journal

    append_journal(journal, [{"kind": "outcome", "metric": "clicks", "value": 3, "request_id": "u-canary-1", "t": 3.0}])
    await first.tick()
    counts = first.outcomes.ledger.counts
    assert counts["accepted"] == len(records) + 1 and counts["duplicate"] == 0  # its own lines not read back

    second = Controller(
        policy(),
        InProcessState(),
        InProcessSink(),
        clock=clock,
        outcomes=OutcomeGate(policy(), None, journal, clock=clock),
    )
    await second.start()
    assert second.outcomes.replayed == len(records) + 1
    await second.tick()
    after = {
        (r.metric, r.challenger): (r.units_challenger, r.units_control, r.challenger_value)
        for r in second.outcomes.latest["shop"]
    }
    assert {k: v for k, v in after.items() if k[0] != "clicks"} == {k: v for k, v in before.items() if k[0] != "clicks"}
    assert after[("clicks", "canary")][2] > 0


async def test_a_torn_last_line_is_read_once_it_is_complete(tmp_path):
    journal = tmp_path / "outcomes.jsonl"
    gate = OutcomeGate(policy(), None, journal)
    await gate.start(InProcessState())
    exp = '{"kind":"exposure","route":"shop","variant":"canary","unit":"a","t":1,"request_id":"r1"}\n'
    journal.write_text(exp + '{"kind":"outcome","metric":"conversion",')
    await gate.poll()
    assert gate.ledger.counts == {"accepted": 1}
    with journal.open("a") as f:
        f.write('"value":1,"request_id":"r1","t":2}\n')
    await gate.poll()
    assert gate.ledger.counts == {"accepted": 2}


async def test_a_resumed_challengers_fresh_start_is_journaled_and_replayed(tmp_path):
    journal = tmp_path / "outcomes.jsonl"
    gate = OutcomeGate(policy(), None, journal)
    await gate.start(InProcessState())
    gate.ledger.ingest_many(outcome_records(150, (0.5, 0.1), (10.0, 10.0)))
    gate.restart("shop", "canary", 10.0)
    gate.ledger.ingest_many(outcome_records(120, (0.3, 0.3), (10.0, 10.0), prefix="after"))
    await gate.poll()
    replayed = OutcomeGate(policy(), None, journal)
    await replayed.start(InProcessState())
    for g in (gate, replayed):
        conv = next(r for r in g.look("shop") if r.metric == "conversion")
        assert (conv.units_challenger, conv.units_control) == (120, 270)  # the canary's first run is gone
