"""The processor mints x-cohortgate-exposure per allowed request (and the outcomes route's mark) -- no Envoy.

Also the measured request-path cost: ``python -m tests.gateway.test_exposure_header`` times
`Processor.handle_proto` with and without a key (process CPU time, best of several repeats).
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
import pytest

from cohortgate.core.exposure import exposure_id, mac_key, verify
from cohortgate.core.policy import Policy, parse_policy
from cohortgate.deploy import pki
from gateway.extproc import Processor, ProcessorSettings, exposure_key_from_env, hash_unit
from gateway.service import PolicyHolder, build_verifier
from tests.gateway.test_extproc import APP, SALT, infer, request, set_headers, token

EXPOSURE = "x-cohortgate-exposure"
MARK = "x-cohortgate-outcomes"
SECRET = "exposure-test-key-0123456789"
KEY = mac_key(SECRET.encode())
NOW = 1_800_000_000.0
DAY = 86_400.0

POLICY = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
routes:
  - name: tabular
    match: {{model: tabular}}
    cohorts:
      unit: {{claim: sub}}
      overrides: {{qa-canary: canary}}
    residency:
      default_region: eu
    variants:
      - {{name: control, weight: 90, backends: [{{url: "http://127.0.0.1:18101", region: eu}}]}}
      - {{name: canary, weight: 10, backends: [{{url: "http://127.0.0.1:18103", region: eu}}]}}
    metrics:
      - {{name: conversion, kind: binary}}
  - name: outcomes
    kind: outcomes
    match: {{path_prefix: /v1/outcomes, methods: [POST]}}
    residency:
      default_region: eu
    variants:
      - {{name: controller, weight: 100, backends: [{{url: "http://127.0.0.1:9480", region: eu}}]}}
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("exposure") / "certs", clients=())


@pytest.fixture(scope="module")
def policy(certs: pki.CertPaths) -> Policy:
    return parse_policy(POLICY.format(jwks=certs.jwks), filename="exposure-policy.yaml")


def engine(policy: Policy, key: bytes | None) -> Processor:
    settings = ProcessorSettings(unit_salt=SALT, max_body_bytes=1000, exposure_key=key)
    return Processor(PolicyHolder(policy), build_verifier(policy.jwt), settings, clock=lambda: NOW)


def test_an_allowed_request_carries_a_token_naming_the_variant_that_served(policy, certs):
    sub = "qa-canary"  # pinned to canary by the policy's override
    resp = engine(policy, KEY).handle_proto(request(infer(f"Bearer {token(certs, sub)}")))
    headers = set_headers(resp)
    exp = verify(headers[EXPOSURE], [KEY], NOW + 10, DAY)
    assert (exp.route, exp.variant) == ("tabular", "canary") == (headers["x-cohortgate-route"], exp.variant)
    assert exp.unit == hash_unit(SALT, sub) == headers["x-cohortgate-unit"]  # the keyed hash, never the raw id
    assert exp.eid == exposure_id("req-1") and exp.issued_at == int(NOW)
    assert sub not in headers[EXPOSURE]


def test_each_request_gets_its_own_token_and_the_json_transport_carries_it(policy, certs):
    eng = engine(policy, KEY)
    auth = f"Bearer {token(certs, 'user-7')}"
    a = set_headers(eng.handle_proto(request(infer(auth, **{"x-request-id": "r-a"}))))[EXPOSURE]
    b = set_headers(eng.handle_proto(request(infer(auth, **{"x-request-id": "r-b"}))))[EXPOSURE]
    assert a != b and verify(a, [KEY], NOW, DAY).unit == verify(b, [KEY], NOW, DAY).unit
    body = {
        "request_headers": {
            "headers": {
                "headers": [
                    {"key": k, "raw_value": base64.b64encode(v.encode()).decode()} for k, v in infer(auth).items()
                ]
            }
        },
        "attributes": {
            "envoy.filters.http.ext_proc": {"connection.uri_san_peer_certificate": APP, "connection.mtls": True}
        },
    }
    out = orjson.loads(eng.handle_json(orjson.dumps(body)))
    sets = {
        h["header"]["key"]: base64.b64decode(h["header"]["raw_value"]).decode()
        for h in out["request_headers"]["response"]["header_mutation"]["set_headers"]
    }
    assert verify(sets[EXPOSURE], [KEY], NOW, DAY).variant in ("control", "canary")


def test_without_a_key_nothing_is_minted_and_a_client_sent_token_is_stripped(policy, certs, monkeypatch):
    forged = "1.tabular.canary.ab.1.AAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA"
    for key in (None, KEY):
        resp = engine(policy, key).handle_proto(request(infer(f"Bearer {token(certs)}", **{EXPOSURE: forged})))
        headers = set_headers(resp)
        removed = list(resp.request_headers.response.header_mutation.remove_headers)
        if key is None:
            assert EXPOSURE not in headers and removed == [EXPOSURE]
        else:
            assert headers[EXPOSURE] != forged and removed == []  # overwritten by ours
    monkeypatch.delenv("COHORTGATE_EXPOSURE_KEY", raising=False)
    assert exposure_key_from_env() is None and ProcessorSettings(unit_salt=SALT).exposure_key is None
    monkeypatch.setenv("COHORTGATE_EXPOSURE_KEY", f"{SECRET},an-older-key-0123456789")
    assert ProcessorSettings(unit_salt=SALT).exposure_key == KEY  # the first key mints


def test_an_outcomes_route_gets_the_mark_not_an_exposure(policy, certs):
    headers = infer(f"Bearer {token(certs)}", path="/v1/outcomes", **{MARK: "client-made"})
    resp = engine(policy, KEY).handle_proto(request(headers))
    sets = set_headers(resp)
    assert EXPOSURE not in sets
    mark = verify(sets[MARK], [KEY], NOW, 60)
    assert mark.route == "outcomes"  # the controller accepts it as the gateway's pass
    assert list(resp.request_headers.response.header_mutation.remove_headers) == []
    unkeyed = set_headers(engine(policy, None).handle_proto(request(headers)))
    assert unkeyed[MARK] == "unkeyed"  # still routed to the controller, which refuses it without a pass


def test_a_denied_request_carries_no_token(policy):
    resp = engine(policy, KEY).handle_proto(request(infer(None)))
    assert resp.WhichOneof("response") == "immediate_response"
    assert EXPOSURE not in {o.header.key for o in resp.immediate_response.headers.set_headers}


# ------------------------------------------------------------------------------ cost


def measure(policy: Policy, auth: str, n: int = 20_000, repeats: int = 9) -> dict[str, float]:
    """µs per `handle_proto` call, with and without a key: process CPU time, the arms interleaved (a
    loaded shared VM drifts), best of ``repeats`` each."""
    engines = {"off": engine(policy, None), "on": engine(policy, KEY)}
    msgs = [request(infer(auth, **{"x-request-id": f"r-{i}"})) for i in range(256)]
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(repeats):
        for name, eng in engines.items():
            t0 = time.process_time()
            for i in range(n):
                eng.handle_proto(msgs[i & 255])
            best[name] = min(best[name], (time.process_time() - t0) / n * 1e6)
    return best


def test_the_cost_measurement_runs_and_minting_is_what_differs(policy, certs):
    """No wall-clock bar (a shared 2-core VM): the harness runs, and only the key differs between arms."""
    costs = measure(policy, f"Bearer {token(certs)}", n=200, repeats=1)
    assert set(costs) == {"off", "on"} and all(v > 0 for v in costs.values())


if __name__ == "__main__":  # pragma: no cover - the figure in docs/outcomes.md
    import tempfile
    from pathlib import Path

    c = pki.init_certs(Path(tempfile.mkdtemp()) / "certs", clients=())
    p = parse_policy(POLICY.format(jwks=c.jwks), filename="exposure-policy.yaml")
    costs: Any = measure(p, f"Bearer {token(c)}")
    print(
        f"handle_proto: {costs['off']:.2f} us without a key, {costs['on']:.2f} us with one "
        f"(+{costs['on'] - costs['off']:.2f} us)"
    )
