"""Effective weights, rolled-back variants and experiment phases per route, shared by every gateway.

The controller writes a `RouteState` (defined, pure, in `cohortgate.core.rollout`) per route;
every gateway watches the store and swaps in ``effective_policy(policy, states)``. The stored state
overrides the policy file's weights until an operator resumes the route.

    StateStore
    ├── InProcessState   a dict, callbacks called on write; optional JSON file so a restart keeps it
    └── RedisState       hash ``{cohortgate}:state`` (route -> JSON), pub/sub ``{cohortgate}:state:changed``,
                         audit stream ``{cohortgate}:audit``, status snapshot ``{cohortgate}:status``

Guarantees of `RedisState`:

* **within 1 s**: a write publishes the route's name; each watcher re-reads that field at once (a
  few ms), and re-reads the whole hash every ``resync_s`` in case a message was lost.
* **Redis down**: readers keep their last states (never fall back to the file's weights), the
  watcher reconnects with backoff and resynchronises; writes raise `StoreUnavailable`.
* **restart**: with ``cache_path`` the last states are also kept in a local file, so a gateway that
  restarts while Redis is down still serves the controller's weights.
* **lost updates**: ``put(state, expected_version)`` is a compare-and-set in one Lua script, so an
  operator's rollback and the controller's promotion cannot overwrite each other.
* a route missing from the hash (a Redis restarted empty) changes nothing; the controller re-seeds.

The state file (`InProcessState`'s ``cache_path``, `RedisState`'s local cache) never silently
reverts (issue 17.3): each write carries a generation number and a SHA-256 of its states and goes
to two files in turn, ``PATH`` then ``PATH.prev``, so one of them always holds the newest complete
generation. A reader takes the newest generation whose checksum holds and logs which file it
recovered from. When a file exists but no generation is readable, the store starts **safe**:
``safe_mode`` holds the reason (for ``up``, ``status`` and the dashboard), an ERROR line says so,
gateways serve every challenger of a route without a state at 0 %, and the controller's seed of
such a route is stored rolled back (`safe_state`) until an operator resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from cohortgate.core.contract import AUDIT_KEY, STATE_CHANNEL, STATE_KEY, STATUS_KEY
from cohortgate.core.errors import CohortgateError
from cohortgate.core.policy import Policy, Route
from cohortgate.core.rollout import Phase, RouteState, VariantState
from cohortgate.store.redis import redis_client, redis_errors
from cohortgate.support.files import write_atomic
from cohortgate.support.logs import Throttle

log = logging.getLogger(__name__)
throttled = Throttle(log)  # warnings that repeat per write or per resync (issue 17.6)

STATE_FORMAT = 2  # {"format", "generation", "sha256", "states"}; format 1 was the bare states mapping
SAFE_ACTOR = "safe-mode"

AUDIT_MAXLEN = 10_000

Callback = Callable[[Mapping[str, RouteState]], None]


class StoreUnavailable(CohortgateError):
    """The state store cannot be reached; readers keep their last states."""


class VersionConflict(CohortgateError):
    """Someone else wrote the route since it was read; read again and re-apply."""


def effective_policy(policy: Policy, states: Mapping[str, RouteState], safe: bool = False) -> Policy:
    """The policy with the controller's weights and rolled-back variants applied.

    A state that does not fit the policy (unknown variants, weights not summing to 100) is skipped
    for that route, which then keeps its file weights, and logged. With ``safe`` (the state file
    was unreadable) a route without a state serves control only, never the file's challengers.
    """
    weights: dict[str, dict[str, int]] = {}
    disabled: dict[str, list[str]] = {}
    segments: dict[str, dict[str, dict[str, int]]] = {}
    if safe:
        for route in policy.routes:
            if route.name not in states:
                weights[route.name] = {v.name: 100 if i == 0 else 0 for i, v in enumerate(route.variants)}
                disabled[route.name] = [v.name for v in route.variants[1:]]
    for name, st in states.items():
        found = policy.by_name.get(name)
        if found is None:
            continue
        route = found
        names = {v.name for v in route.variants}
        w = {n: int(st.weights.get(n, 0)) for n in names}
        if sum(w.values()) != 100 or any(x < 0 for x in w.values()) or not set(st.weights) <= names:
            throttled.warning(
                "state for route %r does not fit the policy (%s); keeping the file's weights",
                name,
                dict(st.weights),
                key=f"misfit:{name}",
            )
            continue
        off = st.disabled & names
        if not off and not st.segment_weights and not route.segment_layouts and _as_compiled(route, w):
            continue  # the file's own weights: the route as it is (~35 us a route, 1 000 routes a reload)
        weights[name] = w
        disabled[name] = sorted(off)
        if st.segment_weights and route.allocation is not None and route.allocation.segment_defs:
            segments[name] = _segment_weights(route.allocation.segment_names(), names, st)
    return policy.with_weights(weights, disabled, segments) if weights else policy


def _as_compiled(route: Route, weights: Mapping[str, int]) -> bool:
    return all(v.enabled and v.weight == weights[v.name] for v in route.variants)


def _segment_weights(known: tuple[str, ...], names: set[str], st: RouteState) -> dict[str, dict[str, int]]:
    """A bandit route's per-segment weights that fit the policy (a misfit segment takes the route's)."""
    out = {}
    for segment, sw in st.segment_weights.items():
        w = {n: int(sw.get(n, 0)) for n in names}
        if segment in known and sum(w.values()) == 100 and min(w.values()) >= 0 and set(sw) <= names:
            out[segment] = w
    return out


def follow(holder: Any, store: StateStore, metrics: Any = None) -> Callable[[Mapping[str, RouteState]], None]:
    """Keep a gateway's policy holder on ``effective_policy(file policy, states)``.

    ``holder`` is `gateway.service.PolicyHolder` (``.policy``, ``.swap(p)``, ``.subscribe(cb)``).
    A file reload swaps in a new base policy; the states are re-applied on top of it at once.
    ``metrics`` (a `GatewayMetrics`) gets the weights and the applied/refused count.
    """
    base = holder.policy
    produced: list[Policy] = []

    def apply(states: Mapping[str, RouteState]) -> None:
        effective = effective_policy(base, states, getattr(store, "safe_mode", None) is not None)
        produced[:] = [effective]
        if effective is not holder.policy:
            holder.swap(effective)
        if metrics is not None:
            metrics.state_update(True)
            metrics.show_weights(effective.routes)

    def on_swap(old: Policy, new: Policy) -> None:
        nonlocal base
        if produced and new is produced[0]:
            return
        base = new  # the file was reloaded: put the controller's weights back on top
        apply(store.snapshot())

    holder.subscribe(on_swap)
    store.watch(apply)
    apply(store.snapshot())
    return apply


class StateStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def snapshot(self) -> Mapping[str, RouteState]:
        """The last states known, without I/O."""
        ...

    async def load(self) -> Mapping[str, RouteState]:
        """What the store holds now (raises `StoreUnavailable`); newer versions join the snapshot."""
        ...

    async def put(self, state: RouteState, expected_version: int | None = None) -> None:
        """Write one route's state (raises `VersionConflict`, `StoreUnavailable`)."""
        ...

    def watch(self, callback: Callback) -> None:
        """Call ``callback(states)`` after every change, from the event loop."""
        ...

    async def append_audit(self, record: Mapping[str, Any]) -> None: ...

    async def audit(self, route: str | None = None, limit: int = 100) -> list[dict[str, Any]]: ...

    async def publish_status(self, status: Mapping[str, Any], ttl_s: float = 10.0) -> None: ...

    async def read_status(self) -> dict[str, Any] | None: ...


def safe_state(state: RouteState, reason: str) -> RouteState:
    """``state`` with every challenger rolled back (0 %, control 100 %): what a route starts as
    when the state file was unreadable, until an operator resumes it."""
    challengers = set(state.variants)
    weights = {n: 0 if n in challengers else 100 for n in state.weights}  # control: the one non-challenger
    variants = {
        n: VariantState(Phase.ROLLED_BACK, v.step, state.updated_at, f"safe mode: {reason}")
        for n, v in state.variants.items()
    }
    return RouteState(state.route, weights, variants, state.version + 1, state.updated_at, SAFE_ACTOR)


def read_states(path: str | Path) -> tuple[dict[str, RouteState], str | None]:
    """(states, safe-mode reason) a store would start with from the state file ``path`` (for `up`'s notes)."""
    states, _generation, safe_mode = _read_cache(Path(path))
    return states, safe_mode


def _prev(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _dump(states: Mapping[str, RouteState], generation: int) -> bytes:
    body = {k: v.to_json() for k, v in states.items()}
    doc = {
        "format": STATE_FORMAT,
        "generation": generation,
        "sha256": hashlib.sha256(_canonical(body)).hexdigest(),
        "states": body,
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def _parse_file(path: Path) -> tuple[int, dict[str, RouteState]]:
    """(generation, states) of one state file; raises OSError or ValueError saying what is wrong."""
    try:
        data = json.loads(path.read_bytes())
        if isinstance(data, dict) and data.get("format") == STATE_FORMAT:
            body = data["states"]
            if hashlib.sha256(_canonical(body)).hexdigest() != data["sha256"]:
                raise ValueError("checksum mismatch")
            generation = int(data["generation"])
        elif isinstance(data, dict) and "format" not in data:
            body, generation = data, 0  # format 1: no checksum, the states alone
        else:
            raise ValueError(f"unknown format {data.get('format') if isinstance(data, dict) else type(data).__name__}")
        return generation, {k: RouteState.from_json(v) for k, v in body.items()}
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def _read_cache(path: Path | None) -> tuple[dict[str, RouteState], int, str | None]:
    """(states, generation, safe-mode reason) from ``path`` and ``path.prev``: the newest readable
    generation. No ``path`` is a fresh start even if a ``.prev`` is left (writes never remove
    ``path``, so it was deleted on purpose, as ``up --demo`` does); a ``path`` but no readable
    generation is safe mode."""
    if path is None or not path.exists():
        return {}, 0, None
    found: list[tuple[int, dict[str, RouteState], Path]] = []
    problems: list[str] = []
    for candidate in (path, _prev(path)):
        if not candidate.exists():
            continue
        try:
            generation, states = _parse_file(candidate)
        except (OSError, ValueError) as exc:
            problems.append(f"{candidate}: {exc}")
            continue
        found.append((generation, states, candidate))
    if found:
        generation, states, source = max(found, key=lambda f: f[0])
        if problems:
            log.warning(
                "state file unreadable (%s); recovered generation %d from %s", "; ".join(problems), generation, source
            )
        return states, generation, None
    if not problems:
        return {}, 0, None
    reason = f"no readable state file ({'; '.join(problems)})"
    log.error(
        "%s: starting SAFE -- every challenger at 0 %% until an operator resumes it (cohortgate resume ROUTE VARIANT)",
        reason,
    )
    return {}, 0, reason


class _Base:
    def __init__(self, cache_path: str | Path | None) -> None:
        self.cache_path = Path(cache_path) if cache_path else None
        states, self._generation, self.safe_mode = _read_cache(self.cache_path)
        self._states: dict[str, RouteState] = states
        self._callbacks: list[Callback] = []
        # safe_mode: None, or why the store started with every challenger at 0 % (shown by up,
        # status and the dashboard); it stays set for the life of the process.

    def _write_cache(self) -> None:
        """Write the states as the next generation: ``PATH`` first, then ``PATH.prev`` (raises OSError)."""
        assert self.cache_path is not None
        self._generation += 1
        data = _dump(self._states, self._generation)
        write_atomic(self.cache_path, data)
        write_atomic(_prev(self.cache_path), data)

    def snapshot(self) -> Mapping[str, RouteState]:
        return dict(self._states)

    def watch(self, callback: Callback) -> None:
        self._callbacks.append(callback)

    def _notify(self) -> None:
        snap = self.snapshot()
        for cb in list(self._callbacks):
            try:
                cb(snap)
            except Exception:
                log.exception("state watcher callback failed")

    def _remember(self, states: Mapping[str, RouteState]) -> bool:
        """Keep newer versions; True when anything changed (then the cache file is rewritten)."""
        changed = False
        for name, st in states.items():
            known = self._states.get(name)
            if known is None or st.version > known.version:
                self._states[name] = st
                changed = True
        if changed and self.cache_path is not None:
            try:
                self._write_cache()
            except OSError as exc:
                throttled.warning("cannot write state cache %s: %s", self.cache_path, exc, key="cache-write")
        return changed


class InProcessState(_Base):
    """States in this process (the embedded default); ``cache_path`` makes them survive a restart.

    With ``poll_s`` a reader in another process on the same host (a gateway next to an embedded
    controller) follows the file: it is re-read when its mtime changes, every ``poll_s`` seconds.
    """

    def __init__(
        self, cache_path: str | Path | None = None, audit_capacity: int = AUDIT_MAXLEN, poll_s: float | None = None
    ) -> None:
        super().__init__(cache_path)
        self.poll_s = poll_s
        self._audit: deque[dict[str, Any]] = deque(maxlen=audit_capacity)
        self._status: dict[str, Any] | None = None
        self._status_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._mtime = self._stat()

    def _stat(self) -> float | None:
        try:
            return self.cache_path.stat().st_mtime_ns if self.cache_path is not None else None
        except OSError:
            return None

    async def start(self) -> None:
        if self.poll_s and self.cache_path is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="state-file-poll")

    async def _poll(self) -> None:
        assert self.poll_s is not None
        while True:
            await asyncio.sleep(self.poll_s)
            mtime = self._stat()
            if mtime is not None and mtime != self._mtime:
                self._mtime = mtime
                if self._remember(_read_cache(self.cache_path)[0]):
                    self._notify()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def load(self) -> Mapping[str, RouteState]:
        return self.snapshot()

    async def put(self, state: RouteState, expected_version: int | None = None) -> None:
        known = self._states.get(state.route)
        if expected_version is not None and known is not None and known.version != expected_version:
            raise VersionConflict(f"route {state.route!r} is at version {known.version}, not {expected_version}")
        seed = known is None and expected_version is None and state.updated_by == "policy"
        if self.safe_mode is not None and seed:
            # the file's weights could undo a rollback the unreadable file held: store it safe
            # instead, and make the writer (the controller) adopt that through its conflict path
            safe = safe_state(state, self.safe_mode)
            self._states[state.route] = safe
            if self.cache_path is not None:
                self._write_cache()
            self._notify()
            raise VersionConflict(f"route {state.route!r} starts safe at version {safe.version}: {self.safe_mode}")
        self._states[state.route] = state
        if self.cache_path is not None:
            self._write_cache()
        self._notify()

    async def append_audit(self, record: Mapping[str, Any]) -> None:
        self._audit.append(dict(record))

    async def audit(self, route: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        out = [r for r in reversed(self._audit) if route is None or r.get("route") == route]
        return out[:limit]

    async def publish_status(self, status: Mapping[str, Any], ttl_s: float = 10.0) -> None:
        self._status = dict(status)
        self._status_until = time.time() + ttl_s

    async def read_status(self) -> dict[str, Any] | None:
        return self._status if time.time() < self._status_until else None


# Compare-and-set of one route's JSON, then publish its name: one round trip, atomic.
_PUT_SCRIPT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and ARGV[3] ~= '' then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and tonumber(doc['version']) ~= tonumber(ARGV[3]) then
    return tonumber(doc['version'])
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return -1
"""


class RedisState(_Base):
    """States in a Redis hash, changes announced on pub/sub; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        cache_path: str | Path | None = None,
        timeout_s: float = 0.5,
        resync_s: float = 5.0,
        key: str = STATE_KEY,
        channel: str = STATE_CHANNEL,
    ) -> None:
        super().__init__(cache_path)
        self.url = url
        self.timeout_s = timeout_s
        self.resync_s = resync_s
        self.key = key
        self.channel = channel
        self.connected = False
        self.client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._script: Any = None
        self._closing = False

    def connect(self) -> None:
        """Create the client (no I/O): enough for one-shot reads and writes, without a watcher."""
        if self.client is None:
            self.client = redis_client(self.url, self.timeout_s)
            self._script = self.client.register_script(_PUT_SCRIPT)

    async def start(self) -> None:
        """Connect, read the states (if Redis answers) and start the watcher (it reconnects on its own)."""
        self.connect()
        with contextlib.suppress(StoreUnavailable):
            await self.load()
        self._task = asyncio.get_running_loop().create_task(self._watch_loop(), name="redis-state-watch")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()

    async def _call(self, coro: Any) -> Any:
        try:
            result = await asyncio.wait_for(coro, self.timeout_s)
        except redis_errors() as exc:
            self.connected = False
            raise StoreUnavailable(f"state store unreachable: {exc or type(exc).__name__}") from None
        self.connected = True
        return result

    @staticmethod
    def _parse(raw: Mapping[str, str]) -> dict[str, RouteState]:
        out = {}
        for name, doc in raw.items():
            try:
                out[name] = RouteState.from_json(json.loads(doc))
            except (ValueError, KeyError, TypeError) as exc:
                throttled.warning("ignoring malformed state for route %r: %s", name, exc, key=f"malformed:{name}")
        return out

    async def load(self) -> Mapping[str, RouteState]:
        stored = self._parse(await self._call(self.client.hgetall(self.key)))
        if self._remember(stored):
            self._notify()
        return stored

    async def refresh(self, route: str) -> None:
        doc = await self._call(self.client.hget(self.key, route))
        if doc is not None and self._remember(self._parse({route: doc})):
            self._notify()

    async def put(self, state: RouteState, expected_version: int | None = None) -> None:
        doc = json.dumps(state.to_json(), sort_keys=True)
        expected = "" if expected_version is None else str(expected_version)
        result = await self._call(self._script(keys=[self.key], args=[state.route, doc, expected, self.channel]))
        if int(result) != -1:
            raise VersionConflict(f"route {state.route!r} is at version {result}, not {expected_version}")
        if self._remember({state.route: state}):
            self._notify()

    async def _watch_loop(self) -> None:
        backoff = 0.1
        while not self._closing:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await asyncio.wait_for(pubsub.subscribe(self.channel), self.timeout_s)
                await self.load()  # whatever changed while we were not subscribed
                if backoff > 0.1:
                    log.info("state store watcher reconnected to Redis")
                backoff = 0.1
                last_sync = time.monotonic()
                while not self._closing:
                    msg = await pubsub.get_message(timeout=min(1.0, self.resync_s))
                    if msg is not None and msg.get("type") == "message":
                        await self.refresh(str(msg["data"]))
                    if time.monotonic() - last_sync >= self.resync_s:
                        await self.load()
                        last_sync = time.monotonic()
            except asyncio.CancelledError:
                raise
            except (StoreUnavailable, *redis_errors()) as exc:  # type: ignore[misc]  # a tuple built at run time
                if backoff == 0.1:
                    log.warning("state store watcher lost Redis (%s); keeping the last weights", exc)
                self.connected = False
                await asyncio.sleep(backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, 1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def append_audit(self, record: Mapping[str, Any]) -> None:
        await self._call(
            self.client.xadd(
                AUDIT_KEY,
                {"record": json.dumps(record, sort_keys=True, default=str)},
                maxlen=AUDIT_MAXLEN,
                approximate=True,
            )
        )

    async def audit(self, route: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        entries = await self._call(self.client.xrevrange(AUDIT_KEY, count=limit if route is None else limit * 20))
        out = []
        for _id, fields in entries:
            with contextlib.suppress(ValueError, KeyError):
                rec = json.loads(fields["record"])
                if route is None or rec.get("route") == route:
                    out.append(rec)
        return out[:limit]

    async def publish_status(self, status: Mapping[str, Any], ttl_s: float = 10.0) -> None:
        doc = json.dumps(status, default=str)  # key order kept: control first
        await self._call(self.client.set(STATUS_KEY, doc, px=int(ttl_s * 1000)))

    async def read_status(self) -> dict[str, Any] | None:
        doc = await self._call(self.client.get(STATUS_KEY))
        return json.loads(doc) if doc else None
