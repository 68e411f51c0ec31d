"""Request-outcome events and the sinks that carry them to the controller, off the request path.

An `Event` is one of two kinds:

* ``request`` -- one primary request's outcome (route, variant, region, status, upstream latency,
  request id, HMAC-hashed cohort unit), built by `cohortgate.controller.als` from Envoy's asynchronous
  gRPC access log, so no request waits for it;
* ``report``  -- a model sidecar's own report on a response it produced (request id, variant,
  model, status, latency, output digest), used to compare shadows with their primary.

Never payloads, credentials or raw user ids: the unit arrives already hashed by the processor
(`gateway.extproc.hash_unit`, HMAC under a secret salt). A request on a route with outcome metrics
carries its exposure token (route, variant, hashed unit, time, MAC: no secret in it), which the
controller verifies before it counts the unit as exposed.

Sinks (``emit`` never blocks and never raises; what cannot be carried is dropped and counted)::

    EventSink
    ├── InProcessSink     bounded deque; also the controller's source (embedded default)
    └── RedisStreamSink   batched XADD through a pipeline, MAXLEN ~ N, key with a hash tag

`RedisStreamSource` is the controller's side of the stream: a consumer group (XREADGROUP/XACK),
so two controllers never process one event twice. It also reads the sidecars' report stream,
whose entries (`sidecar.report.ShadowReport.to_fields`) it understands as ``report`` events, and
their quality stream (``QUALITY_STREAM``, field ``report``: a `QualityReport`'s JSON), whose entries
become ``quality`` events carrying that JSON for the controller's `QualityMonitor` to parse.
Redis exceptions are translated here and in `cohortgate.store.state`; the client itself comes from
`cohortgate.store.redis`, the one factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cohortgate.core.contract import CONSUMER_GROUP, EVENTS_STREAM, QUALITY_STREAM, REPORTS_STREAM
from cohortgate.store.redis import redis_client, redis_errors
from cohortgate.support.logs import Throttle

log = logging.getLogger(__name__)
throttled = Throttle(log)  # failures that repeat per batch or per entry: one line per 30 s (issue 17.6)
XADD_FAILED = "event-stream-xadd-failed"

REQUEST = "request"
REPORT = "report"
QUALITY = "quality"  # a sidecar's quality window (drift sketches), read from QUALITY_STREAM
STREAM_MAXLEN = 100_000


# Two models "agree" on a request when they give the same label: a classifier's ``label`` output
# (skl2onnx's name for the top class). A model without one agrees only on bit-identical outputs,
# since probabilities of two different models never match to the bit.
AGREEMENT_OUTPUT = "label"


class DropCounter(Protocol):
    """What a sink reports to (`cohortgate.controller.metrics.TrafficMetrics` in the controller)."""

    def event_dropped(self, sink: str, reason: str, n: int = 1) -> None: ...


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # REQUEST | REPORT | QUALITY
    route: str  # empty in a sidecar report (it knows its model, not the route)
    variant: str  # the variant (or, in a report, the shadow) that produced the response
    status: int  # HTTP status; 0 when there was no response
    latency_ms: float
    request_id: str = ""
    region: str = ""
    unit: str = ""  # HMAC-hashed by the processor; never the raw id
    ts: float = 0.0  # epoch seconds at the source
    model: str = ""  # report: the model name the sidecar serves
    digest: str = ""  # report: what agreement compares (`AGREEMENT_OUTPUT`'s digest, else every output's)
    shadow_of: str = ""  # request: set when Envoy logged a mirrored copy (not a primary outcome)
    backend: int = -1  # request: the index N of the backend that answered (``cg.ROUTE.VARIANT.N``); -1 unknown
    segment: str = ""  # request: the processor's segment label (``name=value;...``, declared values only)
    fallback: str = ""  # report: why the features' fallback served the request (sidecar/join.py); empty: joined
    model_digest: str = ""  # request: the sidecar's x-cohortgate-model-digest (the artifact that answered)
    exposure: str = ""  # request on a route with metrics: the processor's exposure token (outcome denominators)
    quality: str = ""  # quality: the sidecar's `QualityReport` JSON, parsed by the controller

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for a Redis stream entry (empty ones left out)."""
        fields = {
            "kind": self.kind,
            "variant": self.variant,
            "status": str(self.status),
            "latency_ms": f"{self.latency_ms:.3f}",
            "ts": f"{self.ts:.6f}",
        }
        for name in (
            "route",
            "request_id",
            "region",
            "unit",
            "model",
            "digest",
            "shadow_of",
            "segment",
            "fallback",
            "model_digest",
            "exposure",
        ):
            value = getattr(self, name)
            if value:
                fields[name] = value
        if self.backend >= 0:
            fields["backend"] = str(self.backend)
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Event:
        """Inverse of `to_fields`; a sidecar report entry (no ``kind``) becomes a REPORT event."""
        kind = fields.get("kind") or REPORT
        return cls(
            kind=kind,
            route=fields.get("route", ""),
            variant=fields["variant"],
            status=int(fields.get("status", 0)),
            latency_ms=float(fields.get("latency_ms", 0.0)),
            request_id=fields.get("request_id", ""),
            region=fields.get("region", ""),
            unit=fields.get("unit", ""),
            ts=float(fields.get("ts", 0.0)),
            model=fields.get("model", ""),
            digest=fields.get(f"digest.{AGREEMENT_OUTPUT}") or fields.get("digest", ""),
            shadow_of=fields.get("shadow_of", ""),
            segment=fields.get("segment", ""),
            fallback=fields.get("fallback", ""),
            model_digest=fields.get("model_digest", ""),
            exposure=fields.get("exposure", ""),
            backend=int(b) if (b := fields.get("backend", "")).isascii() and b.isdigit() else -1,
        )

    @classmethod
    def from_report(cls, data: Mapping[str, Any]) -> Event:
        """A sidecar report as JSON (`sidecar.report.ShadowReport.to_json`, what its HttpSink POSTs)."""
        return cls(
            kind=REPORT,
            route=str(data.get("route", "")),
            variant=str(data["variant"]),
            status=int(data.get("status", 0)),
            latency_ms=float(data.get("latency_ms", 0.0)),
            request_id=str(data.get("request_id", "")),
            ts=float(data.get("ts", 0.0)),
            model=str(data.get("model", "")),
            digest=str((data.get("output_digests") or {}).get(AGREEMENT_OUTPUT) or data.get("digest", "")),
            fallback=str(data.get("fallback", "")),
        )


# --------------------------------------------------------------------------- interfaces


class EventSink(Protocol):
    """Where events go. ``emit`` is synchronous, O(1), never blocks and never raises."""

    def emit(self, event: Event) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class EventSource(Protocol):
    """What the controller reads. ``ack`` confirms the last batch ``read`` returned."""

    async def read(self, max_events: int, timeout_s: float) -> list[Event]: ...

    async def ack(self) -> None: ...


# --------------------------------------------------------------------------- in-process


class InProcessSink:
    """A bounded queue in this process: the embedded default sink and the controller's source.

    Single event loop: ``emit`` and ``read`` must run on the loop that called ``start``.
    """

    def __init__(self, capacity: int = 100_000, metrics: DropCounter | None = None) -> None:
        self.capacity = capacity
        self.dropped = 0
        self.emitted = 0
        self._queue: deque[Event] = deque()
        self._ready: asyncio.Event | None = None
        self._metrics = metrics

    async def start(self) -> None:
        self._ready = asyncio.Event()
        if self._queue:
            self._ready.set()

    async def close(self) -> None:
        self._queue.clear()

    def emit(self, event: Event) -> None:
        if len(self._queue) >= self.capacity:
            self.dropped += 1
            if self._metrics is not None:
                self._metrics.event_dropped("memory", "overflow")
            return
        self._queue.append(event)
        self.emitted += 1
        if self._ready is not None:
            self._ready.set()

    async def read(self, max_events: int, timeout_s: float) -> list[Event]:
        if not self._queue:
            if self._ready is None:
                await self.start()
            assert self._ready is not None
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout_s)
        n = min(max_events, len(self._queue))
        return [self._queue.popleft() for _ in range(n)]

    async def ack(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self._queue)


# --------------------------------------------------------------------------- Redis


class RedisStreamSink:
    """Batched XADD to a Redis stream; if Redis is slow or down, events are dropped and counted.

    ``emit`` appends to a bounded buffer; one background task sends up to ``batch`` entries per
    pipeline round trip, each trimmed with ``MAXLEN ~ maxlen``. A failed or slow round trip drops
    its batch (never retried: stale outcomes are worth less than a bounded memory) and the task
    backs off before the next try, so a dead Redis costs one timeout per ``backoff_s``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        stream: str = EVENTS_STREAM,
        maxlen: int = STREAM_MAXLEN,
        capacity: int = 20_000,
        batch: int = 500,
        timeout_s: float = 0.5,
        backoff_s: float = 0.5,
        metrics: DropCounter | None = None,
    ) -> None:
        if client is None and url is None:
            raise ValueError("RedisStreamSink needs a url or a client")
        self.stream = stream
        self.maxlen = maxlen
        self.capacity = capacity
        self.batch = batch
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.dropped = 0
        self.sent = 0
        self._url = url
        self._client = client
        self._own_client = client is None
        self._buffer: deque[Event] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._metrics = metrics

    async def start(self) -> None:
        if self._client is None:
            self._client = redis_client(self._url or "", self.timeout_s)
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-event-sink")

    def emit(self, event: Event) -> None:
        if self._closing or len(self._buffer) >= self.capacity:
            self._drop(1, "overflow")
            return
        self._buffer.append(event)
        if self._wakeup is not None and not self._wakeup.is_set() and len(self._buffer) >= 1:
            self._wakeup.set()

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        if self._metrics is not None:
            self._metrics.event_dropped("redis", reason, n)

    async def flush(self) -> None:
        """Send what is buffered now (tests and shutdown); failures drop, as always."""
        while self._buffer:
            await self._send_one_batch()

    async def _send_one_batch(self) -> bool:
        items = [self._buffer.popleft() for _ in range(min(self.batch, len(self._buffer)))]
        if not items:
            return True
        pipe = self._client.pipeline(transaction=False)
        for e in items:
            pipe.xadd(self.stream, e.to_fields(), maxlen=self.maxlen, approximate=True)
        try:
            await asyncio.wait_for(pipe.execute(), self.timeout_s)
        except TimeoutError:
            self._drop(len(items), "timeout")
            return False
        except redis_errors() as exc:
            throttled.warning("event stream XADD failed, %d events dropped: %s", len(items), exc, key=XADD_FAILED)
            self._drop(len(items), "redis_error")
            return False
        self.sent += len(items)
        throttled.resolved(XADD_FAILED, "event stream XADD works again")
        return True

    async def _run(self) -> None:
        assert self._wakeup is not None
        while not self._closing:
            if not self._buffer:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not await self._send_one_batch():
                await asyncio.sleep(self.backoff_s)

    async def close(self) -> None:
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._buffer and self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(), self.timeout_s * 2)
        if self._own_client and self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()


class RedisStreamSource:
    """The controller's consumer-group reader over the event stream and the sidecars' report stream.

    Raises the Redis errors of `redis_errors()`; the controller loop handles them (it backs off and
    resumes). A restarted Redis loses the group: the reader recreates it (``NOGROUP``).
    """

    def __init__(
        self,
        client: Any,
        consumer: str,
        streams: Sequence[str] = (EVENTS_STREAM, REPORTS_STREAM, QUALITY_STREAM),
        group: str = CONSUMER_GROUP,
        claim_idle_ms: int = 10_000,
    ) -> None:
        self.client = client
        self.consumer = consumer
        self.streams = tuple(streams)
        self.group = group
        self.claim_idle_ms = claim_idle_ms
        self._pending: dict[str, list[str]] = {}
        self._ready = False

    async def ensure_group(self) -> None:
        import redis.exceptions

        for stream in self.streams:
            try:
                await self.client.xgroup_create(stream, self.group, id="$", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._ready = True

    async def claim_stale(self, max_events: int = 10_000) -> list[Event]:
        """Take over entries a dead consumer read but never acknowledged (a new leader calls this)."""
        import redis.exceptions

        await self.ensure_group()  # also recreates a group a restarted Redis lost
        out: list[Event] = []
        for stream in self.streams:
            try:
                reply = await self.client.xautoclaim(
                    stream, self.group, self.consumer, self.claim_idle_ms, start_id="0-0", count=max_events
                )
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    self._ready = False
                    continue
                raise
            entries = reply[1] if len(reply) > 1 else []
            out.extend(self._take(stream, entries))
        return out

    def _take(self, stream: str, entries: Iterable[Any]) -> list[Event]:
        out = []
        ids = self._pending.setdefault(stream, [])
        for entry_id, fields in entries:
            ids.append(entry_id)
            if not fields:
                continue  # deleted by MAXLEN trimming before we read it
            if stream == QUALITY_STREAM:
                report = fields.get("report")
                out.append(Event(QUALITY, "", "", 0, 0.0, quality=report if isinstance(report, str) else ""))
                continue
            try:
                out.append(Event.from_fields(fields))
            except (KeyError, ValueError) as exc:
                throttled.warning("skipping malformed stream entry %s in %s: %s", entry_id, stream, exc)
        return out

    async def read(self, max_events: int, timeout_s: float) -> list[Event]:
        import redis.exceptions

        if not self._ready:
            await self.ensure_group()
        out: list[Event] = []
        for i, stream in enumerate(self.streams):
            block = max(1, int(timeout_s * 1000)) if i == 0 else None  # only the first stream blocks
            try:
                reply = await self.client.xreadgroup(
                    self.group, self.consumer, {stream: ">"}, count=max_events, block=block
                )
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    self._ready = False  # Redis restarted without our group: recreate next time
                    continue
                raise
            for _name, entries in _stream_entries(reply):
                out.extend(self._take(stream, entries))
        return out

    async def ack(self) -> None:
        if not any(self._pending.values()):
            return
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in self._pending.items():
            if ids:
                pipe.xack(stream, self.group, *ids)
        self._pending = {}
        await pipe.execute()


def _stream_entries(reply: Any) -> list[tuple[str, list[Any]]]:
    """XREAD(GROUP) replies come as a list of [name, entries] (RESP2) or a dict (RESP3)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(name, entries) for name, entries in reply]
