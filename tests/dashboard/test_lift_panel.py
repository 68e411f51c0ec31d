"""The outcome-metric lift panels in a real headless Chromium, against a real `cohortgate controller`.

Outcomes go in as a client's would, with exposure tokens minted under the controller's key, through
``POST /outcomes`` (the admin token: a server-side producer); the controller samples its ledger each
interval into the lift history the panel draws. A screenshot is left in ``test-artifacts/``.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request

import pytest

from cohortgate.core.exposure import exposure_id, mac_key, mint
from tests.dashboard.harness import ControllerProc
from tests.dashboard.test_browser import ARTIFACTS, browser, open_page  # noqa: F401 - browser is a fixture

pytestmark = pytest.mark.browser

SECRET = "lift-panel-test-key-0123456789"
# Generous on purpose: the CI box is 2 busy cores, where a controller's imports alone took 17 s.
START_S = 120.0
WAIT_MS = 60_000
METRICS = """\
    metrics:
      - {name: conversion, kind: binary, role: primary, planned_units: 4000}
      - {name: revenue, kind: mean, role: guardrail, margin: 0.05, planned_units: 4000}
    experiment: {hypothesis: the canary ranks better items first, owner: team-ranking, start: 2026-11-30}
"""


def post_outcomes(ctrl: ControllerProc, batch: list[dict]) -> dict:
    return post(ctrl, "/outcomes", batch)


def post(ctrl: ControllerProc, path: str, batch: list[dict]) -> dict:
    req = urllib.request.Request(
        ctrl.api + path,
        data=json.dumps(batch).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {ctrl.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=WAIT_MS / 1000) as r:
        return json.loads(r.read())


def outcomes(rng: random.Random, start: int, n: int) -> list[dict]:
    """``n`` units per arm: conversion 10 % on control, 20 % on the canary; revenue alike on both."""
    key = mac_key(SECRET.encode())
    batch = []
    for i in range(start, start + n):
        for variant, rate in (("control", 0.10), ("canary", 0.20)):
            token = mint(key, "tabular", variant, f"{variant}-unit-{i}", time.time())
            batch.append({"exposure": token, "metric": "conversion", "value": int(rng.random() < rate)})
            batch.append({"exposure": token, "metric": "revenue", "value": round(rng.gammavariate(2.0, 10.0), 2)})
    return batch


def test_the_lift_panel_shows_each_metrics_band_verdict_and_the_catalog(browser, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("COHORTGATE_EXPOSURE_KEY", SECRET)
    ctrl = ControllerProc(tmp_path / "ctrl")
    ctrl.policy.write_text(ctrl.policy.read_text() + METRICS)
    ctrl.start(timeout_s=START_S)
    try:
        page, problems = open_page(browser, ctrl.url)
        panel = page.locator("#route-tabular .outcomes")
        panel.wait_for(timeout=WAIT_MS)
        assert "no outcomes yet on route tabular (metrics: conversion, revenue)" in panel.inner_text()
        assert "the canary ranks better items first" in panel.inner_text()

        rng = random.Random(11)
        for k in range(4):  # four batches, each seen by at least one sample of the ledger
            reply = post_outcomes(ctrl, outcomes(rng, 400 * k, 400))
            assert reply["accepted"] == 1600, reply["counts"]
            page.wait_for_function(
                "n => { const s = document.querySelector('#route-tabular .lift[data-metric=conversion] svg');"
                " return s && s.querySelectorAll('text').length > 0 &&"
                " +document.querySelector('#route-tabular .lift[data-metric=conversion]')"
                "   .textContent.match(/units (\\d+)/)[1] >= n; }",
                arg=400 * (k + 1),
                timeout=WAIT_MS,
            )
        conversion = page.locator('#route-tabular .lift[data-metric="conversion"]')
        page.wait_for_function(
            "() => document.querySelector('#route-tabular .lift[data-metric=conversion]')?.dataset.verdict === 'win'",
            timeout=WAIT_MS,
        )
        text = conversion.inner_text()
        assert "win" in text and "always valid" in text and "units 1600 / 1600 of 4000 planned" in text
        assert conversion.locator("polygon.lift-band").count() == 1  # the always-valid band over time
        points = conversion.locator("polygon.lift-band").get_attribute("points").split()
        assert len(points) >= 2 * 2  # at least two looks: upper and lower bound for each
        revenue = page.locator('#route-tabular .lift[data-metric="revenue"]')
        assert revenue.get_attribute("data-challenger") == "canary"
        assert revenue.locator("line.lift-margin").count() == 1  # the guardrail's margin, drawn
        assert "guardrail" in revenue.inner_text()

        # labels: the sidecars' served predictions (as --report-predictions sends them), labels later by token
        key = mac_key(SECRET.encode())
        served = [
            {"request_id": f"{v}-req-{i}", "variant": v, "model": "tabular", "status": 200, "latency_ms": 1.0,
             "digest": "d", "output_digests": {}, "ts": time.time(), "prediction": {"top": str(i % 2)}}
            for v in ("control", "canary") for i in range(20)
        ]  # fmt: skip
        post(ctrl, "/reports", served)
        right = {"control": 15, "canary": 19}  # labels agreeing with the prediction, of 20
        labels = [
            {"exposure": mint(key, "tabular", v, f"{v}-unit-{i}", time.time(), eid=exposure_id(f"{v}-req-{i}")),
             "metric": "label", "value": i % 2 if i < right[v] else 1 - i % 2}
            for v in ("control", "canary") for i in range(20)
        ]  # fmt: skip
        assert post(ctrl, "/outcomes", labels)["accepted"] == 40
        table = page.locator("#route-tabular .labels[data-labels='2']")
        table.wait_for(timeout=WAIT_MS)
        text = table.inner_text()
        assert "75.0 %" in text and "95.0 %" in text  # control's and the canary's accuracy
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-lift-panel.png"), full_page=True)
        assert problems == []
    finally:
        ctrl.stop()
