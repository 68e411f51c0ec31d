"""Issue 19: every served unit counts in an outcome metric's denominator, not only the units that report.

Envoy's access log carries the processor's ``x-cohortgate-exposure`` request header for routes that
declare metrics; the ALS parser keeps it on entries a backend answered, the controller verifies it
and feeds an exposure into the outcome ledger. A unit exposed without converting is then a zero.
"""

from __future__ import annotations

import time
from pathlib import Path

from envoy.service.accesslog.v3 import als_pb2

from cohortgate.controller.als import AccessLogReceiver, event_from_entry, routes_with_metrics
from cohortgate.controller.loop import Controller
from cohortgate.core.exposure import exposure_id, mac_key, mint
from cohortgate.core.policy import parse_policy
from cohortgate.store.events import REQUEST, Event, InProcessSink
from cohortgate.store.state import InProcessState
from tests.controller.test_als import entry

SECRET = "exposure-feed-key-0123456789abcdef"
KEY = mac_key(SECRET.encode())

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
  - name: plain
    match: {path_prefix: /v2/models/plain}
    variants:
      - {name: control, weight: 100, backends: [{url: "http://127.0.0.1:9", region: eu}]}
"""


def policy():
    return parse_policy(POLICY, filename="exposure-feed.yaml", base_dir=Path("/tmp"))


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def controller_for(monkeypatch, clock: Clock, **kwargs) -> Controller:
    monkeypatch.setenv("COHORTGATE_EXPOSURE_KEY", SECRET)  # the controller's ledger verifies with it
    sink = InProcessSink()
    await sink.start()
    c = Controller(policy(), InProcessState(), sink, clock=clock, **kwargs)
    await c.start()
    return c


def served(variant: str, i: int, now: float, route: str = "shop", token: str | None = None) -> Event:
    """What the ALS parser emits for one answered request of unit ``i`` (the gateway minted its token)."""
    unit, rid = f"{variant[:2]}{i:06d}", f"req-{variant}-{i}"
    if token is None:
        token = mint(KEY, route, variant, unit, now, exposure_id(rid))
    return Event(REQUEST, route, variant, 200, 12.0, request_id=rid, unit=unit, region="eu", ts=now, exposure=token)


def conversion(ev: Event) -> dict:
    return {"kind": "outcome", "exposure": ev.exposure, "metric": "conversion", "value": 1}


async def test_units_that_never_post_an_outcome_count_in_a_binary_metrics_denominator(monkeypatch):
    clock = Clock(time.time())
    c = await controller_for(monkeypatch, clock)
    events = [served(v, i, clock.t) for v in ("control", "canary") for i in range(100)]
    c.ingest(events)  # every answered request of the route, from Envoy's access log
    for ev in events[:10] + events[100:110]:  # 10 units of each arm convert and say so
        assert c.outcomes.ledger.ingest(conversion(ev)) == "accepted"
    (conv,) = c.outcomes.ledger.results("shop")
    assert (conv.units_control, conv.units_challenger) == (100, 100)
    assert (conv.control_value, conv.challenger_value) == (0.10, 0.10)  # not 100 %: non-converters are zeros


# ---------------------------------------------------------------------- the ALS parser


def measured(route: str) -> bool:
    return route == "tabular"


def logged(token: str | None, **kwargs):
    """An access-log entry of an answered request with the processor's exposure header (test_als's shape)."""
    e = entry(**kwargs)
    if token is not None:
        e.request.request_headers["x-cohortgate-exposure"] = token
    return e


TOKEN = mint(KEY, "tabular", "canary", "0123456789abcdef", 1_700_000_000, exposure_id("rid-1"))


def test_the_parser_keeps_the_exposure_token_of_an_answered_request_on_a_route_with_metrics():
    assert event_from_entry(logged(TOKEN), measured=measured).exposure == TOKEN
    assert event_from_entry(logged(None), measured=measured).exposure == ""  # no key at the gateway: no token
    assert event_from_entry(logged(TOKEN)).exposure == ""  # the caller names no route with metrics
    plain = logged(TOKEN, route="", variant="", cluster="cg.plain.canary.0")
    assert event_from_entry(plain, measured=measured).exposure == ""  # a route without metrics


def test_the_parser_drops_the_token_where_no_backend_answered_or_a_client_could_have_set_it():
    failed = logged(TOKEN)
    failed.common_properties.ClearField("time_to_last_upstream_rx_byte")  # e.g. 503 UF: connect failure
    assert event_from_entry(failed, measured=measured).exposure == ""
    denied = logged(TOKEN, cluster="")  # no upstream cluster: the headers are the client's
    assert event_from_entry(denied, measured=measured).exposure == ""
    mirrored = logged(TOKEN, shadow_of="control")  # a shadow's copy exposes nobody
    assert event_from_entry(mirrored, measured=measured).exposure == ""
    assert event_from_entry(logged("not a token\n"), measured=measured).exposure == ""
    assert event_from_entry(logged("A" * 513), measured=measured).exposure == ""


async def test_the_receiver_sends_the_token_on_and_the_redis_stream_carries_it():
    sink = InProcessSink()
    await sink.start()
    receiver = AccessLogReceiver(sink, None, None, None, measured)
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend([logged(TOKEN)])
    receiver.handle(message)
    (ev,) = await sink.read(10, 0.01)
    assert ev.exposure == TOKEN
    assert Event.from_fields(ev.to_fields()) == ev  # the Redis stream entry round-trips it
    assert "exposure" not in Event.from_fields(event_from_entry(logged(None)).to_fields()).to_fields()


def test_routes_with_metrics_follows_the_current_policy():
    current = policy()
    assert [r for r in ("shop", "plain", "gone") if routes_with_metrics(lambda: current)(r)] == ["shop"]


# ---------------------------------------------------------------------- the controller: strict and counted once


async def test_a_token_that_does_not_verify_or_names_another_unit_is_counted_and_dropped(monkeypatch):
    clock = Clock(time.time())
    c = await controller_for(monkeypatch, clock)
    genuine = served("canary", 1, clock.t)
    head, tag = genuine.exposure.rsplit(".", 1)
    forged = f"{head}.{'B' if tag[0] == 'A' else 'A'}{tag[1:]}"
    other_unit = mint(KEY, "shop", "canary", "someone-else", clock.t)
    other_variant = mint(KEY, "shop", "control", genuine.unit, clock.t)
    stale = mint(KEY, "shop", "canary", genuine.unit, clock.t - 8 * 24 * 3600)  # past the 7-day window
    c.ingest(
        [
            served("canary", 1, clock.t, token=forged),
            served("canary", 1, clock.t, token=other_unit),
            served("canary", 1, clock.t, token=other_variant),
            served("canary", 1, clock.t, token=stale),
            served("canary", 1, clock.t, token="1.shop.canary.x"),
            served("control", 1, clock.t, route="plain"),  # no metrics there: never counted as exposed
        ]
    )
    ledger = c.outcomes.ledger
    assert dict(ledger.exposure_counts) == {
        "forged": 1,
        "mismatch": 2,
        "expired": 1,
        "malformed": 1,
        "unmeasured": 1,
    }
    assert ledger.results("shop") == [] and ledger.unjournaled == []  # nothing reached a denominator
    assert dict(ledger.counts) == {}  # the clients' outcome counts are their own


async def test_an_exposure_counts_once_whether_the_log_or_the_outcome_says_so_first(monkeypatch):
    clock = Clock(time.time())
    c = await controller_for(monkeypatch, clock)
    early, late = served("canary", 1, clock.t), served("canary", 2, clock.t)
    c.ingest([early, early])  # Envoy retried the log, or a replica read it twice
    assert c.outcomes.ledger.ingest(conversion(late)) == "accepted"  # the outcome overtook the access log
    c.ingest([late, served("control", 1, clock.t)])
    assert dict(c.outcomes.ledger.exposure_counts) == {"accepted": 2, "duplicate": 2}
    (conv,) = c.outcomes.ledger.results("shop")
    assert (conv.units_challenger, conv.challenger_value) == (2, 0.5)


async def test_the_journal_keeps_the_exposures_across_a_restart(monkeypatch, tmp_path):
    from cohortgate.controller.gating import OutcomeGate

    monkeypatch.setenv("COHORTGATE_EXPOSURE_KEY", SECRET)
    journal = tmp_path / "outcomes.jsonl"
    clock = Clock(time.time())

    def gate() -> OutcomeGate:
        return OutcomeGate.from_env(policy(), journal_path=journal, clock=clock)

    first = await controller_for(monkeypatch, clock, outcomes=gate())
    events = [served(v, i, clock.t) for v in ("control", "canary") for i in range(100)]
    first.ingest(events)
    for ev in events[:5] + events[100:120]:
        first.outcomes.ledger.ingest(conversion(ev))
    await first.tick()  # the interval journals what the loop and the API accepted
    second = await controller_for(monkeypatch, clock, outcomes=gate())
    (conv,) = second.outcomes.ledger.results("shop")
    assert (conv.units_control, conv.units_challenger) == (100, 100)
    assert (conv.control_value, conv.challenger_value) == (0.05, 0.20)
    assert second.outcomes.ledger.exposure_counts["accepted"] == 200 and second.outcomes.ledger.counts["accepted"] == 25
    # a label imported later by request id meets the access log's exposure
    assert (
        second.outcomes.ledger.ingest(
            {"kind": "outcome", "metric": "conversion", "value": 1, "request_id": events[6].request_id}
        )
        == "accepted"
    )


# ---------------------------------------------------------------------- the cost (not a test)


def _cost(repeat: int = 9, n: int = 20_000) -> None:
    """The controller's cost per access-log entry of the exposure feed, process CPU time, best of
    ``repeat`` x ``n``: the token's verify alone, the ledger's whole `expose` (verify, record,
    tallies, journal queue), and `Controller.ingest` per event with the token and without it
    (the arms interleaved). ``python -m tests.controller.test_exposure_feed``."""
    import asyncio
    import os

    from cohortgate.controller.outcomes import OutcomeLedger
    from cohortgate.core.exposure import verify

    os.environ["COHORTGATE_EXPOSURE_KEY"] = SECRET
    now = time.time()
    events = [served("control" if i % 2 else "canary", i, now) for i in range(n)]
    bare = [Event(e.kind, e.route, e.variant, 200, 12.0, e.request_id, "eu", e.unit, now) for e in events]
    specs = {"shop": []}

    def best(run) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.process_time()
            run()
            times.append(time.process_time() - t0)
        return min(times) / n * 1e6

    def verify_all() -> None:
        for e in events:
            verify(e.exposure, (KEY,), now, 7 * 86400.0)

    def expose_all() -> None:
        ledger = OutcomeLedger(specs, {"shop": "control"}, (KEY,))
        for e in events:
            ledger.expose(e.exposure, e.route, e.variant, e.unit, e.request_id, now)

    async def controllers():
        out = []
        for _ in range(2 * repeat):
            sink = InProcessSink()
            await sink.start()
            c = Controller(policy(), InProcessState(), sink, clock=lambda: now)
            await c.start()
            out.append(c)
        return out

    pool = asyncio.run(controllers())
    with_t, without_t = [], []
    for i in range(repeat):  # a fresh controller per run: each exposure is new, as in production
        for arm, batch, out in ((0, bare, without_t), (1, events, with_t)):
            c = pool[2 * i + arm]
            t0 = time.process_time()
            c.ingest(batch, now)
            out.append(time.process_time() - t0)
    print(f"verify {best(verify_all):.2f} us; ledger.expose {best(expose_all):.2f} us per entry")
    a, b = min(without_t) / n * 1e6, min(with_t) / n * 1e6
    print(f"Controller.ingest per event: {a:.2f} us without the token, {b:.2f} us with it (+{b - a:.2f} us)")


if __name__ == "__main__":
    _cost()
