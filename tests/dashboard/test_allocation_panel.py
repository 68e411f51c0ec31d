"""The bandit allocation panel in a real headless Chromium, against a real `cohortgate controller` (issue 21).

A three-arm route served in eu and us allocates per region (``segments: [region]``). Outcomes go in as a
client's would, with layout-2 exposure tokens (the segment under the MAC) minted under the controller's
key, through ``POST /outcomes``; every ``update_s`` the controller recomputes each segment's weights.
The panel shows the pooled weights over time and, per segment, a small table: its weights over the same
updates, the weights now and each arm's posterior mean with its interval.
"""

from __future__ import annotations

import random
import time

import pytest

from cohortgate.core.exposure import mac_key, mint
from tests.dashboard.harness import ControllerProc
from tests.dashboard.test_browser import ARTIFACTS, browser, open_page  # noqa: F401 - browser is a fixture
from tests.dashboard.test_lift_panel import post_outcomes

pytestmark = pytest.mark.browser

SECRET = "allocation-panel-test-key-0123456789"
START_S = 120.0  # generous: a busy 2-core CI box, where a controller's imports alone took 17 s
WAIT_MS = 60_000
UNITS = 150  # per arm and segment
RATES = {  # control converts best in eu, challenger in us
    "eu": {"control": 0.5, "canary": 0.2, "challenger": 0.1},
    "us": {"control": 0.1, "canary": 0.2, "challenger": 0.5},
}

POLICY = """version: 1
jwt: {issuer: https://auth.cohortgate.local, audience: cohortgate, jwks: jwks.json}
routes:
  - name: ranker
    match: {model: ranker}
    cohorts: {unit: {claim: sub}, salt: allocation-panel}
    residency: {source: {claim: residency}, on_missing_region: fallback_control}
    variants:
      - name: control
        weight: 34
        backends: [{url: 'http://127.0.0.1:18401', region: eu}, {url: 'http://127.0.0.1:18402', region: us}]
      - name: canary
        weight: 33
        backends: [{url: 'http://127.0.0.1:18403', region: eu}, {url: 'http://127.0.0.1:18404', region: us}]
      - name: challenger
        weight: 33
        backends: [{url: 'http://127.0.0.1:18405', region: eu}, {url: 'http://127.0.0.1:18406', region: us}]
    metrics:
      - {name: conversion, kind: binary, direction: increase, role: secondary}
    allocation: {strategy: thompson, reward: conversion, update_s: 1, min_share: 0.05, segments: [region]}
"""


def outcomes(rng: random.Random) -> list[dict]:
    key = mac_key(SECRET.encode())
    return [
        {
            "exposure": mint(key, "ranker", arm, f"{segment}-{arm}-{i}", time.time(), segment=segment),
            "metric": "conversion",
            "value": int(rng.random() < rate),
        }
        for segment, arms in RATES.items()
        for arm, rate in arms.items()
        for i in range(UNITS)
    ]


def test_the_allocation_panel_shows_each_segments_weights_and_posterior(browser, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("COHORTGATE_EXPOSURE_KEY", SECRET)
    ctrl = ControllerProc(tmp_path / "ctrl")
    ctrl.policy.write_text(POLICY)
    ctrl.start(timeout_s=START_S)
    try:
        page, problems = open_page(browser, ctrl.url)
        panel = page.locator("#route-ranker .allocation")
        panel.wait_for(timeout=WAIT_MS)
        reply = post_outcomes(ctrl, outcomes(random.Random(5)))
        assert reply["accepted"] == 2 * 3 * UNITS, reply["counts"]
        # an update after the outcomes: each segment's posterior counts its own units, per arm
        for segment in ("eu", "us"):
            page.wait_for_function(
                "([s, n]) => { const t = document.querySelector("
                "  `#route-ranker .allocation-segment[data-segment=${s}]`);"
                " return t && [...t.querySelectorAll('tbody tr')].every((r) => +r.children[r.children.length - 2]"
                "   .textContent === n); }",
                arg=[segment, UNITS],
                timeout=WAIT_MS,
            )
        segments = page.locator("#route-ranker .allocation-segment")
        assert [segments.nth(i).get_attribute("data-segment") for i in range(segments.count())] == ["eu", "other", "us"]
        for segment, best in (("eu", "control"), ("us", "challenger")):
            table = page.locator(f'#route-ranker .allocation-segment[data-segment="{segment}"]')
            assert table.locator("th").first.text_content() == f"segment {segment}"  # CSS shows it upper-case
            rows = {r[0]: r for r in (row.split("\t") for row in table.locator("tbody").inner_text().splitlines())}
            assert set(rows) == {"control", "canary", "challenger"}
            now = {arm: int(r[-3].rstrip("%")) for arm, r in rows.items()}  # the weights the state publishes
            assert max(now, key=now.__getitem__) == best and sum(now.values()) == 100
            assert all(w >= 5 for w in now.values())  # min_share, shown per segment
            mean = float(rows[best][-1].split("%")[0])  # "50.0 % [42.0 %, 58.0 %]": the posterior with its interval
            assert 35 <= mean <= 65 and "[" in rows[best][-1]
        other = page.locator('#route-ranker .allocation-segment[data-segment="other"]')
        assert other.locator("th").first.text_content() == "segment other"  # declared: shown before any unit
        assert problems == []
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-allocation-segments.png"), full_page=True)
    finally:
        ctrl.stop()
