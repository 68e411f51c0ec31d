"""Feature fallbacks reach the controller (issue 22): the sidecars' reports carry the reason, the controller
counts them per variant of a route with features, and the dashboard shows the rate."""

from __future__ import annotations

from cohortgate.controller.fallbacks import FeatureFallbacks
from cohortgate.core.policy import parse_policy
from cohortgate.dashboard.view import features_view
from cohortgate.store.events import REPORT, Event
from sidecar.report import ShadowReport

POLICY = """
version: 1
jwt: {issuer: iss, audience: aud, jwks: jwks.json}
routes:
  - name: shop
    match: {model: shop}
    residency: {default_region: eu}
    variants:
      - {name: control, weight: 50, backends: [{url: "http://127.0.0.1:1", region: eu}]}
      - {name: personal, weight: 50, backends: [{url: "http://127.0.0.1:2", region: eu}]}
    features:
      store: redis://127.0.0.1:6379/0
      project: cgdemo
      join_key: user_id
      entity: {claim: sub}
      views: [user_stats:clicks_7d]
      fallback: {defaults: {user_stats:clicks_7d: 0}}
  - name: plain
    match: {model: plain}
    residency: {default_region: eu}
    variants:
      - {name: only, weight: 100, backends: [{url: "http://127.0.0.1:3", region: eu}]}
"""


def report(variant: str, fallback: str = "", model: str = "shop") -> Event:
    """A report as the controller receives it: the sidecar's JSON, then its Redis-stream fields."""
    sent = ShadowReport("req", variant, model, 200, 1.0, "d", (), 0.0, fallback)
    via_json = Event.from_report(sent.to_json())
    via_stream = Event.from_fields(sent.to_fields())
    assert via_json.fallback == via_stream.fallback == fallback and via_json.kind == REPORT
    return via_stream


def test_the_fallback_rate_is_counted_per_variant_by_reason() -> None:
    fb = FeatureFallbacks(parse_policy(POLICY))
    now = 1_000.0
    for _ in range(6):
        fb.add(report("personal"), now)
    for reason in ("missing", "missing", "stale", "over_budget"):
        fb.add(report("personal", reason), now)
    fb.add(report("control"), now)
    fb.add(report("only", "missing", model="plain"), now)  # a route without features: not counted
    fb.add(report("personal", "made-up-by-a-forger"), now)
    summary = fb.summary("shop", now)
    assert summary == {
        "control": {"reports": 1, "fallbacks": 0, "rate": 0.0, "reasons": {}, "window_s": 60.0},
        "personal": {
            "reports": 11,
            "fallbacks": 5,
            "rate": round(5 / 11, 6),
            "reasons": {"missing": 2, "other": 1, "over_budget": 1, "stale": 1},
            "window_s": 60.0,
        },
    }
    assert fb.summary("plain", now) is None

    rows = features_view(summary)
    assert rows is not None and [r["name"] for r in rows] == ["control", "personal"]
    assert rows[1]["rate"] == round(5 / 11, 6) and rows[1]["reasons"] == "missing 2, other 1, over_budget 1, stale 1"
    assert features_view(None) is None


def test_the_rate_is_the_last_window_not_since_the_start() -> None:
    """An outage of the store an hour ago no longer shows: the rate covers the last ``window_s`` seconds."""
    fb = FeatureFallbacks(parse_policy(POLICY), window_s=60.0)
    for i in range(100):  # a minute of store outage: every report a fallback
        fb.add(report("personal", "unavailable"), 1_000.0 + i * 0.5)
    assert fb.summary("shop", 1_050.0)["personal"]["rate"] == 1.0  # type: ignore[index]
    for i in range(30):  # the store is back: 30 s of joined requests
        fb.add(report("personal"), 1_050.0 + i)
    half = fb.summary("shop", 1_080.0)["personal"]  # type: ignore[index]
    # [1020, 1080) holds the outage's seconds 1020..1049 (60 reports) and the 30 joined ones
    assert (half["reports"], half["fallbacks"], half["reasons"]) == (90, 60, {"unavailable": 60})
    later = fb.summary("shop", 1_110.0)["personal"]  # type: ignore[index]
    assert (later["reports"], later["fallbacks"], later["rate"], later["reasons"]) == (30, 0, 0.0, {})
    gone = fb.summary("shop", 4_000.0)["personal"]  # type: ignore[index]
    assert (gone["reports"], gone["rate"]) == (0, None)  # nothing reported lately: no rate, not 0


def test_a_report_without_a_reason_keeps_its_old_shape() -> None:
    doc = ShadowReport("req", "personal", "shop", 200, 1.0, "d", (), 0.0).to_json()
    assert "fallback" not in doc  # old controllers read it unchanged


async def test_the_controller_status_carries_the_rate_the_dashboard_shows() -> None:
    from cohortgate.controller.loop import Controller
    from cohortgate.store.events import InProcessSink
    from cohortgate.store.state import InProcessState

    controller = Controller(parse_policy(POLICY), InProcessState(), InProcessSink(), clock=lambda: 1_000.0)
    await controller.start()
    controller.ingest([report("personal"), report("personal", "unavailable"), report("control")], 1_000.0)
    status = controller.status(1_000.0)["routes"]
    assert status["shop"]["features"]["personal"]["rate"] == 0.5
    assert status["shop"]["features"]["control"]["rate"] == 0.0
    assert status["plain"]["features"] is None
    window = controller.config.window_s  # the same window as the error rates beside it
    assert status["shop"]["features"]["personal"]["window_s"] == window
    later = controller.status(1_000.0 + window + 1)["routes"]["shop"]["features"]["personal"]
    assert (later["reports"], later["rate"]) == (0, None)
