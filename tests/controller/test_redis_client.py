"""The one Redis client factory against a real redis-server: a restart is invisible, an outage is not."""

from __future__ import annotations

import pytest

from cohortgate.core import rollout
from cohortgate.store.redis import redact_url, redis_client
from cohortgate.store.state import RedisState, StoreUnavailable
from tests.controller.policies import make_policy

pytestmark = pytest.mark.integration

ROUTE = make_policy().by_name["tabular"]


def test_redact_url_hides_only_the_password():
    assert redact_url("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


async def test_the_first_write_after_a_redis_restart_succeeds(redis_server):
    """Issue 17.7: the pooled connection is stale after a restart; the operator must not see it."""
    store = RedisState(redis_server.url, timeout_s=2.0)  # generous: a busy 2-core CI host
    store.connect()
    try:
        first = rollout.initial_state(ROUTE)
        await store.put(first)
        redis_server.restart()  # SIGKILL + a fresh, empty server on the same port
        rolled = rollout.apply(ROUTE, first, "canary", rollout.Signal.ROLLBACK, 2.0)[0]
        await store.put(rolled)  # was: StoreUnavailable("state store unreachable: Connection closed by server.")
        assert (await store.load())["tabular"].disabled == {"canary"}
    finally:
        await store.close()


async def test_every_client_reconnects_after_a_restart_and_still_fails_while_redis_is_down(redis_server):
    client = redis_client(redis_server.url, timeout_s=2.0)
    try:
        assert await client.set("k", "v")
        redis_server.restart()
        assert await client.get("k") is None  # answered by the new (empty) server, no error
        redis_server.kill()
        store = RedisState(redis_server.url, timeout_s=2.0)
        store.connect()
        with pytest.raises(StoreUnavailable):  # a Redis that is really down is still reported
            await store.put(rollout.initial_state(ROUTE))
        await store.close()
    finally:
        await client.aclose()
