"""Shadow-comparison reports: per request ``(request id, variant, output digest, latency)``.

A primary and its shadow answer the same mirrored request (Envoy keeps ``x-request-id`` on the
mirror), so the controller can pair their reports by id and compare digests (per output too: equal
``label`` digests mean the two models agree on the label).

``Reporter.report`` never awaits and never raises: it appends to a bounded queue and returns; when
the queue is full the report is dropped and counted. A background task hashes the outputs and hands
batches to a ``ReportSink``, the small interface the controller plugs into:

    MemorySink          in-process (tests, an embedded controller)
    HttpSink            POST a JSON list to an http(s):// URL, with the controller's admin token
    RedisStreamSink     XADD to a Redis stream, from a redis://host:port/db?stream=NAME URL

A sidecar with a data contract also sends a ``QualityReport`` (cohortgate.core.sketch: drift sketches
and violation counts, never a raw value) per window: ``QualityReporter`` closes the window of its
``QualityGate`` every ``interval_s`` and hands the report to the same sink's ``send_quality``
(HTTP: POST to ``QUALITY_REPORTS_PATH`` beside the shadow reports' ``/reports``; Redis: XADD to
``QUALITY_STREAM``). A failed send is counted and dropped: the next window is complete on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit, urlunsplit

import numpy as np
import orjson

from cohortgate.core.contract import QUALITY_REPORTS_PATH, QUALITY_STREAM, REPORTS_STREAM, TOKEN_FILE_ENV
from cohortgate.core.sketch import QualityReport
from cohortgate.support.logs import Throttle
from sidecar.metrics import SidecarMetrics
from sidecar.prediction import served_prediction
from sidecar.quality import QualityGate

log = logging.getLogger(__name__)
throttled = Throttle(log)  # a dead sink fails every batch: one line per 30 s, with counts (issue 17.6)
SINK_FAILED = "shadow-report-sink-failed"
QUALITY_FAILED = "quality-report-sink-failed"

STREAM_MAXLEN = 100_000


@dataclass(frozen=True, slots=True)
class ShadowReport:
    """What one sidecar saw of one request. ``digest`` is empty when it answered with an error."""

    request_id: str
    variant: str
    model: str
    status: int
    latency_ms: float
    digest: str
    output_digests: tuple[tuple[str, str], ...]
    ts: float
    fallback: str = ""  # features: why the fallback served this request (sidecar/join.py), else empty
    prediction: dict[str, Any] | None = None  # --report-predictions: what was served (sidecar/prediction.py)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "request_id": self.request_id,
            "variant": self.variant,
            "model": self.model,
            "status": self.status,
            "latency_ms": self.latency_ms,
            "digest": self.digest,
            "output_digests": dict(self.output_digests),
            "ts": self.ts,
        }
        if self.fallback:
            doc["fallback"] = self.fallback
        if self.prediction is not None:
            doc["prediction"] = self.prediction
        return doc

    def to_fields(self) -> dict[str, str]:
        """Flat string fields, as a Redis stream entry holds them (``digest.<output>`` per output)."""
        fields = {
            "request_id": self.request_id,
            "variant": self.variant,
            "model": self.model,
            "status": str(self.status),
            "latency_ms": f"{self.latency_ms:.3f}",
            "digest": self.digest,
            "ts": f"{self.ts:.6f}",
        }
        for name, digest in self.output_digests:
            fields[f"digest.{name}"] = digest
        if self.fallback:
            fields["fallback"] = self.fallback
        if self.prediction is not None:
            fields["prediction"] = orjson.dumps(self.prediction).decode()
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> ShadowReport:
        """The inverse of ``to_fields`` (what a stream reader does)."""
        outputs = tuple((k[len("digest.") :], v) for k, v in fields.items() if k.startswith("digest."))
        return cls(
            request_id=fields["request_id"],
            variant=fields["variant"],
            model=fields["model"],
            status=int(fields["status"]),
            latency_ms=float(fields["latency_ms"]),
            digest=fields["digest"],
            output_digests=outputs,
            ts=float(fields["ts"]),
            fallback=fields.get("fallback", ""),
            prediction=orjson.loads(fields["prediction"]) if fields.get("prediction") else None,
        )


def output_digests(names: Sequence[str], arrays: Sequence[np.ndarray]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A digest over every output (name, dtype, shape, bytes), and one per output."""
    overall = hashlib.blake2b(digest_size=16)
    per_output = []
    for name, array in zip(names, arrays, strict=True):
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).data)
        digest = h.hexdigest()
        per_output.append((name, digest))
        overall.update(name.encode() + b"=" + digest.encode() + b";")
    return overall.hexdigest(), tuple(per_output)


class ReportSink(Protocol):
    """Where reports go; ``send`` may raise (the reporter counts and drops the batch)."""

    async def send(self, reports: Sequence[ShadowReport]) -> None: ...

    async def close(self) -> None: ...


class QualitySink(Protocol):
    """Where quality reports go (the three sinks below are both); ``send_quality`` may raise."""

    async def send_quality(self, report: QualityReport) -> None: ...


class MemorySink:
    """Keeps reports in a list: the embedded default and the test double."""

    def __init__(self) -> None:
        self.reports: list[ShadowReport] = []
        self.quality: list[QualityReport] = []

    async def send(self, reports: Sequence[ShadowReport]) -> None:
        self.reports.extend(reports)

    async def send_quality(self, report: QualityReport) -> None:
        self.quality.append(report)

    async def close(self) -> None:
        pass


class HttpSink:
    """POSTs each batch as a JSON list to ``url`` with ``Authorization: Bearer <admin token>``.

    The controller's ``/reports`` takes the same admin token as its other write endpoints, read
    from ``token_file`` (default: the file ``$COHORTGATE_TOKEN_FILE`` names). The file is read at
    the first send, since the controller may create it after the sidecar starts, and again after a
    401 (the token was rotated). The token is never logged.
    """

    def __init__(self, url: str, timeout_s: float = 2.0, token_file: str | os.PathLike[str] | None = None) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self.token_file = token_file if token_file is not None else os.environ.get(TOKEN_FILE_ENV) or None
        self._token: str | None = None
        self._session = None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._token is None and self.token_file is not None:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    self._token = f.read().strip() or None
            except OSError as exc:
                raise RuntimeError(f"cannot read the report token file {self.token_file}: {exc.strerror}") from None
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def send(self, reports: Sequence[ShadowReport]) -> None:
        await self._post(self.url, orjson.dumps([r.to_json() for r in reports]))

    @property
    def quality_url(self) -> str:
        """``QUALITY_REPORTS_PATH`` on the same controller: ``.../reports`` -> ``.../reports/quality``."""
        parts = urlsplit(self.url)
        base = parts.path.rstrip("/").removesuffix("/reports")
        return urlunsplit(parts._replace(path=base + QUALITY_REPORTS_PATH, query=""))

    async def send_quality(self, report: QualityReport) -> None:
        await self._post(self.quality_url, orjson.dumps(report.to_json()))

    async def _post(self, url: str, body: bytes) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        async with self._session.post(url, data=body, headers=self._headers()) as response:
            if response.status == 401:
                self._token = None  # re-read the file next time
                raise RuntimeError(
                    f"report endpoint answered 401: set ${TOKEN_FILE_ENV} to the controller's admin token file"
                    if self.token_file is None
                    else f"report endpoint answered 401 with the token from {self.token_file}"
                )
            if response.status >= 300:
                raise RuntimeError(f"report endpoint answered {response.status}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class RedisStreamSink:
    """XADDs each report to a Redis stream, trimmed to about ``maxlen`` entries."""

    def __init__(self, url: str, stream: str = REPORTS_STREAM, maxlen: int = STREAM_MAXLEN) -> None:
        import redis.asyncio as redis

        self.stream = stream
        self._maxlen = maxlen
        self._client = redis.Redis.from_url(url)

    async def send(self, reports: Sequence[ShadowReport]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for report in reports:
            pipe.xadd(self.stream, report.to_fields(), maxlen=self._maxlen, approximate=True)
        await pipe.execute()

    async def send_quality(self, report: QualityReport) -> None:
        fields = {"report": orjson.dumps(report.to_json())}
        await self._client.xadd(QUALITY_STREAM, fields, maxlen=self._maxlen, approximate=True)

    async def close(self) -> None:
        await self._client.aclose()


def sink_from_url(url: str) -> ReportSink:
    """``http(s)://...`` -> HttpSink; ``redis(s)://host:port/db?stream=NAME`` -> RedisStreamSink."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return HttpSink(url)
    if parts.scheme in ("redis", "rediss", "unix"):
        query = parse_qs(parts.query)
        stream = query.pop("stream", [REPORTS_STREAM])[0]
        rest = "&".join(f"{k}={v}" for k, values in query.items() for v in values)
        return RedisStreamSink(urlunsplit(parts._replace(query=rest)), stream=stream)
    raise ValueError(f"--report-to must be an http(s):// or redis:// URL, got {url!r}")


@dataclass(slots=True)
class _Pending:
    request_id: str
    status: int
    latency_s: float
    outputs: Sequence[np.ndarray] | None
    ts: float
    fallback: str = ""


class Reporter:
    """Fire-and-forget reporting through a bounded queue; ``start`` inside the running loop."""

    def __init__(
        self,
        sink: ReportSink,
        *,
        variant: str,
        model: str,
        output_names: Sequence[str],
        metrics: SidecarMetrics | None = None,
        capacity: int = 10_000,
        batch: int = 256,
        predictions: bool = False,
    ) -> None:
        self.sink = sink
        self.predictions = predictions  # add each one-row answer's served prediction (labels give accuracy)
        self.variant = variant
        self.model = model
        self._names = tuple(output_names)
        self._metrics = metrics
        self._capacity = capacity
        self._batch = batch
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._drain(), name="sidecar-reporter")

    def report(
        self,
        request_id: str,
        status: int,
        latency_s: float,
        outputs: Sequence[np.ndarray] | None,
        fallback: str = "",
    ) -> None:
        """Queue one report; drop it (and count the drop) when the queue is full or closed. ``fallback``:
        why the features' fallback served the request (empty when joined, or without features)."""
        if self._closing or len(self._queue) >= self._capacity or self._wakeup is None:
            self._count("dropped")
            return
        self._queue.append(_Pending(request_id, status, latency_s, outputs, time.time(), fallback))
        if not self._wakeup.is_set():
            self._wakeup.set()

    async def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (for at most ``timeout_s``), then close the sink."""
        self._closing = True
        if self._task is not None and self._wakeup is not None:
            self._wakeup.set()
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except TimeoutError:
                self._count("dropped", len(self._queue))
        with contextlib.suppress(Exception):
            await self.sink.close()

    def _count(self, outcome: str, n: int = 1) -> None:
        if self._metrics is not None and n:
            self._metrics.reports[outcome] += n

    def _build(self, p: _Pending) -> ShadowReport:
        if p.outputs is None:
            digest, per_output = "", ()
        else:
            digest, per_output = output_digests(self._names, p.outputs)
        prediction = None
        if self.predictions and p.outputs is not None and p.request_id:
            prediction = served_prediction(self._names, p.outputs)
        return ShadowReport(
            p.request_id, self.variant, self.model, p.status, round(p.latency_s * 1000, 3), digest, per_output, p.ts,
            p.fallback, prediction,
        )  # fmt: skip

    async def _drain(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            items = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            reports = [self._build(p) for p in items]
            try:
                await self.sink.send(reports)
            except Exception as exc:  # a sink failure never reaches a request; count and go on
                throttled.warning(
                    "shadow report sink failed (%d reports dropped): %s", len(reports), exc, key=SINK_FAILED
                )
                self._count("failed", len(reports))
            else:
                throttled.resolved(SINK_FAILED, "shadow report sink works again")
                self._count("sent", len(reports))


class QualityReporter:
    """Every ``interval_s``, close the gate's window and send its report; ``start`` inside the loop.

    ``gate`` is read on every tick (a live swap installs a new one); ``retire`` sends the window of a
    gate being replaced right away, so a swap loses no rows.
    """

    def __init__(
        self,
        sink: QualitySink,
        gate: Callable[[], QualityGate | None],
        *,
        interval_s: float = 10.0,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        self.sink = sink
        self._gate = gate
        self.interval_s = interval_s
        self._metrics = metrics
        self._task: asyncio.Task | None = None
        self._pending: list[QualityReport] = []

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="sidecar-quality-reporter")

    def retire(self, gate: QualityGate) -> None:
        self._pending.append(gate.take())

    async def close(self) -> None:
        """Send the last (partial) window, then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.send_now()

    async def send_now(self) -> None:
        gate = self._gate()
        if gate is not None:
            self._pending.append(gate.take())
        pending, self._pending = self._pending, []
        for report in pending:
            if not report.requests:
                continue  # an idle window says nothing; the controller keeps its last one
            try:
                await self.sink.send_quality(report)
            except Exception as exc:  # never reaches a request: count, log (throttled) and go on
                throttled.warning("quality report sink failed (a window dropped): %s", exc, key=QUALITY_FAILED)
                self._count("failed")
            else:
                throttled.resolved(QUALITY_FAILED, "quality report sink works again")
                self._count("sent")

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.quality_reports[outcome] += 1

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.send_now()
