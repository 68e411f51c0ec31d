"""Envoy access-log entries -> events: the pure mapping, and the real grpc.aio service on a Unix socket."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from cohortgate.controller.als import AccessLogReceiver, event_from_entry, grpc_target, serve_als
from cohortgate.controller.loop import Controller
from cohortgate.controller.metrics import TrafficMetrics
from cohortgate.core.rollout import Phase
from cohortgate.store.events import REQUEST, InProcessSink
from cohortgate.store.state import InProcessState
from tests.controller.policies import make_policy


def entry(
    status=200,
    variant="canary",
    route="tabular",
    cluster="cg.tabular.canary.0",
    shadow_of=None,
    rid="rid-1",
    shadows=(),
    unit="0123456789abcdef",
) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.start_time.FromSeconds(1_700_000_000)
    c.time_to_first_upstream_tx_byte.FromMilliseconds(3)
    c.time_to_last_upstream_rx_byte.FromMilliseconds(45)
    c.duration.FromMilliseconds(50)
    c.upstream_cluster = cluster
    e.request.request_id = rid
    headers = {"x-cohortgate-unit": unit, "x-cohortgate-region": "eu"}
    if route:
        headers["x-cohortgate-route"] = route
    if variant:
        headers["x-cohortgate-variant"] = variant
    if shadow_of:
        headers["x-cohortgate-shadow-of"] = shadow_of
    headers.update({f"x-cohortgate-shadow-{i}": c for i, c in enumerate(shadows)})
    e.request.request_headers.update(headers)
    if status:
        e.response.response_code.value = status
    return e


def test_entry_becomes_an_event_with_upstream_latency_and_hashed_unit():
    ev = event_from_entry(entry(status=503))
    assert (ev.kind, ev.route, ev.variant, ev.status, ev.request_id, ev.region, ev.unit) == (
        REQUEST,
        "tabular",
        "canary",
        503,
        "rid-1",
        "eu",
        "0123456789abcdef",
    )
    assert ev.latency_ms == pytest.approx(42.0)  # last upstream byte - first upstream byte
    assert ev.ts == 1_700_000_000


def test_route_and_variant_come_from_the_upstream_cluster_never_from_headers():
    ev = event_from_entry(entry(status=0, variant="", route=""))
    assert (ev.route, ev.variant, ev.status) == ("tabular", "canary", 0)
    # headers that disagree with the cluster lose: only Envoy's router names the backend
    ev = event_from_entry(entry(variant="canary", cluster="cg.tabular.control.0"))
    assert (ev.route, ev.variant) == ("tabular", "control")
    denied = event_from_entry(entry(variant="", route="", cluster=""))
    assert (denied.route, denied.variant) == ("", "")


FORGED = {
    "x-cohortgate-route": "tabular",
    "x-cohortgate-variant": "canary",
    "x-cohortgate-unit": "forged-unit",
    "x-cohortgate-region": "forged-region",
    "x-cohortgate-shadow-0": "cg.tabular.challenger.0",
}


def unrouted(status: int, details: str, rid: str, path: str = "/v2/models/tabular/infer") -> Any:
    """What real Envoy logs for a request the router never sent upstream (see test_forged_telemetry):
    no upstream cluster, no upstream timings, and the request headers exactly as the client sent them."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.common_properties.start_time.FromSeconds(1_700_000_000)
    e.common_properties.duration.FromMilliseconds(2)
    e.request.request_id = rid
    e.request.request_method = 3  # POST (envoy.config.core.v3.RequestMethod)
    e.request.path = path
    e.request.request_headers.update(FORGED)
    e.response.response_code.value = status
    e.response.response_code_details = details
    return e


def route_of(method: str, path: str) -> str:
    return "tabular" if (method, path.partition("?")[0]) == ("POST", "/v2/models/tabular/infer") else ""


def feed(receiver: AccessLogReceiver, entries) -> None:
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(entries)
    receiver.handle(message)


def test_300_unauthenticated_requests_with_forged_headers_are_not_canary_traffic():
    """Issue 17.2: a denial's request headers are the client's; they must not reach the controller."""
    sink, metrics, denied = InProcessSink(), TrafficMetrics(), []
    receiver = AccessLogReceiver(sink, metrics, denied.append, route_of)
    feed(receiver, [unrouted(401, "cohortgate_unauthenticated", f"u{i}") for i in range(300)])
    assert receiver.emitted == 0 and len(sink) == 0  # was: 300 canary events
    assert len(denied) == 300
    # counted by the route its path matches, never by a client-chosen variant, unit or region
    assert {(e.route, e.variant, e.unit, e.region, e.status) for e in denied} == {("tabular", "", "", "", 401)}
    body, _ = metrics.render()
    assert b'cohortgate_requests_total{route="tabular",status_class="4xx",variant="none"} 300.0' in body
    assert b"canary" not in body and b"challenger" not in body  # no forged variant nor shadow copy
    assert event_from_entry(unrouted(404, "cohortgate_no_route", "x", "/nowhere"), route_of).route == ""


async def test_forged_requests_while_the_processor_is_down_cannot_roll_back_a_healthy_canary():
    """Issue 17.2: 250 fail-closed 503s with forged canary headers, then healthy traffic: no rollback."""
    policy = make_policy(min_samples=20)
    now = [1_000.0]
    sink = InProcessSink()
    await sink.start()
    controller = Controller(policy, InProcessState(), sink, clock=lambda: now[0])
    await controller.start()
    receiver = AccessLogReceiver(sink, TrafficMetrics(), None, route_of)
    down = "ext_proc_error_gRPC_error_14{upstream_connect_error_or_disconnect/reset_before_headers}"
    for second in range(10):
        feed(receiver, [unrouted(503, down, f"p{second}-{i}") for i in range(25)])  # the processor is down
        healthy = [(f"{second:04d}{i:012d}", "canary" if i % 10 == 0 else "control") for i in range(50)]
        feed(receiver, [entry(rid=u, unit=u, variant=v, cluster=f"cg.tabular.{v}.0") for u, v in healthy])
        controller.ingest(await sink.read(10_000, 0.01), now[0])
        now[0] += 1
        await controller.tick()
    state = controller.states["tabular"].variants["canary"]
    assert state.phase is not Phase.ROLLED_BACK, state.reason  # was: rolled back on forged 503s
    window = controller.status()["routes"]["tabular"]["variants"]["canary"]["window"]
    assert window["requests"] == 50 and window["errors"] == 0
    assert receiver.emitted == 500  # only the routed entries


def test_grpc_targets():
    assert grpc_target("uds:/tmp/als.sock") == "unix:/tmp/als.sock"
    assert grpc_target("tcp:127.0.0.1:9001") == "127.0.0.1:9001"
    assert grpc_target("tcp:[::1]:9001") == "[::1]:9001"
    for bad in ("tcp:10.0.0.5:9001", "http://x", "tcp:127.0.0.1:0", "uds:"):
        with pytest.raises(ValueError):
            grpc_target(bad)


@pytest.mark.integration
async def test_als_service_streams_entries_into_the_sink(tmp_path):
    sink = InProcessSink()
    await sink.start()
    metrics = TrafficMetrics()
    sock = tmp_path / "als.sock"
    server, receiver = await serve_als(sink, f"uds:{sock}", metrics)
    assert sock.stat().st_mode & 0o777 == 0o600  # outcomes drive rollbacks: only Envoy's user may send them
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)

            async def messages():
                first = als_pb2.StreamAccessLogsMessage()
                first.identifier.log_name = "cohortgate"
                first.http_logs.log_entry.extend(
                    [entry(rid="a", shadows=["cg.tabular.challenger.0"]), entry(status=500, rid="b")]
                )
                yield first
                more = als_pb2.StreamAccessLogsMessage()
                more.http_logs.log_entry.extend(
                    [
                        entry(variant="", route="", cluster="", rid="denied", status=401),  # no variant: metrics only
                        entry(shadow_of="control", variant="challenger", rid="mirror"),  # a mirrored copy: neither
                    ]
                )
                yield more

            await stub.StreamAccessLogs(messages())
        events = await sink.read(10, 1.0)
        assert [(e.request_id, e.status) for e in events] == [("a", 200), ("b", 500)]
        assert receiver.entries == 4 and receiver.emitted == 2
        body, _ = metrics.render()
        assert b'cohortgate_requests_total{route="tabular",status_class="5xx",variant="canary"} 1.0' in body
        assert b'cohortgate_requests_total{route="none",status_class="4xx",variant="none"} 1.0' in body
        assert b'cohortgate_request_duration_seconds_count{route="tabular",variant="canary"} 2.0' in body
        assert b'cohortgate_shadow_copies_total{route="tabular",shadow="challenger"} 1.0' in body
    finally:
        await server.stop(0)
