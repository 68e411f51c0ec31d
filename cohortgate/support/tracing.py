"""W3C trace context and OTLP export of finished spans, off unless asked (the optional ``otel`` extra).

A process that was not given a collector address holds no `Tracing` at all: the request path tests
``tracing is not None`` and does nothing else, and opentelemetry is never imported. With one, each
request's work is recorded *after the fact* as one span, a child of the ``traceparent`` the request
carried (Envoy's, or the client's): the hot path only notes a start time, and the span is built and
handed to the SDK's batch processor (a background thread that POSTs OTLP/HTTP protobuf to
``ENDPOINT/v1/traces``) once the answer is known. Sampling is parent-based: a request whose parent
was sampled is traced, one whose parent was not is not, and a request without a parent is traced
with probability ``ratio``. `sampled` makes that decision before any span object exists (a header
look-up and one random draw), so the requests left out cost next to nothing; the SDK's own sampler
then only sees requests already chosen.

Attributes never carry a token, a payload or a raw user id (the callers pass routing facts only).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

#: the W3C trace-context header (https://www.w3.org/TR/trace-context/)
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_HEADERS = frozenset({TRACEPARENT, TRACESTATE})


def trace_id(traceparent: str | None) -> str | None:
    """The 32-hex trace id of a well-formed ``traceparent`` (``00-<trace>-<span>-<flags>``), else None."""
    if traceparent is None or len(traceparent) < 55 or traceparent[2] != "-" or traceparent[35] != "-":
        return None
    tid = traceparent[3:35]
    return tid if tid != "0" * 32 and all(c in "0123456789abcdef" for c in tid) else None


class Tracing:
    """One process's tracer provider, exporter and batch processor."""

    def __init__(self, service: str, endpoint: str | None, ratio: float = 1.0, *, exporter: Any = None) -> None:
        """``endpoint`` is the collector's OTLP/HTTP base URL (``http://collector:4318``); ``exporter``
        replaces the OTLP exporter (tests, benchmarks)."""
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"trace sample ratio {ratio}: must be within 0..1")
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise RuntimeError("tracing needs the otel extra: pip install 'cohortgate[otel]'") from exc
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=f"{(endpoint or '').rstrip('/')}/v1/traces", timeout=5)
        self.service = service
        self.ratio = ratio
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": f"cohortgate-{service}", "service.namespace": "cohortgate"}),
            sampler=ParentBased(ALWAYS_ON),  # `sampled` already chose
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self.tracer = self.provider.get_tracer("cohortgate")
        self._propagator = TraceContextTextMapPropagator()
        self._random = random.Random().random

    def sampled(self, traceparent: str | None) -> bool:
        """Parent-based: a well-formed parent's sampled flag decides; without one, ``ratio`` does."""
        if traceparent is not None and trace_id(traceparent) is not None:
            return traceparent[54] in "13579bdf"  # the low hex digit of the flags: bit 0 is sampled
        return self._random() < self.ratio

    def span(
        self,
        name: str,
        headers: Mapping[str, str],
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any],
    ) -> None:
        """Record one finished span, the child of ``headers``' ``traceparent`` (a root without one)."""
        parent = self._propagator.extract(headers) if TRACEPARENT in headers else None
        span = self.tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes)
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        """Export what is queued, then stop the batch thread."""
        self.provider.shutdown()
