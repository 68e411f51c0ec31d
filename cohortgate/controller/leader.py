"""One acting controller at a time: a Redis lock with expiry (``SET NX PX``), renewed by its holder.

The holder renews every interval (well inside the TTL); if it dies, the lock expires and another
controller takes over after at most one TTL. Renewal and release check the owner token in a Lua
script, so a controller that paused past its TTL cannot extend or delete its successor's lock.
A controller that cannot reach Redis steps down at once (it could not write weights anyway).
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

from cohortgate.core.contract import LEADER_KEY
from cohortgate.store.redis import redis_errors

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Leadership(Protocol):
    held: bool

    async def acquire_or_renew(self) -> bool: ...

    async def release(self) -> None: ...


class SoloLeader:
    """The embedded default: a single controller always leads."""

    held = True

    async def acquire_or_renew(self) -> bool:
        return True

    async def release(self) -> None:
        pass


class RedisLeader:
    def __init__(self, client: Any, ttl_ms: int = 5000, key: str = LEADER_KEY, owner: str | None = None) -> None:
        self.client = client
        self.ttl_ms = ttl_ms
        self.key = key
        self.owner = owner or uuid.uuid4().hex
        self.held = False
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    async def acquire_or_renew(self) -> bool:
        try:
            if self.held:
                self.held = bool(await self._renew(keys=[self.key], args=[self.owner, self.ttl_ms]))
            if not self.held:
                self.held = bool(await self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms))
        except redis_errors():
            self.held = False
        return self.held

    async def release(self) -> None:
        if self.held:
            try:
                await self._release(keys=[self.key], args=[self.owner])
            except redis_errors():
                pass
            self.held = False

    async def holder(self) -> str | None:
        try:
            return await self.client.get(self.key)
        except redis_errors():
            return None
