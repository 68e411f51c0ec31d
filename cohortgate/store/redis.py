"""The one Redis client factory, and the one place Redis errors and URLs are named.

Every Redis user (state store, event sink and source, leader lock, CLI) gets its client from
`redis_client`, so they share one policy:

* **fail fast**: short socket timeouts; a timeout is never retried (a slow Redis must not double
  the caller's wait; callers decide what to do);
* **survive a restart**: a pooled connection that a restarted Redis no longer knows fails with a
  ``ConnectionError`` on its next use. That one error is retried once, at once, on a fresh
  connection (redis-py's ``retry``/``retry_on_error``), and connections idle longer than
  ``health_check_interval`` are PINGed first, so the first command after a restart succeeds
  instead of surfacing "state store unreachable" to an operator. A Redis that is really down
  fails the retry too and the caller sees the error, as before.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: seconds a pooled connection may sit idle before it is PINGed before use
HEALTH_CHECK_INTERVAL_S = 5
#: immediate retries of a command whose connection was found dead (the stale-after-restart case)
STALE_RETRIES = 1


def redact_url(url: str) -> str:
    """``url`` without its password, for logs (``redis://user:secret@host`` → ``redis://user:***@host``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def redis_client(url: str, timeout_s: float = 0.5) -> Any:
    """A redis.asyncio client: short timeouts, one immediate retry on a dead connection only."""
    import redis.asyncio as aioredis
    import redis.exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    stale = (redis.exceptions.ConnectionError,)  # not TimeoutError: a slow server is not retried
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), STALE_RETRIES, supported_errors=stale),
        retry_on_error=list(stale),
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
    )


def redis_errors() -> tuple[type[BaseException], ...]:
    """Everything a Redis call may raise when the server is slow, gone or restarted."""
    import redis.exceptions

    return (redis.exceptions.RedisError, OSError, TimeoutError, ConnectionError)
