"""Envoy's gRPC access-log service (ALS) receiver: per-request outcomes, off the response path.

Why ALS and not an event from the ext_proc processor: the processor answers before the upstream
does, so it never sees the status or the latency without asking Envoy for the response headers --
one more blocking round trip on every request. Envoy's ALS is asynchronous: it buffers entries
after the response has been sent and streams them to us (``StreamAccessLogs``), with the status,
the upstream timings, the request id, the upstream cluster and the headers the processor set
(hashed unit, region), which Envoy logs through ``additional_request_headers_to_log``, and the
sidecar's ``x-cohortgate-model-digest`` response header (``additional_response_headers_to_log``): the
artifact that actually answered, which the controller compares with the routed one (provenance.py).
On routes that declare outcome metrics (``measured``) the processor's ``x-cohortgate-exposure`` is kept
too, on entries a backend answered: the controller verifies it and counts the unit as exposed, so a
unit that never reports an outcome is a zero in the metric's denominator (issue 19).

**Attribution comes only from what a client cannot set** (issue 17.2). The route and variant of an
outcome are Envoy's upstream cluster (``cg.ROUTE.VARIANT.N``): the router sets it only after the
processor allowed the request and named the cluster (clearing the route cache), and Envoy does
not derive it from a client-sent ``x-cohortgate-cluster`` before then (checked against real
Envoy). The logged ``x-cohortgate-*`` request headers are trusted only on such an entry: the
processor stripped every client-sent one before setting its own. On any other entry -- a denial,
a fail-closed 503 while the processor is down or hung, a client that never finished -- those
headers are whatever the client sent, so they are ignored: the entry has no variant, and its route
is the one its method and path match in the policy (``route_of``), never a header.

**A gRPC answer's status is its ``grpc-status``, not the HTTP one** (issue 25). A failed gRPC call is
HTTP 200 with a non-zero ``grpc-status`` trailer, or in the headers of a trailers-only answer (Envoy's
own local replies to a gRPC caller are those too, so Envoy logs them as 200). Envoy logs both places
(``ACCESS_LOG_RESPONSE_TRAILERS`` / ``_HEADERS``); the event's status is then the code's HTTP
equivalent (`GRPC_AS_HTTP`, google.rpc.Code's documented mapping), so the error-rate guardrail counts
exactly what it counts for REST: server-side failures (UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED,
DATA_LOSS, an unreadable status) are 5xx errors; a client's own mistakes are 4xx and are not, so a
client cannot push its variant towards rollback by sending bad tensors: INVALID_ARGUMENT,
FAILED_PRECONDITION, NOT_FOUND, RESOURCE_EXHAUSTED (the sidecar's 413) and UNIMPLEMENTED (a method the
backend does not serve: the sidecar's 405; Google maps it to 501, we do not count the client's choice
of method). CANCELLED is 499 ("client closed request"): the caller gave up, the model did not fail; a
client that hangs up before the answer is logged without a status (0) and counted as before.

`event_from_entry` turns one ``HTTPAccessLogEntry`` into an `Event` (pure, tested without gRPC);
`AccessLogReceiver` is the grpc.aio servicer that feeds a sink; `serve_als` binds it to
``uds:PATH`` or ``tcp:HOST:PORT``. Entries without a variant (denials, fail-closed answers) are
counted in the metrics by route but not sent to the controller; an ``on_denied`` callback (the
dashboard's denial counts) sees them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from cohortgate.controller.metrics import TrafficMetrics
from cohortgate.core.contract import (
    HEADER_EXPOSURE,
    HEADER_GRPC_STATUS,
    HEADER_MODEL_DIGEST,
    HEADER_REGION,
    HEADER_SEGMENT,
    HEADER_SHADOW_OF,
    HEADER_SHADOWS,
    HEADER_UNIT,
    cluster_index,
    cluster_parts,
)
from cohortgate.core.policy import Policy
from cohortgate.store.events import REQUEST, Event, EventSink
from cohortgate.support.logs import Throttle

log = logging.getLogger(__name__)
throttled = Throttle(log)  # one malformed entry per request must not flood the log (issue 17.6)


def _ms(duration: Any) -> float:
    return duration.seconds * 1000.0 + duration.nanos / 1e6


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # what a sidecar sends; anything else is not kept
_TOKEN = re.compile(r"[0-9A-Za-z._-]{1,512}")  # an exposure token's alphabet (core.exposure verifies it)

# gRPC status code -> the HTTP status an event records (google.rpc.Code's mapping, but UNIMPLEMENTED: 405,
# CANCELLED: 499); see the module docstring for which count as errors and why.
GRPC_AS_HTTP: dict[int, int] = {
    0: 200,  # OK
    1: 499,  # CANCELLED
    2: 500,  # UNKNOWN
    3: 400,  # INVALID_ARGUMENT
    4: 504,  # DEADLINE_EXCEEDED
    5: 404,  # NOT_FOUND
    6: 409,  # ALREADY_EXISTS
    7: 403,  # PERMISSION_DENIED
    8: 429,  # RESOURCE_EXHAUSTED
    9: 400,  # FAILED_PRECONDITION
    10: 409,  # ABORTED
    11: 400,  # OUT_OF_RANGE
    12: 405,  # UNIMPLEMENTED
    13: 500,  # INTERNAL
    14: 503,  # UNAVAILABLE
    15: 500,  # DATA_LOSS
    16: 401,  # UNAUTHENTICATED
}


def response_status(response: Any) -> int:
    """The status an event records for ``HTTPResponseProperties``: the HTTP one, or for a gRPC answer
    (HTTP 200 with a ``grpc-status`` trailer or trailers-only header) its code's HTTP equivalent; an
    unreadable ``grpc-status`` is a server error (500), as a gRPC client reads it as UNKNOWN."""
    status = int(response.response_code.value) if response.HasField("response_code") else 0
    if status != 200:
        return status
    for fields in (response.response_trailers, response.response_headers):  # a trailer, or trailers-only
        if HEADER_GRPC_STATUS in fields:
            code = fields[HEADER_GRPC_STATUS].strip()
            return GRPC_AS_HTTP.get(int(code), 500) if code.isascii() and code.isdigit() and len(code) <= 3 else 500
    return status


RouteOf = Callable[[str, str], str]
"""``route_of(method, path)``: the name of the policy route a request matches, or ``""``."""


def route_by_path(policy: Callable[[], Policy]) -> RouteOf:
    """A `RouteOf` over the current policy (``policy()`` is read per call: reloads apply at once)."""

    def route_of(method: str, path: str) -> str:
        route = policy().match(method, path.partition("?")[0])
        return route.name if route is not None else ""

    return route_of


Measured = Callable[[str], bool]
"""``measured(route)``: whether the route declares outcome metrics (its entries keep their exposure token)."""


def routes_with_metrics(policy: Callable[[], Policy]) -> Measured:
    """A `Measured` over the current policy (read per call, like `route_by_path`)."""

    def measured(route: str) -> bool:
        found = policy().by_name.get(route)
        return found is not None and bool(found.metrics)

    return measured


def event_from_entry(entry: Any, route_of: RouteOf | None = None, measured: Measured | None = None) -> Event:
    """One ``envoy.data.accesslog.v3.HTTPAccessLogEntry`` -> an `Event`.

    Route, variant and the backend's index N come from the upstream cluster only; without one (the
    request never reached a backend the processor chose) the variant, unit, region and shadow mark
    are empty, the backend is -1 and the route is ``route_of(method, path)`` (empty without
    ``route_of``). The exposure token is kept only when ``measured(route)`` and the backend answered
    (Envoy received its last byte), never on a mirrored copy.
    """
    common = entry.common_properties
    request = entry.request
    parts = cluster_parts(common.upstream_cluster) if common.upstream_cluster else None
    if parts is not None:
        headers = request.request_headers  # set (or stripped) by the processor: see the module docstring
        (route, variant), unit, region = parts, headers.get(HEADER_UNIT, ""), headers.get(HEADER_REGION, "")
        shadow_of = headers.get(HEADER_SHADOW_OF, "")
        segment = headers.get(HEADER_SEGMENT, "")
        backend = cluster_index(common.upstream_cluster)
        served = entry.response.response_headers.get(HEADER_MODEL_DIGEST, "")  # the backend's answer
        model_digest = served if _DIGEST.fullmatch(served) else ""
        exposure = ""
        if measured is not None and not shadow_of and common.HasField("time_to_last_upstream_rx_byte"):
            token = headers.get(HEADER_EXPOSURE, "")
            if token and _TOKEN.fullmatch(token) and measured(route):
                exposure = token
    else:
        backend = None
        variant = unit = region = shadow_of = segment = model_digest = exposure = ""
        route = ""
        if route_of is not None and request.path:
            method = request.DESCRIPTOR.fields_by_name["request_method"].enum_type.values_by_number.get(
                request.request_method
            )
            route = route_of(method.name if method is not None else "", request.path)
    if common.HasField("time_to_last_upstream_rx_byte") and common.HasField("time_to_first_upstream_tx_byte"):
        latency = _ms(common.time_to_last_upstream_rx_byte) - _ms(common.time_to_first_upstream_tx_byte)
    elif common.HasField("duration"):
        latency = _ms(common.duration)
    else:
        latency = 0.0
    ts = common.start_time.seconds + common.start_time.nanos / 1e9 if common.HasField("start_time") else 0.0
    return Event(
        kind=REQUEST,
        route=route,
        variant=variant,
        status=response_status(entry.response),
        latency_ms=max(0.0, latency),
        request_id=entry.request.request_id,
        region=region,
        unit=unit,
        ts=ts,
        shadow_of=shadow_of,
        segment=segment,
        backend=-1 if backend is None else backend,
        model_digest=model_digest,
        exposure=exposure,
    )


class AccessLogReceiver:
    """``envoy.service.accesslog.v3.AccessLogService`` servicer: entries -> events -> the sink."""

    def __init__(
        self,
        sink: EventSink,
        metrics: TrafficMetrics | None = None,
        on_denied: Callable[[Event], None] | None = None,
        route_of: RouteOf | None = None,
        measured: Measured | None = None,
    ) -> None:
        self.sink = sink
        self.metrics = metrics
        self.on_denied = on_denied
        self.route_of = route_of
        self.measured = measured
        self.entries = 0
        self.emitted = 0
        self.streams = 0

    def handle(self, message: Any) -> None:
        """One ``StreamAccessLogsMessage`` (sync: called for each message of a stream)."""
        for entry in message.http_logs.log_entry:
            self.entries += 1
            try:
                event = event_from_entry(entry, self.route_of, self.measured)
            except (ValueError, AttributeError) as exc:  # a malformed entry never ends the stream
                throttled.warning("skipping an access-log entry: %s", exc)
                continue
            if self.metrics is not None and not event.shadow_of:
                self.metrics.observe_request(
                    event.route or "none", event.variant or "none", event.status, event.latency_ms / 1000.0
                )
                headers = entry.request.request_headers
                for slot in HEADER_SHADOWS if event.variant else ():  # mirrors the processor named
                    route, shadow = cluster_parts(headers.get(slot, "")) or ("", "")
                    if shadow:
                        self.metrics.shadow_copy(route, shadow)
            if event.route and event.variant and not event.shadow_of:
                self.sink.emit(event)
                self.emitted += 1
                if self.metrics is not None:
                    self.metrics.event_emitted(REQUEST)
            elif self.on_denied is not None and not event.shadow_of:
                self.on_denied(event)

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[Any], context: Any) -> Any:
        from envoy.service.accesslog.v3 import als_pb2

        self.streams += 1
        async for message in request_iterator:
            self.handle(message)
        return als_pb2.StreamAccessLogsResponse()


def grpc_target(spec: str) -> str:
    """``uds:PATH`` -> ``unix:PATH``; ``tcp:HOST:PORT`` -> ``HOST:PORT`` (what grpc binds).

    The service is plaintext, so TCP must be loopback: Envoy and the receiver share a host.
    """
    kind, _, rest = spec.partition(":")
    if kind == "uds" and rest:
        return f"unix:{rest}"
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback:
                raise ValueError(f"access-log address {spec!r}: plaintext gRPC is only served on loopback")
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    raise ValueError(f"access-log address {spec!r} must be uds:PATH or tcp:HOST:PORT")


async def serve_als(
    sink: EventSink,
    address: str,
    metrics: TrafficMetrics | None = None,
    on_denied: Callable[[Event], None] | None = None,
    route_of: RouteOf | None = None,
    measured: Measured | None = None,
) -> tuple[Any, AccessLogReceiver]:
    """Start a grpc.aio server with the receiver on ``address``; returns ``(server, receiver)``.

    Stop it with ``await server.stop(grace)``. A stale Unix socket file is replaced.
    """
    import grpc
    from envoy.service.accesslog.v3 import als_pb2_grpc

    target = grpc_target(address)
    if target.startswith("unix:"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target[len("unix:") :])
    receiver = AccessLogReceiver(sink, metrics, on_denied, route_of, measured)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(receiver, server)  # type: ignore[arg-type]
    uds = target[len("unix:") :] if target.startswith("unix:") else None
    if uds is not None:
        from cohortgate.support.files import private_umask

        with private_umask():  # only Envoy's user may feed the controller outcomes (they drive rollbacks)
            server.add_insecure_port(target)
    elif server.add_insecure_port(target) == 0:
        raise OSError(f"cannot bind the access-log service to {address}")
    await server.start()
    if uds is not None:
        os.chmod(uds, 0o600)
    return server, receiver
