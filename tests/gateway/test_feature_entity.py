"""The entity header of a route with `features:` (issue 22): only the processor sets it, from what the policy
names (a verified claim or a header), and a client's own copy never reaches a sidecar."""

from __future__ import annotations

from typing import Any

import pytest

from cohortgate.core.contract import HEADER_ENTITY
from cohortgate.core.policy import Policy, parse_policy
from cohortgate.deploy import pki
from gateway.extproc import Processor, ProcessorSettings
from gateway.service import PolicyHolder, build_verifier
from tests.gateway.test_extproc import SALT, answer, infer, request, set_headers, token

POLICY = """
version: 1
jwt: {{issuer: https://auth.cohortgate.local, audience: cohortgate, algorithms: [ES256], jwks: {jwks}}}
routes:
  - name: shop
    match: {{model: shop}}
    variants:
      - {{name: control, weight: 100, backends: [{{url: "http://127.0.0.1:18201", region: eu}}]}}
    residency: {{default_region: eu}}
    features:
      store: redis://127.0.0.1:6379/0
      project: cgdemo
      join_key: user_id
      entity: {{claim: sub}}
      views: [user_stats:clicks_7d]
      fallback: {{defaults: {{user_stats:clicks_7d: 0}}}}
  - name: by-header
    match: {{model: by-header}}
    variants:
      - {{name: control, weight: 100, backends: [{{url: "http://127.0.0.1:18202", region: eu}}]}}
    residency: {{default_region: eu}}
    features:
      store: redis://127.0.0.1:6379/0
      project: cgdemo
      join_key: user_id
      entity: {{header: X-User-Id}}
      views: [user_stats:clicks_7d]
      fallback: {{model: global.onnx}}
  - name: plain
    match: {{model: plain}}
    variants:
      - {{name: control, weight: 100, backends: [{{url: "http://127.0.0.1:18203", region: eu}}]}}
    residency: {{default_region: eu}}
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("entity") / "certs", clients=())


@pytest.fixture(scope="module")
def policy(certs: pki.CertPaths) -> Policy:
    return parse_policy(POLICY.format(jwks=certs.jwks), filename="features.yaml")


@pytest.fixture
def engine(policy: Policy) -> Processor:
    return Processor(PolicyHolder(policy), build_verifier(policy.jwt), ProcessorSettings(unit_salt=SALT))


def routed(engine: Processor, certs: pki.CertPaths, model: str, sub: str = "1001", **extra: Any) -> tuple[dict, set]:
    auth = f"Bearer {token(certs, sub)}"
    resp = answer(engine, request(infer(auth, f"/v2/models/{model}/infer", **extra)))
    assert resp.WhichOneof("response") == "request_headers", resp
    removed = set(resp.request_headers.response.header_mutation.remove_headers)
    return set_headers(resp), removed


def test_the_entity_comes_from_the_verified_claim_and_overwrites_a_forged_one(
    engine: Processor, certs: pki.CertPaths
) -> None:
    sets, removed = routed(engine, certs, "shop", sub="1001", **{HEADER_ENTITY: "1002"})
    assert sets[HEADER_ENTITY] == "1001"  # the token's sub, not what the client claimed
    assert HEADER_ENTITY not in removed  # overwritten (OVERWRITE_IF_EXISTS_OR_ADD), so no separate remove


def test_the_entity_can_come_from_a_header_the_policy_names(engine: Processor, certs: pki.CertPaths) -> None:
    sets, _ = routed(engine, certs, "by-header", **{"x-user-id": "u-77"})
    assert sets[HEADER_ENTITY] == "u-77"


@pytest.mark.parametrize("value", ["", "x" * 257, "caf\u00e9", "a\tb"])
def test_an_entity_a_header_cannot_carry_is_not_sent_and_a_forged_one_is_stripped(
    engine: Processor, certs: pki.CertPaths, value: str
) -> None:
    extra = {HEADER_ENTITY: "1002"}
    if value:
        extra["x-user-id"] = value
    sets, removed = routed(engine, certs, "by-header", **extra)
    assert HEADER_ENTITY not in sets and HEADER_ENTITY in removed  # the sidecar then serves its fallback


def test_a_route_without_features_never_forwards_an_entity(engine: Processor, certs: pki.CertPaths) -> None:
    sets, removed = routed(engine, certs, "plain", **{HEADER_ENTITY: "1002"})
    assert HEADER_ENTITY not in sets and HEADER_ENTITY in removed
    sets, removed = routed(engine, certs, "plain")
    assert HEADER_ENTITY not in sets and HEADER_ENTITY not in removed
