"""`make demo`'s outcome story end to end: `cohortgate up --demo` on policies/example.yaml picks a
winner on conversion and rolls a loser back.

The real stack (Envoy, the gateway, the controller, eight sidecars) and the demo's own traffic: the
shoppers of the ``shop`` route get an exposure token on every answer and post their conversion
(1 or 0, at the rates `up --demo` plants: control 10 %, big-images 15 %, small-images 5 %) through
Envoy's ``/v1/outcomes`` route to the controller. Nothing here posts outcomes itself. In the
controller's own simulation the decisions come within 4 simulated minutes at the demo's 30 visitors/s
(tests/local/test_demo_outcomes.py); a loaded 2-core machine serves fewer visitors a second, so the
wait is generous and a condition, never a time bar.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_up import CLI, EXAMPLE, ROOT, up_factory  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration

DECISIONS_S = 900.0  # the wait for both decisions: 15 minutes, about 4x the worst simulated case at full rate


def audit(run: dict[str, Any]) -> list[dict[str, Any]]:
    token = Path(run["admin_token_file"]).read_text().strip()
    request = urllib.request.Request(
        f"{run['endpoints']['controller_api']}/audit?limit=500", headers={"authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["records"]


@pytest.mark.timeout(DECISIONS_S + 300)
def test_the_demo_promotes_the_winner_and_rolls_the_loser_back_on_conversion(up_factory) -> None:  # noqa: F811
    up = up_factory(EXAMPLE, "--demo")
    up.wait_run()
    deadline = time.monotonic() + 120  # the demo's traffic starts after the banner
    while "traffic" not in (run := up.run())["children"]:
        assert up.proc.poll() is None and time.monotonic() < deadline, up.output()
        time.sleep(0.2)
    traffic = run["children"]["traffic"]
    assert traffic["argv"][traffic["argv"].index("--outcomes-model") + 1] == "shop"
    # The exposure key is a secret kept in the state dir: owner-only, on no command line, never printed.
    key_file = up.state / "exposure.key"
    key = key_file.read_text().strip()
    assert len(key) >= 32 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key not in json.dumps(run) and key not in up.output()
    assert "expect promote shop/big-images and rollback shop/small-images on conversion" in up.output()

    deadline = time.monotonic() + DECISIONS_S
    wanted = ("controller: promote shop/big-images", "controller: rollback shop/small-images")
    while not all(line in up.output() for line in wanted):
        assert up.proc.poll() is None, up.output()
        assert time.monotonic() < deadline, f"no decision on shop within {DECISIONS_S:.0f}s:\n{up.output()}"
        time.sleep(1.0)
    assert "primary metric worse than control: conversion" in up.output()

    records = audit(run)
    promote = next(r for r in records if r["action"] == "promote" and r["variant"] == "big-images")
    rollback = next(r for r in records if r["action"] == "rollback" and r["variant"] == "small-images")
    assert promote["signal"] == "win" and rollback["signal"] == "loss"
    for record, verdict in ((promote, "win"), (rollback, "loss")):
        (metric,) = record["evidence"]["outcomes"]
        assert (metric["metric"], metric["verdict"]) == ("conversion", verdict), record
    outcome = {r["variant"]: r for r in records if r["action"] == "outcome" and r["route"] == "shop"}
    assert (outcome["big-images"]["metric"], outcome["big-images"]["to"]) == ("conversion", "win")
    assert (outcome["small-images"]["metric"], outcome["small-images"]["to"]) == ("conversion", "loss")
    assert rollback["weights_after"]["small-images"] == 0 and promote["weights_after"]["big-images"] == 60

    report = subprocess.run(
        [*CLI, "report", "shop", "--format", "json", "--state-dir", str(up.state)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert report.returncode == 0, report.stderr
    assert "conversion" in report.stdout and "big-images" in report.stdout and "small-images" in report.stdout

    up.proc.send_signal(signal.SIGINT)
    assert up.wait_exit(60) == 0, up.output()
    summary = up.output()
    assert "visits    converted" in summary and "outcomes  accepted:" in summary, summary
