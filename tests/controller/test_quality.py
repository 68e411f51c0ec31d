"""Quality guardrails through the controller's own code: planted scenarios are caught within a stated
number of requests or reports, and A/A runs trip no more often than alpha (issue 20)."""

from __future__ import annotations

import numpy as np
import pytest

from cohortgate.controller.quality import QualityMonitor, spent
from cohortgate.core.errors import PolicyError
from cohortgate.core.rollout import Signal, initial_state
from cohortgate.core.sketch import CategoricalSketch, NumericSketch, QualityReport
from cohortgate.store.events import REQUEST, Event
from tests.controller.quality_sim import EDGES, SEGMENTS, Behaviour, QualitySim, quality_policy


def rolled_back(sim: QualitySim) -> bool:
    return sim.phase() == "rolled_back"


async def test_a_canary_worse_only_in_one_segment_is_rolled_back_though_fine_on_average():
    """Canary: 1 % errors on ios, 8 % on android; control 4.5 % on both. On average they are equal, so
    the route-wide harm test has nothing to say; the android segment's test does."""
    control = Behaviour(error=lambda t, d: 0.045)
    canary = Behaviour(error=lambda t, d: 0.08 if d == "android" else 0.01)
    sim = await QualitySim(quality_policy(quality=SEGMENTS), {"control": control, "canary": canary}, seed=3).start()
    seconds = await sim.run(120, until=rolled_back)
    assert rolled_back(sim), sim.controller.status()["routes"]["tabular"]["quality"]["segment_tests"]
    assert sim.requests["canary"] <= 10_000  # docs/quality.md: bench max 9 253 canary requests over 20 seeds
    (change,) = [c for c in sim.changes if c.variant == "canary"]
    assert "segment device=android" in change.reason
    q = change.evidence["quality"]
    assert q["signal"] == "segment_harm" and q["value"] == "android" and q["metric"] == "errors"
    assert sim.controller.tests[("tabular", "canary")].error.p_value > 0.0125  # the route-wide test: no case
    audit = await sim.store.audit()
    assert audit[0]["evidence"]["quality"]["segment"] == "device" and audit[0]["action"] == "rollback"
    assert seconds < 120


async def test_a_canary_whose_inputs_drift_after_t_is_rolled_back_within_stated_reports():
    t0 = 1_030.0
    canary = Behaviour(input_mean=lambda t: 0.5 if t >= t0 else 0.0)
    sim = await QualitySim(quality_policy(), {"control": Behaviour(), "canary": canary}, seed=4).start()
    await sim.run(30)
    assert sim.phase() == "running"  # no drift before t0
    after = await sim.run(60, until=rolled_back)
    assert rolled_back(sim)
    assert after <= 20  # stated: within 20 one-second reports (2 000 canary rows) of the shift
    (change,) = sim.changes
    assert change.evidence["quality"]["signal"] == "input_drift" and "inputs drift" in change.reason
    assert change.evidence["quality"]["drifted"]["x"]


async def test_a_control_that_drifts_moves_traffic_to_the_fallback_and_back_by_the_operator():
    t0 = 1_040.0
    moving = Behaviour(input_mean=lambda t: 1.0 if t >= t0 else 0.0)
    policy = quality_policy(weights=(100, 0), quality="{fallback: canary}")
    sim = await QualitySim(policy, {"control": moving, "canary": moving}, seed=5).start()
    await sim.run(40)
    assert sim.weights() == {"control": 100, "canary": 0}
    status = sim.controller.status()["routes"]["tabular"]["quality"]
    assert status["reference"] is not None and status["control_drift"]["drifted"] == {}
    after = await sim.run(60, until=lambda s: s.weights()["canary"] == 100)
    assert sim.weights() == {"control": 0, "canary": 100}
    assert after <= 15  # stated: within 15 one-second reports of control's shift
    (change,) = sim.changes
    assert change.signal is Signal.PROMOTE and change.reason.startswith("drift-aware switch to canary")
    audit = await sim.store.audit()
    assert audit[0]["action"] == "promote" and audit[0]["evidence"]["quality"]["signal"] == "control_drift"
    # the operator moves traffic back: the drifted world becomes the reference, nothing switches again
    await sim.controller.manual(Signal.ROLLBACK, "tabular", "canary", "manual:alice")
    assert sim.weights() == {"control": 100, "canary": 0}
    await sim.run(30)
    assert sim.weights() == {"control": 100, "canary": 0}
    assert sim.controller.status()["routes"]["tabular"]["quality"]["switch"] is None


async def test_without_a_fallback_control_drift_is_an_alert_not_a_switch():
    moving = Behaviour(input_mean=lambda t: 1.0 if t >= 1_020 else 0.0)
    sim = await QualitySim(quality_policy(weights=(100, 0)), {"control": moving, "canary": moving}, seed=6).start()
    await sim.run(50)
    assert sim.weights() == {"control": 100, "canary": 0} and not sim.changes
    alert = sim.controller.status()["routes"]["tabular"]["quality"]["alert"]
    assert alert["kind"] == "control_drift" and "no fallback" in alert["reason"]


async def test_disparate_impact_under_the_four_fifths_floor_rolls_the_canary_back():
    canary = Behaviour(error=lambda t, d: 0.0, positive=lambda t, d: 0.25 if d == "android" else 0.5)
    control = Behaviour(error=lambda t, d: 0.0)
    sim = await QualitySim(quality_policy(quality=SEGMENTS), {"control": control, "canary": canary}, seed=7).start()
    await sim.run(120, until=rolled_back)
    assert rolled_back(sim)
    assert sim.requests["canary"] <= 3_000  # stated: within 3 000 canary requests
    (change,) = sim.changes
    q = change.evidence["quality"]
    assert q["signal"] == "disparate_impact" and q["low"] == "android" and q["upper"] < 0.8
    assert q["control"]["ratio"] >= 0.8


async def test_a_canary_with_unequal_rates_where_control_has_them_too_is_not_blamed():
    unequal = Behaviour(error=lambda t, d: 0.0, positive=lambda t, d: 0.25 if d == "android" else 0.5)
    sim = await QualitySim(quality_policy(quality=SEGMENTS), {"control": unequal, "canary": unequal}, seed=8).start()
    await sim.run(60)
    assert sim.phase() == "running"
    impact = sim.controller.status()["routes"]["tabular"]["quality"]["impact"]
    assert impact["canary"]["device"]["ratio"] < 0.8 and impact["control"]["device"]["ratio"] < 0.8


def test_segment_labels_are_bounded_to_declared_values():
    policy = quality_policy(quality=SEGMENTS)
    q = policy.by_name["tabular"].quality
    assert q.label("eu", {"x-device": "ios"}, None) == "device=ios"
    assert q.label("eu", {"x-device": "<script>"}, None) == "device=other"
    assert q.label("eu", {}, None) == "device=other"
    monitor = QualityMonitor(policy)
    monitor.add_request(Event(REQUEST, "tabular", "canary", 200, 1.0, segment="device=evil;x=y"))
    monitor.add_request(Event(REQUEST, "tabular", "canary", 200, 1.0, segment="device=android"))
    totals = monitor.routes["tabular"].segments.totals
    assert set(totals) == {("device", "android"), ("device", "ios"), ("device", "other")}
    assert totals[("device", "other")]["canary"].n == 1 and totals[("device", "android")]["canary"].n == 1


@pytest.mark.parametrize(
    ("quality", "message"),
    [
        ("{segments: [{name: d, source: header, values: [a]}]}", "a header segment needs `key`"),
        ("{segments: [{name: r, source: region, key: x, values: [eu]}]}", "a region segment takes no key"),
        ("{segments: [{name: r, source: region, values: [mars]}]}", "region 'mars' is not one this route serves"),
        ("{segments: [{name: d, source: claim, key: tier, values: [a, a]}]}", "values must be distinct"),
        ("{fallback: nobody}", "fallback names unknown variant 'nobody'"),
        ("{fallback: control}", "the fallback must be a challenger"),
        ("{four_fifths: 1.5}", "less than or equal to 1"),
    ],
)
def test_quality_blocks_are_validated_with_positions(quality, message):
    with pytest.raises(PolicyError) as info:
        quality_policy(quality=quality)
    problems = "\n".join(info.value.problems)
    assert message in problems
    assert "quality-test.yaml:10:" in problems  # the quality block is line 10


def test_reports_are_matched_to_a_route_and_variant_or_rejected():
    monitor = QualityMonitor(quality_policy())
    sketch = {"x": NumericSketch.of([0.0], EDGES)}
    assert monitor.add_report(QualityReport("tabular", "canary", 0, 1, sketch))  # by model name
    assert not monitor.add_report(QualityReport("tabular", "nobody", 0, 1, sketch))
    assert not monitor.add_report(QualityReport("other-model", "canary", 0, 1, sketch))
    assert monitor.rejected == 2


# --------------------------------------------------------------------------- A/A


def test_aa_drift_comparisons_trip_no_more_than_alpha_over_many_looks():
    """200 A/A runs of 15 looks each through the monitor's own verdicts: control and canary draw
    inputs (a numeric and a categorical feature) and outputs from one distribution. A trip is any
    signal. The drift share of alpha is alpha/4 (inputs and predictions, alpha/8 each), so the bound
    checked is alpha; bench/bench_quality.py measures the rate over 1 000 runs (docs/quality.md)."""
    policy = quality_policy(quality="{min_samples: 200}")
    route = policy.by_name["tabular"]
    state = initial_state(route)
    rng = np.random.default_rng(11)
    runs, looks, trips = 200, 15, 0
    for _ in range(runs):
        monitor = QualityMonitor(policy, window_s=10)
        for t in range(looks):
            for name in ("control", "canary"):
                c = rng.choice(["a", "b", "c"], size=100, p=[0.5, 0.3, 0.2])
                inputs = {"x": NumericSketch.of(rng.normal(0, 1, 100), EDGES), "c": CategoricalSketch.of(c, "abc")}
                outputs = {"y": NumericSketch.of(rng.normal(0, 1, 100), EDGES)}
                monitor.add_report(QualityReport("tabular", name, t, t + 1, inputs, outputs, route="tabular"))
            if monitor.verdicts(route, state, None, t + 1):
                trips += 1
                break
    assert trips / runs <= 0.05


def test_the_drift_alpha_is_spent_over_looks_within_its_share():
    assert sum(spent(0.01, j) for j in range(1, 100_000)) < 0.01
    assert spent(0.01, 1) == pytest.approx(0.01 * 6 / np.pi**2)


async def test_aa_segment_tests_do_not_roll_back_a_healthy_canary():
    """12 A/A runs of 90 s at 200 rps through the whole controller; the segment tests' level is
    alpha/2 = 0.025 over the experiment (bench/bench_quality.py runs 1 000)."""
    trips = 0
    for seed in range(12):
        same = Behaviour(error=lambda t, d: 0.05)
        sim = await QualitySim(
            quality_policy(quality=SEGMENTS), {"control": same, "canary": same}, seed=100 + seed
        ).start()
        sim.rows = 10  # no drift comparisons here: the segment tests alone
        await sim.run(90, until=lambda s: bool(s.changes))
        trips += any("segment" in c.reason for c in sim.changes)
    assert trips <= 1


def test_a_policy_edit_of_the_quality_block_starts_the_quality_state_afresh():
    policy = quality_policy(quality=SEGMENTS)
    monitor = QualityMonitor(policy)
    monitor.add_request(Event(REQUEST, "tabular", "canary", 503, 1.0, segment="device=ios"))
    before = monitor.routes["tabular"]
    monitor.set_policy(quality_policy(quality=SEGMENTS))  # same block: kept
    assert monitor.routes["tabular"] is before
    monitor.set_policy(
        quality_policy(
            quality="{segments: [{name: device, source: header, key: x-device, values: [ios]}], margin: 0.2}"
        )
    )
    fresh = monitor.routes["tabular"]
    assert fresh is not before and fresh.quality.margin == 0.2
    assert fresh.segments.totals[("device", "ios")]["canary"].n == 0
    monitor.set_policy(quality_policy(quality="null"))
    assert "tabular" not in monitor.routes and monitor.status("tabular") is None
