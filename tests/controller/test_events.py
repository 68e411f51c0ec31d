"""Events and sinks: the in-process queue, and Redis Streams against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest

from cohortgate.controller.metrics import TrafficMetrics
from cohortgate.store.events import (
    EVENTS_STREAM,
    REPORT,
    REQUEST,
    Event,
    InProcessSink,
    RedisStreamSink,
    RedisStreamSource,
)
from cohortgate.store.redis import redis_client
from sidecar.report import RedisStreamSink as SidecarRedisSink
from sidecar.report import ShadowReport


def event(i: int = 0, **kw) -> Event:
    base = dict(
        kind=REQUEST,
        route="tabular",
        variant="canary",
        status=200,
        latency_ms=12.5,
        request_id=f"r{i}",
        region="eu",
        unit="ab12cd34ef56ab78",
        ts=1.5,
    )
    base.update(kw)
    return Event(**base)


def test_event_fields_round_trip():
    e = event(shadow_of="")
    assert Event.from_fields(e.to_fields()) == e
    assert "shadow_of" not in e.to_fields()  # empty fields stay out of the stream entry


def test_sidecar_reports_are_understood_in_both_encodings():
    report = ShadowReport("rid-1", "challenger", "tabular", 200, 3.25, "d1", (("label", "d2"),), 10.0)
    from_stream = Event.from_fields(report.to_fields())
    from_http = Event.from_report(report.to_json())
    for e in (from_stream, from_http):
        assert (e.kind, e.variant, e.model, e.request_id, e.digest, e.latency_ms) == (
            REPORT,
            "challenger",
            "tabular",
            "rid-1",
            "d2",  # the label's digest: two classifiers agree when they give the same label
            3.25,
        )
    no_label = ShadowReport("rid-2", "challenger", "mlp", 200, 1.0, "d3", (("out", "d4"),), 10.0)
    assert Event.from_fields(no_label.to_fields()).digest == Event.from_report(no_label.to_json()).digest == "d3"


async def test_in_process_sink_is_bounded_and_counts_drops():
    metrics = TrafficMetrics()
    sink = InProcessSink(capacity=3, metrics=metrics)
    await sink.start()
    for i in range(5):
        sink.emit(event(i))
    assert sink.dropped == 2 and len(sink) == 3
    assert [e.request_id for e in await sink.read(10, 0.01)] == ["r0", "r1", "r2"]
    started = time.monotonic()
    assert await sink.read(10, 0.05) == []
    assert time.monotonic() - started >= 0.04
    body, _ = metrics.render()
    assert b'cohortgate_events_dropped_total{reason="overflow",sink="memory"} 2.0' in body


async def test_in_process_read_wakes_up_on_emit():
    sink = InProcessSink()
    await sink.start()
    reader = asyncio.create_task(sink.read(10, 5.0))
    await asyncio.sleep(0.01)
    sink.emit(event())
    assert len(await asyncio.wait_for(reader, 1.0)) == 1


@pytest.mark.integration
async def test_redis_sink_batches_into_a_trimmed_stream_and_a_group_reads_each_event_once(redis_server):
    sink = RedisStreamSink(redis_server.url, maxlen=1000, batch=100)
    await sink.start()
    for i in range(3000):
        sink.emit(event(i))
    await sink.flush()
    client = redis_client(redis_server.url)
    try:
        length = await client.xlen(EVENTS_STREAM)
        assert 1000 <= length < 3000  # MAXLEN ~ trims by whole nodes
        assert sink.sent == 3000 and sink.dropped == 0

        reader = redis_client(redis_server.url, timeout_s=3)
        a = RedisStreamSource(reader, consumer="a")
        b = RedisStreamSource(reader, consumer="b")
        await a.ensure_group()
        await b.ensure_group()
        for i in range(10):
            sink.emit(event(10_000 + i))
        await sink.flush()
        got_a = await a.read(100, 0.2)
        got_b = await b.read(100, 0.2)
        assert [e.request_id for e in got_a] == [f"r{10_000 + i}" for i in range(10)]
        assert got_b == []  # a consumer group hands each entry to one consumer
        await a.ack()
        pending = await client.xpending(EVENTS_STREAM, "cohortgate-controller")
        assert pending["pending"] == 0
        await reader.aclose()
    finally:
        await sink.close()
        await client.aclose()


@pytest.mark.integration
async def test_controller_source_reads_the_sidecars_report_stream(redis_server):
    reader = redis_client(redis_server.url, timeout_s=3)
    source = RedisStreamSource(reader, consumer="c")
    await source.ensure_group()
    sidecar = SidecarRedisSink(redis_server.url)  # the sidecar's own sink, default stream
    await sidecar.send([ShadowReport("rid-9", "challenger", "tabular", 200, 2.0, "dd", (), 1.0)])
    await sidecar.close()
    got = await source.read(10, 0.2)
    assert [(e.kind, e.request_id, e.variant) for e in got] == [(REPORT, "rid-9", "challenger")]
    await reader.aclose()


@pytest.mark.integration
async def test_redis_down_never_blocks_emit_drops_are_counted_and_sending_resumes(redis_server):
    metrics = TrafficMetrics()
    sink = RedisStreamSink(redis_server.url, capacity=500, timeout_s=0.2, backoff_s=0.1, metrics=metrics)
    await sink.start()
    redis_server.kill()
    # emit is a bounded append that never waits for the sender: with Redis gone and no await between
    # the calls, exactly `capacity` events are kept and the rest are counted as dropped at once.
    for i in range(5000):
        sink.emit(event(i))
    assert sink.dropped == 4500
    await asyncio.sleep(0.5)  # the sender fails against the dead server; those drops add to the count
    assert sink.dropped >= 4500
    body, _ = metrics.render()
    assert b'cohortgate_events_dropped_total{reason="overflow",sink="redis"}' in body

    redis_server.restart()
    client = redis_client(redis_server.url)
    try:
        deadline = time.monotonic() + 5
        sink.emit(event(99_999))
        while time.monotonic() < deadline:
            entries = await client.xrange(EVENTS_STREAM)
            if any(f.get("request_id") == "r99999" for _, f in entries):
                break
            sink.emit(event(99_999))
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the sink did not resume after Redis came back")
    finally:
        await sink.close()
        await client.aclose()
