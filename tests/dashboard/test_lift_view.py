"""The lift panel's data (dashboard/view.py `outcomes_view`): pure, from the report's design and results."""

from __future__ import annotations

from pathlib import Path

from cohortgate.controller.lift_history import LiftHistory
from cohortgate.controller.report import design_of
from cohortgate.core.policy import parse_policy
from cohortgate.dashboard.view import Recorder, outcomes_view, view

POLICY = """
version: 1
jwt: {issuer: https://auth.test, audience: test, jwks: jwks.json}
routes:
  - name: shop
    match: {path_prefix: /v2/models/shop}
    variants:
      - {name: control, weight: 50, backends: [{url: "http://127.0.0.1:9", region: eu}]}
      - {name: canary, weight: 50, backends: [{url: "http://127.0.0.1:9", region: eu}]}
    metrics:
      - {name: conversion, kind: binary, role: primary}
      - {name: latency, kind: mean, direction: decrease, role: guardrail, margin: 0.1}
    experiment: {hypothesis: h, owner: o, start: 2026-01-02}
"""


def result(metric: str, role: str, rel: float, lo: float | None, hi: float | None, verdict: str) -> dict:
    return {
        "route": "shop",
        "metric": metric,
        "role": role,
        "challenger": "canary",
        "control": "control",
        "units": {"challenger": 500, "control": 510},
        "value": {"challenger": 0.2, "control": 0.1},
        "lift": {"absolute": 0.1, "relative": rel},
        "interval_fixed_horizon": [rel - 0.01, rel + 0.01],
        "interval_always_valid": [lo, hi],
        "verdict": verdict,
        "reason": f"{metric} says {verdict}",
    }


def data():
    design = design_of(parse_policy(POLICY, base_dir=Path("/tmp")).by_name["shop"])
    results = [
        result("conversion", "primary", 0.5, 0.2, 0.8, "win"),
        result("latency", "guardrail", 0.02, None, 0.3, "pending"),
    ]
    history = LiftHistory()
    history.record(10.0, results)
    history.record(11.0, results)
    return {"design": design, "results": results, "history": history.series("shop")}


def test_each_metric_gets_its_band_history_verdict_samples_and_margin():
    o = outcomes_view("shop", data())
    assert o is not None and o["empty"] is None
    assert o["experiment"] == {"hypothesis": "h", "owner": "o", "primary_metric": None, "start": "2026-01-02"}
    conv, lat = o["metrics"]
    assert (conv["metric"], conv["verdict"], conv["reason"]) == ("conversion", "win", "conversion says win")
    assert conv["interval"] == [0.2, 0.8] and conv["units"] == {"challenger": 500, "control": 510}
    assert conv["points"] == [[10.0, 0.5, 0.2, 0.8], [11.0, 0.5, 0.2, 0.8]]  # t, lift, always-valid band
    assert conv["margin"] is None
    assert lat["margin"] == 0.1  # lower is better: "worse" is above zero
    assert lat["points"][0][2] is None  # an infinite bound stays None: the page draws it at the edge


def test_a_route_with_metrics_but_no_outcomes_says_so_and_one_without_has_no_panel():
    d = data()
    empty = outcomes_view("shop", {**d, "results": [], "history": []})
    assert empty is not None and empty["metrics"] == []
    assert (
        empty["empty"]
        == "no outcomes yet on route shop (metrics: conversion, latency); clients post them with the exposure token"
    )
    assert outcomes_view("shop", None) is None


def test_the_page_document_carries_the_panel_on_its_route():
    status = {"controller": {"leader": True}, "routes": {"shop": {"status": "running", "variants": {"control": {}}}}}
    doc = view(status, policy_weights={}, recorder=Recorder(), audit=[], now=100.0, outcomes={"shop": data()})
    (route,) = doc["routes"]
    assert [m["metric"] for m in route["outcomes"]["metrics"]] == ["conversion", "latency"]
    doc = view(status, policy_weights={}, recorder=Recorder(), audit=[], now=100.0)
    assert doc["routes"][0]["outcomes"] is None


def test_labels_ride_along_and_a_route_with_labels_but_no_metrics_is_not_called_empty():
    row = {"route": "shop", "variant": "canary", "labels": 9, "accuracy": {"value": 0.9, "interval": [0.6, 0.98]},
           "vs_control": {"accuracy": {"value": 0.1, "interval": [-0.2, 0.4]}}}  # fmt: skip
    o = outcomes_view("shop", {**data(), "labels": [row]})
    assert o is not None
    (shown,) = o["labels"]
    assert shown["variant"] == "canary" and shown["labels"] == 9 and shown["accuracy"]["value"] == 0.9
    assert shown["log_loss"] is None and shown["vs_control"]["accuracy"]["value"] == 0.1
    bare = outcomes_view("shop", {"design": {"metrics": []}, "results": [], "labels": [row]})
    assert bare is not None and bare["empty"] is None and bare["labels"]
