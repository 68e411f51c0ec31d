"""Per-segment (contextual) allocation, end to end through the controller's own code.

decide() assigns each request by its segment's published weights and pins the unit with its note;
the gateway's exposure token carries the segment under its MAC; the client reports its outcome with
that token; the outcome ledger attributes it to the segment; `Controller.tick` recomputes each
segment's weights every ``update_s`` and publishes them; `effective_policy` (what every gateway runs)
applies them. The demo route is served in eu and us with ``segments: [region]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cohortgate.controller.gating import OutcomeGate
from cohortgate.controller.loop import Controller
from cohortgate.core import exposure, sticky
from cohortgate.core.decide import Facts, decide
from cohortgate.core.policy import Policy, parse_policy
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState, effective_policy


def bandit_route_text() -> str:
    """policies/bandit.yaml up to its outcomes route: the ranker route's allocation block ends it, so
    tests can append to that block."""
    return (ROOT / "policies" / "bandit.yaml").read_text().partition("\n\n  # Where clients post")[0] + "\n"


ROOT = Path(__file__).resolve().parents[2]
APP = "spiffe://cohortgate.local/app-demo"
SECRET = "allocation-segments-key-0123456789"
STICKY = (sticky.sticky_key(SECRET.encode()),)
EXPOSURE = exposure.parse_keys(SECRET)
ARMS = ("control", "canary", "challenger")
PLANTED = {  # control is best in eu, challenger in us; canary is middling in both
    "eu": {"control": 0.12, "canary": 0.06, "challenger": 0.03},
    "us": {"control": 0.03, "canary": 0.06, "challenger": 0.12},
}
EQUAL = {r: dict.fromkeys(ARMS, 0.06) for r in ("eu", "us")}
REQUESTS_PER_UPDATE = 200  # requests between two updates (update_s = 10 s of simulated time)
WITHIN = 6_000  # two segments share the traffic: each sees about 3 000 requests


def segmented_policy() -> Policy:
    lines = []
    for line in bandit_route_text().splitlines():
        lines.append(line)
        if "region: eu, model:" in line:
            port = line.split("127.0.0.1:")[1][:5]
            lines.append(f'          - {{url: "http://127.0.0.1:2{port[1:]}", region: us}}')
    lines.append("      segments: [region]")
    return parse_policy("\n".join(lines) + "\n", filename="segmented.yaml", base_dir=ROOT / "policies")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def controller() -> tuple[Controller, Clock]:
    clock = Clock()
    policy = segmented_policy()
    gate = OutcomeGate(policy, EXPOSURE, clock=clock)
    return Controller(policy, InProcessState(), InProcessSink(), clock=clock, outcomes=gate), clock


async def run(ctl: Controller, clock: Clock, requests: int, rates, seed: int = 11):
    """Drive ``requests`` requests (half eu, half us; 20 % from returning units echoing their note).

    Returns the units' arms, how many returning requests switched from an arm still live (a
    rolled-back arm lets go of its units by design), and each update's weights per segment."""
    rng = np.random.default_rng(seed)
    ledger = ctl.outcomes.ledger
    arms: dict[str, tuple[str, str]] = {}  # unit -> (region, arm)
    notes: dict[str, str] = {}
    switches = 0
    published = []
    for i in range(requests):
        serving = effective_policy(ctl.policy, ctl.states)  # what every gateway applies
        returning = bool(arms) and rng.random() < 0.2
        if returning:
            unit = list(arms)[int(rng.integers(len(arms)))]
            region = arms[unit][0]
        else:
            unit, region = f"user-{len(arms)}", ("eu", "us")[i % 2]
        claims = {"sub": unit, "residency": region, "scope": "predict"}
        facts = Facts("POST", "/v2/models/ranker/infer", {}, APP, claims, f"r-{i}", notes.get(unit), STICKY)
        d = decide(serving, facts)
        assert d.allowed and d.segment == region
        if returning:
            switches += d.variant != arms[unit][1] and arms[unit][1] not in ctl.states["ranker"].disabled
        arms[unit], notes[unit] = (region, d.variant), d.sticky  # type: ignore[assignment]
        token = exposure.mint(EXPOSURE[0], "ranker", d.variant, unit, clock.now, segment=d.segment)  # type: ignore[arg-type]
        converted = float(rng.random() < rates[region][d.variant])
        status = ledger.ingest({"kind": "outcome", "metric": "conversion", "value": converted, "exposure": token})
        assert status in ("accepted", "duplicate")
        if (i + 1) % REQUESTS_PER_UPDATE == 0:
            clock.now += 10.0
            await ctl.tick()
            published.append({s: dict(w) for s, w in ctl.states["ranker"].segment_weights.items()})
    return arms, switches, published


async def test_each_segment_converges_to_its_own_best_arm_and_nobody_switches(controller):
    ctl, clock = controller
    await ctl.start()
    arms, switches, published = await run(ctl, clock, WITHIN, PLANTED)
    assert switches == 0  # returning units kept their first arm while the weights moved
    # the outcome gate may roll back canary (worse than control pooled); never a segment's best arm
    assert ctl.states["ranker"].disabled <= {"canary"}
    final = published[-1]
    assert set(final) == {"eu", "us", "other"}
    assert max(final["eu"], key=final["eu"].__getitem__) == "control" and final["eu"]["control"] >= 70
    assert max(final["us"], key=final["us"].__getitem__) == "challenger" and final["us"]["challenger"] >= 70
    live = set(ARMS) - ctl.states["ranker"].disabled
    assert all(seg[a] >= 5 for seg in final.values() for a in live)  # min_share in every segment
    assert all(seg[a] == 0 for seg in final.values() for a in ctl.states["ranker"].disabled)
    # the new units of the last updates followed their segment's weights
    late = [a for u, (r, a) in arms.items() if int(u.split("-")[1]) >= len(arms) - 600 and r == "eu"]
    assert late.count("control") / len(late) >= 0.6
    report = ctl.status()["routes"]["ranker"]["allocation"]
    assert report["segments"] == ["region"] and report["segment_weights"] == final
    assert report["history"][-1]["segments"]["us"]["weights"] == final["us"]
    audit = [r for r in await ctl.store.audit("ranker", 1000) if r["action"] == "allocate"]
    assert audit[0]["segment_weights_after"] == final
    stored = (await ctl.store.load())["ranker"]
    assert {s: dict(w) for s, w in stored.segment_weights.items()} == final


async def test_an_equal_arms_run_keeps_every_segment_above_the_floor(controller):
    """A/A: no arm of any segment ever drops under min_share, and the IPW estimates agree."""
    ctl, clock = controller
    await ctl.start()
    _, switches, published = await run(ctl, clock, 3_000, EQUAL, seed=5)
    assert switches == 0
    assert all(w >= 5 for point in published for seg in point.values() for w in seg.values())
    est = ctl.status()["routes"]["ranker"]["allocation"]["estimates"]
    intervals = [est[arm]["interval_ipw"] for arm in ARMS]  # a unit's reward: converted on any visit
    assert max(lo for lo, _ in intervals) <= min(hi for _, hi in intervals)  # the arms agree


async def test_a_forged_segment_is_not_attributed(controller):
    ctl, clock = controller
    await ctl.start()
    token = exposure.mint(EXPOSURE[0], "ranker", "control", "mallory", clock.now, segment="eu")
    moved = token.replace(".eu.", ".us.")
    ledger = ctl.outcomes.ledger
    assert ledger.ingest({"kind": "outcome", "metric": "conversion", "value": 1, "exposure": moved}) == "forged"
    assert ledger.ingest({"kind": "outcome", "metric": "conversion", "value": 1, "exposure": token}) == "accepted"
    assert ledger.segments["ranker"] == {"mallory": "eu"}
