"""Denials for gRPC callers: the processor answers ``content-type: application/grpc`` requests with the
denial's gRPC status and the same sentence (never a JSON body a gRPC client cannot read), through both
transports (protobuf and Envoy's JSON ``http_service``). No gRPC, no Envoy: messages in, messages out."""

from __future__ import annotations

from typing import Any

import pytest

from cohortgate.core.errors import Denial
from gateway.extproc import Processor
from tests.gateway.test_extproc import (  # noqa: F401  (certs, engine, policy, verifier: fixtures)
    APP,
    DENIALS,
    answer,
    certs,
    denial,
    engine,
    infer,
    policy,
    request,
    set_headers,
    token,
    verifier,
)

# The gRPC status each denial code becomes (grpc/status.h numbers), as the issue asks.
EXPECTED = {
    "unauthenticated": 16,  # UNAUTHENTICATED
    "forbidden": 7,  # PERMISSION_DENIED
    "no_route": 5,  # NOT_FOUND
    "residency_unavailable": 9,  # FAILED_PRECONDITION
    "payload_too_large": 8,  # RESOURCE_EXHAUSTED
    "unavailable": 14,  # UNAVAILABLE
}


def test_every_denial_has_a_grpc_status() -> None:
    assert {d.code: d.grpc_status for d in Denial} == EXPECTED


@pytest.mark.parametrize(
    ("auth", "extra", "uri", "status", "code"),
    [d[1:] for d in DENIALS],
    ids=[d[0] for d in DENIALS],
)
@pytest.mark.parametrize("content_type", ["application/grpc", "application/grpc+proto"])
def test_grpc_callers_get_grpc_statuses(
    engine: Processor,  # noqa: F811
    certs: Any,  # noqa: F811
    auth: Any,
    extra: dict[str, str],
    uri: str | None,
    status: int,
    code: str,
    content_type: str,
) -> None:
    json_resp = answer(engine, request(infer(auth(certs), **extra), uri=uri))
    _, _, json_body = denial(json_resp)
    grpc_headers = infer(auth(certs), **extra)
    grpc_headers["content-type"] = content_type
    resp = answer(engine, request(grpc_headers, uri=uri))
    imm = resp.immediate_response
    assert imm.grpc_status.status == EXPECTED[code]
    assert imm.body.decode() == json_body["error"]["message"]  # the same sentence, as grpc-message
    headers = {o.header.key: o.header.raw_value.decode() for o in imm.headers.set_headers}
    assert "content-type" not in headers  # Envoy writes application/grpc itself
    assert headers["x-request-id"] == "req-1"
    assert imm.details == "cohortgate_" + code
    assert imm.status.code == status  # what the access log and the metrics count


def test_allowed_grpc_requests_are_routed_like_rest(engine: Processor, certs: Any) -> None:  # noqa: F811
    headers = infer("Bearer " + token(certs))
    headers["content-type"] = "application/grpc"
    got = set_headers(answer(engine, request(headers, uri=APP)))
    assert got["x-cohortgate-route"] == "tabular"
    assert got["x-cohortgate-cluster"].startswith("cg.tabular.")


def test_a_json_caller_never_gets_a_grpc_status(engine: Processor, certs: Any) -> None:  # noqa: F811
    headers = infer(None)
    headers["content-type"] = "application/json+grpc"  # not a gRPC content type: starts otherwise
    resp = answer(engine, request(headers, uri=APP))
    assert not resp.immediate_response.HasField("grpc_status")
    assert denial(resp)[2]["error"]["code"] == "unauthenticated"
