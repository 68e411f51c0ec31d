"""The processor writes the request's quality segments (policy `quality.segments`) for the access log:
declared values only, whatever the client sends (issue 20)."""

from __future__ import annotations

from typing import Any

import pytest

from cohortgate.core.contract import HEADER_SEGMENT
from cohortgate.core.policy import Policy, parse_policy
from cohortgate.deploy import pki
from gateway.extproc import Processor, ProcessorSettings, policy_headers
from gateway.service import PolicyHolder, build_verifier
from tests.gateway.test_extproc import POLICY, SALT, answer, infer, request, set_headers, token

SEGMENTS = """    quality:
      segments:
        - {name: region, source: region, values: [eu]}
        - {name: device, source: header, key: X-Device, values: [ios, android]}
        - {name: tier, source: claim, key: tier, values: [gold]}
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("segments") / "certs", clients=())


@pytest.fixture(scope="module")
def policy(certs: pki.CertPaths) -> Policy:
    text = POLICY.format(jwks=certs.jwks, response_headers="true")
    match = "    match: {model: tabular, methods: [GET, POST]}\n"
    assert text.count(match) == 1
    text = text.replace(match, match + SEGMENTS)  # on the first route, `tabular`
    return parse_policy(text, filename="segments.yaml")


@pytest.fixture
def engine(policy: Policy) -> Processor:
    return Processor(PolicyHolder(policy), build_verifier(policy.jwt), ProcessorSettings(unit_salt=SALT))


def segment_of(engine: Processor, certs: pki.CertPaths, **kwargs: Any) -> str:
    claims = kwargs.pop("claims", {})
    headers = infer(f"Bearer {token(certs, claims=claims)}", **kwargs)
    return set_headers(answer(engine, request(headers)))[HEADER_SEGMENT]


def test_declared_values_pass_and_anything_else_is_other(engine, certs):
    assert segment_of(engine, certs, claims={"tier": "gold"}, **{"x-device": "ios"}) == "region=eu;device=ios;tier=gold"
    assert segment_of(engine, certs, claims={"tier": "x" * 300}, **{"x-device": "nokia"}) == (
        "region=eu;device=other;tier=other"
    )
    assert segment_of(engine, certs) == "region=eu;device=other;tier=other"


def test_a_client_sent_segment_header_never_survives(engine, certs):
    forged = {HEADER_SEGMENT: "region=us;device=ios;tier=gold", "x-device": "android"}
    resp = answer(engine, request(infer(f"Bearer {token(certs)}", **forged)))
    assert set_headers(resp)[HEADER_SEGMENT] == "region=eu;device=android;tier=other"  # overwritten, not appended


def test_the_processor_reads_the_segment_header(policy):
    assert policy.by_name["tabular"].quality is not None
    assert "x-device" in policy_headers(policy)  # lower-cased, like every header the processor reads


def test_the_processor_reads_a_bandit_segments_header():
    """A bandit's per-segment weights (`allocation.segments`, declared inline with a header) were keyed
    on a header the processor never asked Envoy for, so every request fell in `other`."""
    from tests.core.test_bandit import _with_allocation

    block = (
        "      reward: conversion\n"
        "      segments: [{name: device, source: header, key: X-Device, values: [ios, android]}]\n"
    )
    bandit = parse_policy(_with_allocation(block))
    assert bandit.by_name["ranker"].allocation.segment_of(None, {"x-device": "ios"}, None) == "ios"
    assert "x-device" in policy_headers(bandit)
