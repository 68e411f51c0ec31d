"""Envoy's own error answers, as JSON with a stable code like the processor's denials.

A local reply (one Envoy makes itself, the processor's immediate responses included) is matched
against `local_replies` in order and gets that status and body: a backend that cannot be reached
or answers too late, a processor that cannot be reached *or does not answer within its message
timeout* (Envoy's own answer would be an empty 504; ours is the documented 503 ``unavailable``),
a body over the size limit, whatever its framing, and a request Envoy's codec refuses (a header
name with an underscore, which the listener rejects: text/plain "Bad Request" before; found by
fuzzing ``/v1/outcomes``, ``tests/contracts/test_fuzz_outcomes.py``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


def local_reply_config() -> Any:
    from envoy_data_plane.google.protobuf import Struct

    m = pb()
    mappers = []
    for reply in local_replies():
        if reply.flags is not None:
            flt = m.accesslog.AccessLogFilter(
                response_flag_filter=m.accesslog.ResponseFlagFilter(flags=list(reply.flags))
            )
        else:
            flt = m.accesslog.AccessLogFilter(
                status_code_filter=m.accesslog.StatusCodeFilter(
                    comparison=m.accesslog.ComparisonFilter(
                        op=m.accesslog.ComparisonFilterOp.EQ,
                        value=m.core.RuntimeUInt32(
                            default_value=reply.status, runtime_key="cohortgate.local_reply.status"
                        ),
                    )
                )
            )
        body = Struct.from_dict({"error": {"code": reply.code, "message": reply.message}})
        mappers.append(
            m.hcm.ResponseMapper(
                filter=flt,
                status_code=reply.answer,
                body_format_override=m.core.SubstitutionFormatString(json_format=body, content_type="application/json"),
            )
        )
    return m.hcm.LocalReplyConfig(mappers=mappers)
