"""`handle_encoded`: the answer the fast HTTP/2 server sends is `handle`'s, serialised, byte for byte,
for every kind of message; the allowed answer is never parsed into a message on the way (issue 25)."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cohortgate.deploy import pki
from gateway.extproc import Processor, ProcessorSettings
from gateway.h2.grpcstream import GrpcStream
from gateway.h2.grpcwire import MESSAGE_PREFIX
from gateway.service import PolicyHolder, build_verifier
from tests.gateway.test_extproc import INFER, SALT, infer, make_policy, request, token


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("encoded") / "certs", clients=())


@pytest.fixture(scope="module")
def engine(certs: pki.CertPaths) -> Processor:
    policy = make_policy(certs)
    return Processor(PolicyHolder(policy), build_verifier(policy.jwt), ProcessorSettings(SALT, max_body_bytes=1000))


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    sub=st.sampled_from(["user-1", "user-2", "qa-canary"]),
    residency=st.sampled_from(["eu", "ae", "us", None]),
    path=st.sampled_from([INFER, "/v2/models/ae-scoring/infer", "/v1/header/a", "/nope"]),
    with_token=st.booleans(),
    grpc=st.booleans(),
)
def test_the_encoded_answer_is_the_serialised_message(
    engine: Processor,
    certs: Any,
    sub: str,
    residency: str | None,
    path: str,
    with_token: bool,
    grpc: bool,
) -> None:
    auth = "Bearer " + token(certs, sub, residency=residency) if with_token else None
    extra = {"content-type": "application/grpc"} if grpc else {}
    msg = request(infer(auth, path=path, **extra))
    stream = engine.new_processor()
    assert stream.handle_encoded(msg) == stream.handle(msg).SerializeToString()  # type: ignore[union-attr]


def test_other_phases_and_observability(engine: Processor) -> None:
    stream = engine.new_processor()
    other = pb.ProcessingRequest()
    other.response_headers.SetInParent()
    assert stream.handle_encoded(other) == stream.handle(other).SerializeToString()  # type: ignore[union-attr]
    watched = pb.ProcessingRequest(observability_mode=True)
    watched.response_headers.SetInParent()
    assert stream.handle_encoded(watched) is None and stream.handle(watched) is None
    broken = pb.ProcessingRequest()  # no phase at all: the 503 answer
    assert stream.handle_encoded(broken) == stream.handle(broken).SerializeToString()  # type: ignore[union-attr]


def test_the_fast_server_sends_the_encoded_answer(engine: Processor, certs: Any, monkeypatch: Any) -> None:
    msg = request(infer("Bearer " + token(certs)))
    expected = engine.new_processor().handle(msg).SerializeToString()  # type: ignore[union-attr]
    monkeypatch.setattr(pb.ProcessingResponse, "FromString", None)  # the encoded path never parses an answer
    stream = GrpcStream(1, engine.new_processor(), 65_535, 65_535, None)
    assert stream.answer(msg.SerializeToString()) == MESSAGE_PREFIX.pack(0, len(expected)) + expected
