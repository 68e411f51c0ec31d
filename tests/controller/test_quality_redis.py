"""Quality reports over Redis (issue 20): a sidecar started with ``--report-to redis://...`` XADDs its
windows to ``QUALITY_STREAM``; the controller's consumer group reads them beside the event and shadow
streams and hands them to its `QualityMonitor`. Against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
import pytest

from cohortgate.controller.loop import Controller
from cohortgate.core.contract import CONSUMER_GROUP, QUALITY_STREAM
from cohortgate.core.sketch import NumericSketch, QualityReport
from cohortgate.store.events import QUALITY, RedisStreamSource
from cohortgate.store.redis import redis_client
from cohortgate.store.state import RedisState
from sidecar.report import sink_from_url
from tests.controller.quality_sim import EDGES, quality_policy
from tests.controller.test_redis_controller import FAST, wait_for

pytestmark = pytest.mark.integration

TIMEOUT_S = 60.0  # generous: a busy 2-core CI box


def report(variant: str, mean: float, seed: int, rows: int = 800) -> QualityReport:
    x = np.random.default_rng(seed).normal(mean, 1.0, rows)
    now = time.time()
    sketches = {"x": NumericSketch.of(x, EDGES)}
    return QualityReport("tabular", variant, now - 1, now, sketches, route="tabular", rows=rows)


async def test_a_sidecars_quality_stream_reaches_the_controller_and_trips_drift(redis_server) -> None:
    """Control's first window is its reference; a canary whose inputs moved by 1 sd against control's
    on the same window is rolled back with the drift evidence in the audit trail. A malformed entry on
    the stream is counted as rejected and skipped."""
    policy = quality_policy()
    reader = redis_client(redis_server.url, timeout_s=2.0)
    controller = Controller(
        policy, RedisState(redis_server.url), RedisStreamSource(reader, consumer="ctl"), config=FAST, name="ctl"
    )
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    sink = sink_from_url(redis_server.url)  # what `cohortgate sidecar --report-to redis://...` builds
    raw = redis_client(redis_server.url)
    try:
        assert await wait_for(lambda: controller.source._ready, TIMEOUT_S)  # the group exists: nothing missed
        await raw.xadd(QUALITY_STREAM, {"report": "{not json"})
        await sink.send_quality(report("control", 0.0, 1))  # the reference
        monitor = controller.quality
        assert await wait_for(lambda: monitor.routes["tabular"].baseline is not None, TIMEOUT_S)
        assert monitor.rejected == 1
        await sink.send_quality(report("control", 0.0, 2))
        await sink.send_quality(report("canary", 1.0, 3))
        assert await wait_for(
            lambda: controller.states["tabular"].variants["canary"].phase.value == "rolled_back", TIMEOUT_S
        )
        records = []
        for _ in range(500):  # the audit record follows the state (generous for busy CI)
            records = [r for r in await controller.store.audit("tabular") if r["action"] == "rollback"]
            if records:
                break
            await asyncio.sleep(0.02)
        assert records and "inputs drift against control" in records[0]["reason"]
        assert records[0]["evidence"]["quality"]["drifted"] == {"x": ["psi", "js", "wasserstein"]}
        assert (await raw.xpending(QUALITY_STREAM, CONSUMER_GROUP))["pending"] == 0  # acknowledged
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)
        await sink.close()
        await raw.aclose()
        await reader.aclose()


async def test_quality_entries_become_quality_events(redis_server) -> None:
    reader = redis_client(redis_server.url, timeout_s=2.0)
    source = RedisStreamSource(reader, consumer="c")
    await source.ensure_group()
    sink = sink_from_url(redis_server.url)
    try:
        sent = report("canary", 0.0, 4, rows=10)
        await sink.send_quality(sent)
        events = []
        for _ in range(50):
            events += await source.read(100, 0.1)
            if events:
                break
        assert [e.kind for e in events] == [QUALITY]
        assert QualityReport.from_json(orjson.loads(events[0].quality)) == sent
        await source.ack()
    finally:
        await sink.close()
        await reader.aclose()
