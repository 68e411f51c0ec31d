"""The allocation panel's view per segment (issue 21): a contextual bandit's weights per segment over the same
updates as the pooled table, the weights it publishes now, and each arm's posterior in that segment.

The input has the shape of the controller's GET /status ``routes[].allocation``
(`cohortgate.controller.allocation.Allocator.report`; tests/controller/test_allocation_segments.py checks
the controller's side of it). Pure: no controller, no browser.
"""

from __future__ import annotations

from typing import Any

from cohortgate.dashboard.view import allocation_view

ARMS = ("control", "canary", "challenger")


def posterior(units: int, mean: float, half: float) -> dict[str, Any]:
    return {"units": units, "mean": mean, "interval": [mean - half, mean + half]}


def point(t: float, weights: dict[str, int], segments: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"t": t, "weights": weights, "posterior": {a: posterior(100, 0.05, 0.01) for a in weights}}
    if segments is not None:
        p["segments"] = {
            s: {
                "weights": w,
                "posterior": {a: posterior(10 * (i + 1), round(0.1 * (i + 1), 6), 0.02) for i, a in enumerate(w)},
            }
            for s, w in segments.items()
        }
    return p


def report(history: list[dict[str, Any]], segment_weights: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {
        "route": "ranker",
        "strategy": "thompson",
        "reward": "conversion",
        "update_s": 10.0,
        "min_share": 0.05,
        "segments": ["region"] if segment_weights else [],
        "weights": history[-1]["weights"] if history else {a: 34 for a in ARMS},
        "segment_weights": segment_weights,
        "held": None,
        "history": history,
        "estimates": {},
        "weighting": "bandit-allocated data need weighting",
    }


EU_1 = {"control": 40, "canary": 30, "challenger": 30}
EU_2 = {"control": 80, "canary": 10, "challenger": 10}
US_2 = {"control": 10, "canary": 10, "challenger": 80}
POOLED = {"control": 45, "canary": 10, "challenger": 45}


def test_each_segment_gets_its_weights_over_the_pooled_updates_and_its_posterior() -> None:
    history = [point(100.0, POOLED, {"eu": EU_1}), point(110.0, POOLED, {"eu": EU_2, "us": US_2})]
    # "other" is published (a state written by an earlier controller) but has no history point here
    view = allocation_view(report(history, {"eu": EU_2, "us": US_2, "other": {"control": 34, "canary": 33}}))
    assert view is not None and view["times"] == [100.0, 110.0]
    eu, other, us = view["segments"]
    assert [s["name"] for s in (eu, other, us)] == ["eu", "other", "us"]  # sorted, every segment shown
    assert eu["over_time"] == [["control", 40, 80], ["canary", 30, 10], ["challenger", 30, 10]]
    # us had no weights at the first update: shown as missing, not as 0 %
    assert us["over_time"] == [["control", None, 10], ["canary", None, 10], ["challenger", None, 80]]
    # now: the published weights; the posterior: the segment's latest, per arm, with its interval
    assert us["arms_now"][2] == ["challenger", 80, 30, 0.3, [0.3 - 0.02, 0.3 + 0.02]]
    assert eu["arms_now"][0] == ["control", 80, 10, 0.1, [0.1 - 0.02, 0.1 + 0.02]]
    assert other["over_time"] == [[a, None, None] for a in ARMS]
    assert other["arms_now"][0] == ["control", 34, 0, None, [None, None]]  # no rewards seen for it
    assert other["arms_now"][2][1] is None  # an arm the published weights do not name: no weight, not 0


def test_the_segment_tables_follow_the_pooled_tables_window() -> None:
    history = [point(float(t), POOLED, {"eu": {**EU_1, "control": t}}) for t in range(20)]
    view = allocation_view(report(history, {"eu": EU_2}), points=5)
    assert view is not None and view["times"] == [15.0, 16.0, 17.0, 18.0, 19.0]
    (eu,) = view["segments"]
    assert eu["over_time"][0] == ["control", 15, 16, 17, 18, 19]  # the same five updates, in order
    assert eu["arms_now"][0][1] == 80  # now: the weights the state publishes


def test_a_route_without_segments_has_no_segment_tables() -> None:
    view = allocation_view(report([point(100.0, POOLED)], {}))
    assert view is not None and view["segments"] == []
    assert view["over_time"][0] == ["control", 45]  # the pooled panel is unchanged
