"""Online features read from a Feast Redis online store, in the layout the real `feast materialize`
writes.

The keys and values in ``fixtures/feast_redis.json`` were written by Feast itself (local provider,
Redis online store) and recorded byte for byte, with what Feast's own `get_online_features`
answered; ``fixtures/make_feast_fixture.py`` says how to make them again. The tests load those bytes
into a real redis-server and read them back with `FeastRedisReader`: same values as Feast, and each
way to fall back (missing, stale, over budget, unavailable) counted by its reason.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.features import FeastRedisReader, FeatureSpec, entity_key, field_hash

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "feast_redis.json").read_text())
USERS = [1001, 1002, 1003, 1004, 1005]


def spec(**overrides) -> FeatureSpec:
    base = {
        "project": FIXTURE["project"],
        "join_key": FIXTURE["join_key"],
        "views": tuple(FIXTURE["features"]),
        "budget_ms": 10_000.0,  # generous: a busy 2-core CI box must not turn a read into over_budget
        "max_age_s": 86_400.0,
    }
    return FeatureSpec(**{**base, **overrides})


def test_keys_and_fields_are_the_ones_feast_wrote() -> None:
    keys = set(FIXTURE["hashes"])
    assert {entity_key(["user_id"], [u], "cgdemo").hex() for u in USERS} == keys
    fields = set().union(*(set(h) for h in FIXTURE["hashes"].values()))
    for feature in FIXTURE["features"]:
        assert field_hash(*feature.split(":")).hex() in fields
    assert b"_ts:user_stats".hex() in fields and b"_ts:user_profile".hex() in fields


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    import redis

    from tests.controller.conftest import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        r = redis.Redis.from_url(server.url)
        for key, fields in FIXTURE["hashes"].items():
            r.hset(bytes.fromhex(key), mapping={bytes.fromhex(f): bytes.fromhex(v) for f, v in fields.items()})
        r.close()
        yield server.url
    finally:
        server.stop()


class CountingRedis:
    """A real redis.asyncio client that counts round trips (pipelines executed, commands sent)."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self.client = redis.Redis.from_url(url)
        self.round_trips = 0
        self.commands = 0

    def pipeline(self, transaction: bool = True):
        pipe = self.client.pipeline(transaction=transaction)
        execute = pipe.execute

        async def counted():
            self.round_trips += 1
            self.commands += len(pipe.command_stack)
            return await execute()

        pipe.execute = counted
        return pipe


@pytest.mark.integration
async def test_values_equal_feasts_own_online_read(redis_url: str) -> None:
    client = CountingRedis(redis_url)
    reader = FeastRedisReader(spec(), client, clock=lambda: FIXTURE["now"])
    lookups = await reader.fetch([*USERS, 9999])
    assert (client.round_trips, client.commands) == (1, 6)  # one pipelined round trip for the batch
    online = FIXTURE["online"]
    for i, user in enumerate(USERS[:3]):
        got = lookups[i]
        assert got.ok, (user, got)
        for value, feature in zip(got.values, FIXTURE["features"], strict=True):
            want = online[feature.split(":")[1]][i]
            assert value == pytest.approx(want, rel=1e-6), (user, feature)
        assert got.age_s == pytest.approx(3600.0)  # the oldest view served: the profile, 1 h old
    # 1004 has stats but no profile row; 1005's stats are two days old; 9999 was never materialised
    assert [lk.reason for lk in lookups[3:]] == ["missing", "stale", "missing"]
    assert reader.stats.fallbacks == {"missing": 2, "stale": 1}
    assert reader.stats.served == 3 and sum(reader.stats.age_seconds.counts) == 3
    await client.client.aclose()


@pytest.mark.integration
async def test_max_age_decides_staleness(redis_url: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    fresh = FeastRedisReader(spec(max_age_s=3 * 86_400.0), client, clock=lambda: FIXTURE["now"])
    strict = FeastRedisReader(spec(max_age_s=1800.0), client, clock=lambda: FIXTURE["now"])
    assert (await fresh.fetch([1005]))[0].ok
    # the profile view is 1 h old for everyone: all stale under a 30 min bound
    assert [lk.reason for lk in await strict.fetch(USERS[:3])] == ["stale"] * 3
    await client.aclose()


@pytest.mark.integration
async def test_a_slow_store_is_over_budget_not_a_wait(redis_url: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    admin = redis.Redis.from_url(redis_url)
    await client.ping()  # connected before the pause, so only the read itself waits
    reader = FeastRedisReader(spec(budget_ms=200.0), client, clock=lambda: FIXTURE["now"])
    await admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")  # the server answers nobody for 3 s
    lookups = await asyncio.wait_for(reader.fetch([1001, 1002]), timeout=2.5)  # returns inside the pause
    assert [lk.reason for lk in lookups] == ["over_budget", "over_budget"]
    assert reader.stats.fallbacks == {"over_budget": 2}
    await admin.execute_command("CLIENT", "UNPAUSE")
    await admin.aclose()
    await client.aclose()


async def test_an_unreachable_store_is_unavailable(unused_tcp_port: int) -> None:
    import redis.asyncio as redis

    client = redis.Redis(host="127.0.0.1", port=unused_tcp_port)
    reader = FeastRedisReader(spec(), client)
    assert [lk.reason for lk in await reader.fetch([1001])] == ["unavailable"]
    assert reader.stats.fallbacks == {"unavailable": 1}
    await client.aclose()


def test_spec_refuses_malformed_views() -> None:
    with pytest.raises(ValueError, match="view:feature"):
        spec(views=("clicks_7d",))
    with pytest.raises(ValueError, match="view:feature"):
        spec(views=())


@pytest.mark.integration
async def test_live_feast_materialize_reads_back(tmp_path: Path) -> None:
    """With a Python that has Feast (``COHORTGATE_FEAST_PYTHON``, e.g. /tmp/feastenv/bin/python; Feast
    stays out of cohortgate's environment), materialise afresh into a real redis-server and read it."""
    import os
    import subprocess

    import redis.asyncio as redis

    from tests.controller.conftest import RedisServer

    python = os.environ.get("COHORTGATE_FEAST_PYTHON")
    if not python:
        pytest.skip("COHORTGATE_FEAST_PYTHON is not set: the recorded fixture stands in for a live Feast")
    server = RedisServer(tmp_path / "redis").start()
    try:
        out = tmp_path / "fresh.json"
        script = Path(__file__).parent / "fixtures" / "make_feast_fixture.py"
        address = server.url.removeprefix("redis://").split("/")[0]
        done = subprocess.run(
            [python, str(script), "--redis", address, "--out", str(out)], capture_output=True, timeout=600
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        fresh = json.loads(out.read_text())
        client = redis.Redis.from_url(server.url)
        reader = FeastRedisReader(spec(), client, clock=lambda: fresh["now"])
        lookups = await reader.fetch(USERS)
        for i in range(3):
            for value, feature in zip(lookups[i].values, fresh["features"], strict=True):
                assert value == pytest.approx(fresh["online"][feature.split(":")[1]][i], rel=1e-6)
        assert [lk.reason for lk in lookups[3:]] == ["missing", "stale"]
        await client.aclose()
    finally:
        server.stop()
