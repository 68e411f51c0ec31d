"""The dashboard's quality panel reads the controller's own status (issue 20): drift per feature per
variant, the segment table, and the switch in force."""

from __future__ import annotations

from cohortgate.dashboard.view import quality_view
from tests.controller.quality_sim import SEGMENTS, Behaviour, QualitySim, quality_policy


async def test_the_quality_panel_shows_drift_per_feature_and_variant_and_the_segment_table():
    canary = Behaviour(input_mean=lambda t: 0.5 if t >= 1_010 else 0.0)
    sim = await QualitySim(quality_policy(quality=SEGMENTS), {"control": Behaviour(), "canary": canary}, seed=9).start()
    await sim.run(60, until=lambda s: bool(s.changes))
    view = quality_view(sim.controller.status()["routes"]["tabular"]["quality"])
    rows = {(r[0], r[1], r[2]): r for r in view["drift"]}
    moved = rows[("canary", "vs control, inputs", "x")]
    assert float(moved[4]) > 0 and moved[7] != "–"  # JS shown, and which statistics crossed
    assert ("control", "vs reference, inputs", "x") in rows
    segments = {(r[0], r[1]) for r in view["segments"]}
    assert {("device=android", "canary"), ("device=ios", "control"), ("device=other", "canary")} <= segments
    assert view["thresholds"]["js"] == 0.1 and view["notice"] is None


async def test_the_panel_names_the_switch_in_force():
    moving = Behaviour(input_mean=lambda t: 1.0 if t >= 1_020 else 0.0)
    policy = quality_policy(weights=(100, 0), quality="{fallback: canary}")
    sim = await QualitySim(policy, {"control": moving, "canary": moving}, seed=5).start()
    await sim.run(60, until=lambda s: bool(s.changes))
    view = quality_view(sim.controller.status()["routes"]["tabular"]["quality"])
    assert view["notice"].startswith("switched to canary: control's inputs drifted")
    assert quality_view(None) is None
