"""Envoy access-log entries -> events: the pure mapping, and the real grpc.aio service on a Unix socket."""

from __future__ import annotations

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from cohortgate.controller.als import event_from_entry, grpc_target, serve_als
from cohortgate.controller.metrics import TrafficMetrics
from cohortgate.store.events import REQUEST, InProcessSink


def entry(
    status=200, variant="canary", route="tabular", cluster="cg.tabular.canary.0", shadow_of=None, rid="rid-1",
    shadows=(),
) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.start_time.FromSeconds(1_700_000_000)
    c.time_to_first_upstream_tx_byte.FromMilliseconds(3)
    c.time_to_last_upstream_rx_byte.FromMilliseconds(45)
    c.duration.FromMilliseconds(50)
    c.upstream_cluster = cluster
    e.request.request_id = rid
    headers = {"x-cohortgate-unit": "0123456789abcdef", "x-cohortgate-region": "eu"}
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


def test_missing_headers_fall_back_to_the_cluster_name_and_missing_status_is_zero():
    ev = event_from_entry(entry(status=0, variant="", route=""))
    assert (ev.route, ev.variant, ev.status) == ("tabular", "canary", 0)
    denied = event_from_entry(entry(variant="", route="", cluster=""))
    assert (denied.route, denied.variant) == ("", "")


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
