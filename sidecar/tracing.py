"""The sidecar's span: one per traced inference, the child of the ``traceparent`` Envoy forwarded.

Off unless the sidecar was given a collector (``--otlp-endpoint``): then `Sidecar.tracing` is None,
the handler makes one ``is not None`` test and opentelemetry is never imported. With one, the batcher
fills a `BatchTiming` for the request and the span is built after the answer, from its timings:
queue wait, the size of the batch the request ran in, and the model's compute time. Attributes carry
no payload, no tensor and no header but the trace context.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cohortgate.support.tracing import TRACE_HEADERS, TRACEPARENT

if TYPE_CHECKING:
    from cohortgate.support.tracing import Tracing
    from sidecar.batching import BatchTiming

log = logging.getLogger(__name__)

SPAN_NAME = "cohortgate.infer"


def open_tracing(endpoint: str | None, ratio: float) -> Tracing | None:
    """A `Tracing` for the sidecar, or None (the default) when no collector was given."""
    if endpoint is None:
        return None
    from cohortgate.support.tracing import Tracing

    return Tracing("sidecar", endpoint, ratio)


def record_infer(
    tracing: Tracing,
    headers: Mapping[str, str],
    elapsed_s: float,
    status: int,
    model: str,
    served_by: str,
    rows: int | None,
    timing: BatchTiming | None,
) -> None:
    """One finished ``cohortgate.infer`` span, if this request is sampled; never fails the request."""
    try:
        if not tracing.sampled(headers.get(TRACEPARENT)):
            return
        end = time.time_ns()
        attributes: dict[str, Any] = {
            "cohortgate.model": model,
            "cohortgate.variant": served_by,
            "http.response.status_code": status,
        }
        if rows is not None:
            attributes["cohortgate.rows"] = rows
        if timing is not None and timing.batch_requests:  # the request reached a batch
            attributes["cohortgate.queue_wait_s"] = timing.queue_s
            attributes["cohortgate.inference_s"] = timing.compute_s
            attributes["cohortgate.batch_rows"] = timing.batch_rows
            attributes["cohortgate.batch_requests"] = timing.batch_requests
        carrier = {k: headers[k] for k in TRACE_HEADERS if k in headers}
        tracing.span(SPAN_NAME, carrier, end - int(elapsed_s * 1e9), end, attributes)
    except Exception:  # tracing must never turn an answer into an error
        log.debug("cannot record a trace span", exc_info=True)
