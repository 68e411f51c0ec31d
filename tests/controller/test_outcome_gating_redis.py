"""The outcome journal as a Redis stream, against a real redis-server: producers XADD, restarts replay.

A server-side producer writes the same JSON records ``POST /outcomes`` takes (``XADD
{cohortgate}:outcomes * record JSON``); the controller ingests them at its next interval, appends
what its API accepted to the same stream (and does not read its own entries back), and a
controller started later replays the whole stream into the same lift and verdicts -- which then
gate the rollout exactly as before the restart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cohortgate.controller.loop import Controller
from cohortgate.core.contract import OUTCOMES_STREAM
from cohortgate.core.rollout import Phase, Signal
from cohortgate.store.events import InProcessSink
from cohortgate.store.redis import redis_client
from cohortgate.store.state import RedisState
from tests.controller.conftest import RedisServer
from tests.controller.test_outcome_gating import Clock, outcome_records, policy

pytestmark = pytest.mark.integration


def results(controller: Controller) -> dict:
    return {
        (r.metric, r.challenger): (
            r.units_challenger,
            r.units_control,
            round(r.challenger_value, 9),
            r.decision.verdict,
        )
        for r in controller.outcomes.latest["shop"]
    }


async def controller_on(server: RedisServer, clock: Clock) -> Controller:
    # generous timeouts: the CI box is a busy 2-core machine
    c = Controller(policy(), RedisState(server.url, timeout_s=10.0), InProcessSink(), clock=clock)
    await c.start()
    return c


async def test_producers_xadd_outcomes_and_a_restarted_controller_replays_the_stream(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        clock = Clock()
        first = await controller_on(server, clock)
        producer = redis_client(server.url, timeout_s=10.0)
        records = outcome_records(300, (0.5, 0.1), (10.0, 10.0))  # the canary loses on conversion
        half = next(i for i, r in enumerate(records) if r.get("variant") == "canary")  # control's via the stream
        pipe = producer.pipeline(transaction=False)
        for r in records[:half]:
            pipe.xadd(OUTCOMES_STREAM, {"record": json.dumps(r)})
        pipe.xadd(OUTCOMES_STREAM, {"record": "not json"})  # counted as a bad record, never a crash
        await pipe.execute()
        # what the API accepted (POST /outcomes feeds this ledger): journaled to the stream at the tick
        first.outcomes.ledger.ingest_many(records[half:])
        changes = await first.tick()
        assert first.outcomes.ledger.counts == {"accepted": len(records), "bad_record": 1}
        assert first.outcomes.journal_ok is True
        assert await producer.xlen(OUTCOMES_STREAM) == half + 1 + (len(records) - half)
        assert [(t.signal, t.after) for t in changes] == [(Signal.LOSS, Phase.ROLLED_BACK)]
        before = results(first)
        await first.tick()  # its own entries are not read back as duplicates
        assert first.outcomes.ledger.counts["duplicate"] == 0

        # a restart: a new controller (same Redis) replays the stream into the same lift and verdicts
        second = await controller_on(server, clock)
        assert dict(second.outcomes.ledger.counts) == {"accepted": len(records), "bad_record": 1}, (
            second.outcomes.ledger.counts
        )
        assert second.outcomes.replayed == len(records) + 1
        await second.tick()
        assert results(second) == before
        assert second.states["shop"].variants["canary"].phase is Phase.ROLLED_BACK  # the state came back too

        # a producer's outcome without a time is dated by its entry id, so a replay judges it the same
        served = {"kind": "exposure", "route": "shop", "variant": "canary", "unit": "fresh", "t": time.time()}
        for r in (
            {**served, "request_id": "fresh-1"},
            {"kind": "outcome", "metric": "clicks", "value": 2, "request_id": "fresh-1"},
        ):
            await producer.xadd(OUTCOMES_STREAM, {"record": json.dumps(r)})
        await second.tick()
        assert second.outcomes.ledger.counts["accepted"] == len(records) + 2
        third = await controller_on(server, clock)
        assert third.outcomes.ledger.counts["accepted"] == len(records) + 2
        await producer.aclose()
        for c in (first, second, third):
            await c.store.close()
    finally:
        server.stop()
