"""Envoy's own error answers, as JSON with a stable code like the processor's denials.

A local reply (one Envoy makes itself, the processor's immediate responses included) is matched
against `local_replies` in order and gets that status and body: a backend that cannot be reached
or answers too late, a processor that cannot be reached *or does not answer within its message
timeout* (Envoy's own answer would be an empty 504; ours is the documented 503 ``unavailable``),
a body over the size limit, whatever its framing, and a request Envoy's codec refuses (a header
name with an underscore, which the listener rejects: text/plain "Bad Request" before; found by
fuzzing ``/v1/outcomes``, ``tests/contracts/test_fuzz_outcomes.py``).

A gRPC caller (request ``content-type`` ``application/grpc*``) reads a status, not a body: Envoy turns
its local reply into a trailers-only answer whose ``grpc-status`` comes from the HTTP status (503 and
504: UNAVAILABLE, 413: UNKNOWN, 400: INTERNAL; a processor denial keeps the gRPC status it named) and
whose ``grpc-message`` is the body. So each mapper has a gRPC twin, tried first and filtered on the
request's content-type, that answers the same status with the same sentence as plain text: a gRPC
client sees "The model backend ... cannot be reached", not a JSON document.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from cohortgate.core.contract import GRPC_CONTENT_TYPE
from cohortgate.core.errors import Denial
from cohortgate.deploy.envoy.typed import pb

UPSTREAM_DOWN_FLAGS = ("UH", "UF", "UO", "URX", "NC", "NR", "UC", "DC", "LR", "UPE", "UMSDR")
UPSTREAM_TIMEOUT_FLAGS = ("UT",)


class LocalReply(NamedTuple):
    """Match a local reply by response ``flags`` or by ``status``; answer ``answer`` with ``code``."""

    flags: tuple[str, ...] | None
    status: int | None
    answer: int
    code: str
    message: str


def local_replies() -> tuple[LocalReply, ...]:
    """The mappers in the order Envoy tries them (first match wins).

    A 413 gets the denial's own sentence whoever refused the body (the processor by its
    ``content-length``, or Envoy's body limit): a mapper cannot tell them apart, and the limits of
    the two may differ, so the sentence names none."""
    unavailable = LocalReply(
        None, 503, Denial.UNAVAILABLE.status, Denial.UNAVAILABLE.code,
        "The gateway cannot decide on this request right now; try again later.",
    )  # fmt: skip
    return (
        # Envoy's own 400s are its codec refusing the request (the processor never answers 400, so
        # its denials keep their bodies); matched by status: a DPE response-flag filter missed them
        LocalReply(None, 400, 400, "bad_request",
                   "The request is not valid HTTP here (for example a header name with an underscore)."),
        LocalReply(UPSTREAM_DOWN_FLAGS, None, 503, "backend_unavailable",
                   "The model backend for this route cannot be reached right now; try again later."),
        LocalReply(UPSTREAM_TIMEOUT_FLAGS, None, 504, "backend_timeout",
                   "The model backend for this route did not answer in time."),
        unavailable,
        # Every other local 504 is ext_proc's message timeout (a backend's is flagged UT, above).
        unavailable._replace(status=504),
        LocalReply(None, Denial.PAYLOAD_TOO_LARGE.status, Denial.PAYLOAD_TOO_LARGE.status,
                   Denial.PAYLOAD_TOO_LARGE.code, Denial.PAYLOAD_TOO_LARGE.default_message),
    )  # fmt: skip


def _match(reply: LocalReply) -> Any:
    """The access-log filter that picks ``reply``'s local replies: by response flags, else by status."""
    m = pb()
    if reply.flags is not None:
        return m.accesslog.AccessLogFilter(response_flag_filter=m.accesslog.ResponseFlagFilter(flags=list(reply.flags)))
    return m.accesslog.AccessLogFilter(
        status_code_filter=m.accesslog.StatusCodeFilter(
            comparison=m.accesslog.ComparisonFilter(
                op=m.accesslog.ComparisonFilterOp.EQ,
                value=m.core.RuntimeUInt32(default_value=reply.status, runtime_key="cohortgate.local_reply.status"),
            )
        )
    )


def _grpc_caller() -> Any:
    """The filter that picks a gRPC caller's requests (``application/grpc``, ``+proto``, ``+json``...)."""
    m = pb()
    return m.accesslog.AccessLogFilter(
        header_filter=m.accesslog.HeaderFilter(
            header=m.route.HeaderMatcher(
                name="content-type", string_match=m.matcher.StringMatcher(prefix=GRPC_CONTENT_TYPE)
            )
        )
    )


def local_reply_config() -> Any:
    """Every reply twice: for a gRPC caller (its sentence as ``grpc-message``), then as JSON for the rest."""
    from envoy_data_plane.google.protobuf import Struct

    m = pb()
    replies = local_replies()
    grpc = [
        m.hcm.ResponseMapper(
            filter=m.accesslog.AccessLogFilter(and_filter=m.accesslog.AndFilter(filters=[_grpc_caller(), _match(r)])),
            status_code=r.answer,
            # text, not JSON; Envoy sets the gRPC content-type and moves the body into grpc-message
            body_format_override=m.core.SubstitutionFormatString(
                text_format_source=m.core.DataSource(inline_string=r.message)
            ),
        )
        for r in replies
    ]
    json = [
        m.hcm.ResponseMapper(
            filter=_match(r),
            status_code=r.answer,
            body_format_override=m.core.SubstitutionFormatString(
                json_format=Struct.from_dict({"error": {"code": r.code, "message": r.message}}),
                content_type="application/json",
            ),
        )
        for r in replies
    ]
    return m.hcm.LocalReplyConfig(mappers=[*grpc, *json])
