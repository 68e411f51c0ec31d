"""The experiment report (controller/report.py) and the lift history it draws: pure, no sockets."""

from __future__ import annotations

import csv
import io
import itertools
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from cohortgate.controller import report as R
from cohortgate.controller.gating import metric_specs
from cohortgate.controller.lift_history import LiftHistory
from cohortgate.controller.outcomes import OutcomeLedger
from cohortgate.core.policy import parse_policy

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
      - {name: conversion, kind: binary, role: primary, planned_units: 4000}
      - {name: revenue, kind: mean, role: guardrail, margin: 0.05, planned_units: 4000}
    experiment:
      hypothesis: "bigger <b>images</b> sell more | and faster"
      owner: team-shop
      start: 2026-11-30
"""
SVG = "{http://www.w3.org/2000/svg}"


def policy():
    return parse_policy(POLICY, filename="report-test.yaml", base_dir=Path("/tmp"))


def fed_ledger(n: int = 1500, p0: float = 0.10, p1: float = 0.16, seed: int = 7, looks: int = 12):
    """A ledger fed in ``looks`` batches (a look after each), with the history recorded as the controller does."""
    p = policy()
    ledger = OutcomeLedger(metric_specs(p), {"shop": "control"}, keys=None)
    history = LiftHistory()
    rng = np.random.default_rng(seed)
    per_look = n // looks
    for look in range(looks):
        for i in range(per_look):
            for variant, rate in (("control", p0), ("canary", p1)):
                rid = f"{variant}-{look}-{i}"
                unit = f"u-{rid}"
                ledger.ingest({"kind": "exposure", "route": "shop", "variant": variant, "unit": unit, "t": 100.0,
                               "request_id": rid})  # fmt: skip
                if rng.random() < rate:
                    ledger.ingest({"kind": "outcome", "metric": "conversion", "value": 1, "request_id": rid, "t": 101})
                ledger.ingest({"kind": "outcome", "metric": "revenue", "value": float(rng.gamma(2.0, 10.0)),
                               "request_id": rid, "t": 101})  # fmt: skip
        history.record(1_700_000_000 + 60 * look, [r.to_json() for r in ledger.results("shop")])
    return p, ledger, history


@pytest.fixture(scope="module")
def doc():
    p, ledger, history = fed_ledger()
    results = [r.to_json() for r in ledger.results("shop")]
    status = {
        "status": "running",
        "variants": {
            "control": {"phase": "control", "weight": 50},
            "canary": {"phase": "running", "weight": 50, "reason": "healthy"},
        },
    }
    return R.document(
        "shop",
        design=R.design_of(p.by_name["shop"]),
        results=results,
        history=history.series("shop"),
        status=status,
        counts=dict(ledger.counts),
        generated_at=1_700_001_000.0,
        source="test ledger",
    )


def test_the_document_carries_design_catalog_traffic_srm_and_a_decision(doc):
    assert doc["experiment"] == {
        "hypothesis": "bigger <b>images</b> sell more | and faster",
        "owner": "team-shop",
        "primary_metric": None,
        "start": "2026-11-30",
    }
    assert [m["name"] for m in doc["design"]["metrics"]] == ["conversion", "revenue"]
    assert doc["traffic"]["units"] == {"control": 1500, "canary": 1500}
    assert doc["srm"]["checked"] and not doc["srm"]["mismatch"]  # 1500/1500 against 50/50, run offline
    conv = next(r for r in doc["results"] if r["metric"] == "conversion")
    assert conv["verdict"] == "win"  # 10 % -> 16 % over 3 000 units: clear
    (decision,) = doc["decisions"]
    assert decision["challenger"] == "canary" and decision["primary"] == {"metric": "conversion", "verdict": "win"}
    assert decision["text"].startswith("canary: running; primary conversion win (+")
    assert doc["dates"]["first_look"] == 1_700_000_000 and doc["dates"]["last_look"] == 1_700_000_000 + 660


def test_json_is_the_document_itself(doc):
    assert json.loads(R.render(doc, "json")) == json.loads(json.dumps(doc))


def test_csv_has_one_row_per_metric_and_challenger_with_both_intervals(doc):
    rows = list(csv.DictReader(io.StringIO(R.render(doc, "csv"))))
    assert [(r["metric"], r["challenger"]) for r in rows] == [("conversion", "canary"), ("revenue", "canary")]
    for row, res in zip(rows, doc["results"], strict=True):
        assert float(row["always_valid_lo"]) == pytest.approx(res["interval_always_valid"][0])
        assert float(row["fixed_horizon_hi"]) == pytest.approx(res["interval_fixed_horizon"][1])
        assert row["verdict"] == res["verdict"]
        # the always-valid interval is the wider one: the price of looking at any time
        assert float(row["always_valid_lo"]) <= float(row["fixed_horizon_lo"])


def test_markdown_links_its_plot_files_and_escapes_table_cells(doc):
    text = R.render(doc, "md", stem="shop-report")
    files = R.plot_files(doc, "shop-report")
    assert set(files) == {
        "shop-report-intervals.svg",
        "shop-report-lift-conversion-canary.svg",
        "shop-report-lift-revenue-canary.svg",
    }
    for name in files:
        assert f"]({name})" in text
    assert "**Hypothesis:** bigger <b>images</b> sell more \\| and faster" in text
    assert "| conversion | primary | canary | 1500 / 1500 |" in text
    assert "SRM check: fits: units control 1500, canary 1500 vs weights control 50%, canary 50%" in text
    plain = R.render(doc, "md")
    assert "shop-report" not in plain and "- conversion · canary: `" in plain  # a sparkline stands in


def test_html_is_self_contained_with_inline_plots_and_escaped_text(doc):
    page = R.render(doc, "html")
    assert page.count("<svg ") == 1 + len(doc["history"])
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "bigger &lt;b&gt;images&lt;/b&gt; sell more" in page and "<b>images</b>" not in page
    assert '<td class="win">win</td>' in page


def _points(attr: str) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in attr.split()]  # type: ignore[misc]


def test_the_lift_plot_draws_the_estimate_inside_its_always_valid_band(doc):
    series = next(s for s in doc["history"] if s["metric"] == "conversion")
    root = ET.fromstring(R.svg_lift(series))
    band = _points(root.find(f"{SVG}polygon").get("points"))
    line = _points(root.find(f"{SVG}polyline").get("points"))
    n = len(line)
    upper, lower = band[:n], band[n:][::-1]
    assert n == len(series["points"]) == 12
    for (x, y), (xu, yu), (xl, yl) in zip(line, upper, lower, strict=True):
        assert x == xu == xl
        assert yu <= y <= yl  # SVG y grows downwards: the upper bound is drawn above the estimate
    assert [x for x, _ in line] == sorted(x for x, _ in line)


def test_a_guardrail_plot_marks_its_margin_and_every_svg_parses(doc):
    for name, svg in R.plot_files(doc, "s").items():
        root = ET.fromstring(svg)
        assert root.tag == f"{SVG}svg", name
    revenue = next(s for s in doc["history"] if s["metric"] == "revenue")
    svg = R.svg_lift(revenue, R._metric_decl(doc, "revenue"))
    assert "margin -5.00%" in svg


def test_srm_offline_flags_a_broken_split_and_passes_a_fair_one():
    assert R.srm_from_units({"control": 1000, "canary": 800}, {"control": 50, "canary": 50})["mismatch"]
    fair = R.srm_from_units({"control": 1000, "canary": 1010}, {"control": 50, "canary": 50})
    assert fair["checked"] and not fair["mismatch"]
    assert not R.srm_from_units({"control": 10}, {"control": 100, "canary": 0})["checked"]


def test_an_empty_experiment_renders_in_every_format():
    p = policy()
    doc = R.document("shop", design=R.design_of(p.by_name["shop"]), results=[], generated_at=0.0, source="nothing")
    assert "no outcomes yet" in R.render(doc, "md") and "no outcomes yet" in R.render(doc, "html")
    assert R.render(doc, "csv").count("\n") == 1
    assert doc["decisions"][0]["text"] == "canary: no state; primary conversion: no outcomes yet"
    for svg in R.plot_files(doc, "s").values():
        ET.fromstring(svg)
    with pytest.raises(ValueError, match="unknown format 'pdf'"):
        R.render(doc, "pdf")


def test_the_history_is_bounded_keeps_the_start_and_stays_in_time_order():
    h = LiftHistory(max_points=50)
    for i in range(1000):
        h.record(float(i), [{"route": "r", "metric": "m", "challenger": "c", "lift": {"relative": i / 1000}}])
    (s,) = h.series("r")
    ts = [p[0] for p in s["points"]]
    assert len(ts) <= 51 and ts[0] == 0.0 and ts[-1] == 999.0
    assert ts == sorted(ts)
    assert max(b - a for a, b in itertools.pairwise(ts)) <= 64  # evenly thinned, no hole
    assert h.series("other") == []


def test_sparkline_follows_the_values():
    assert R.sparkline([0.0, 0.5, 1.0]) == "▁▄█"
    assert R.sparkline([None, 1.0]) == " ▁"
    assert R.sparkline([]) == ""


def test_a_restarted_comparison_starts_its_series_afresh():
    h = LiftHistory()

    def look(t: float, n: int) -> None:
        r = {
            "route": "r",
            "metric": "m",
            "challenger": "c",
            "lift": {"relative": 0.1},
            "units": {"challenger": n, "control": n},
        }
        h.record(t, [r])

    for t, n in ((1, 100), (2, 300), (3, 290)):  # 300 -> 290: units crossing arms in a ramp
        look(t, n)
    assert [p[0] for p in h.series("r")[0]["points"]] == [1, 2, 3]
    for t, n in ((4, 10), (5, 20)):  # the challenger resumed: its comparison starts afresh
        look(t, n)
    assert [p[0] for p in h.series("r")[0]["points"]] == [4, 5]
