"""Outcomes end to end through real Envoy: exposure header out, outcome in, attributed to the variant that served.

Real parts: Envoy, the gateway process (``$COHORTGATE_EXPOSURE_KEY`` set), the controller API (its aiohttp
app on 127.0.0.1, in a thread: the backend of the policy's ``kind: outcomes`` route), TLS with client
certificates and JWTs from the test PKI. One transport (grpc): the processor's mint is transport-free
and ``tests/gateway/test_exposure_header.py`` covers the JSON transport.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from cohortgate.deploy import pki
from tests.integration.conftest import Client, ControllerThread, Upstream, edge, free_port, mint

SECRET = "integration-exposure-key-0123456789"
ADMIN = "outcomes-e2e-admin-token"

POLICY = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
  leeway_s: 5
routes:
  - name: tabular
    match: {{model: tabular, methods: [POST]}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [predict]
    cohorts:
      unit: {{claim: sub}}
      salt: outcomes-e2e
      overrides: {{qa-canary: canary}}
    residency:
      default_region: eu
    variants:
      - {{name: control, weight: 90, backends: [{{url: "{control}", region: eu}}]}}
      - {{name: canary, weight: 10, backends: [{{url: "{canary}", region: eu}}]}}
    metrics:
      - {{name: conversion, kind: binary, role: primary}}
  - name: outcomes
    kind: outcomes
    match: {{path_prefix: /v1/outcomes, methods: [POST]}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [outcomes]
    residency:
      default_region: eu
    variants:
      - {{name: controller, weight: 100, backends: [{{url: "http://127.0.0.1:{api_port}", region: eu}}]}}
"""


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory, certs: pki.CertPaths, upstreams: dict[str, Upstream]
) -> Iterator[tuple[Client, ControllerThread, pki.CertPaths]]:
    from cohortgate.core.policy import load_policy

    work = tmp_path_factory.mktemp("outcomes-e2e")
    api_port = free_port()
    policy_file = work / "policy.yaml"
    policy_file.write_text(
        POLICY.format(
            jwks=certs.jwks, control=upstreams["control-eu"].url, canary=upstreams["canary-eu"].url, api_port=api_port
        )
    )
    policy = load_policy(policy_file)
    mp = pytest.MonkeyPatch()
    mp.setenv("COHORTGATE_EXPOSURE_KEY", SECRET)  # the gateway child and the controller API both read it
    api = ControllerThread(policy, api_port, ADMIN).start()
    try:
        with edge(policy_file, certs, work) as e:
            yield e.client, api, certs
    finally:
        api.stop()
        mp.undo()


def outcome(client: Client, certs: pki.CertPaths, body: Any, scopes: tuple[str, ...] = ("outcomes",)):
    token = mint(certs, "reporter", scopes=list(scopes))
    return client.request("/v1/outcomes", token=token, body=json.dumps(body).encode())


def test_an_outcome_posted_with_the_exposure_header_is_attributed_to_the_variant_that_served(plane):
    client, api, certs = plane
    served: dict[str, str] = {}  # variant -> its exposure token
    for i in range(60):  # qa-canary is pinned to canary; 90 % of the others get control
        sub = "qa-canary" if i == 0 else f"user-{i}"
        reply = client.request(token=mint(certs, sub))
        assert reply.status == 200, reply.body
        variant = reply.headers["x-cohortgate-variant"]
        assert reply.headers["x-cohortgate-exposure"].startswith(f"1.tabular.{variant}.")
        served.setdefault(variant, reply.headers["x-cohortgate-exposure"])
        if len(served) == 2:
            break
    assert set(served) == {"control", "canary"}

    reply = outcome(client, certs, {"exposure": served["canary"], "metric": "conversion", "value": 1})
    assert reply.status == 202, reply.body
    assert reply.json() == {"status": "accepted"}
    reply = outcome(client, certs, [{"exposure": served["control"], "metric": "conversion", "value": 0}])
    assert reply.status == 202 and reply.json()["statuses"] == ["accepted"]
    assert "x-cohortgate-exposure" not in reply.headers  # an outcome report is not an exposure

    (conv,) = api.get("/outcomes?route=tabular")["results"]
    assert (conv["metric"], conv["challenger"], conv["control"]) == ("conversion", "canary", "control")
    assert conv["units"] == {"challenger": 1, "control": 1}
    assert conv["value"] == {"challenger": 1.0, "control": 0.0}  # canary's unit converted, control's did not


def test_a_forged_token_is_refused_with_json_and_counted(plane):
    client, api, certs = plane
    before = api.get("/outcomes")["counts"].get("forged", 0)
    reply = client.request(token=mint(certs, "user-forger"))
    genuine = reply.headers["x-cohortgate-exposure"]
    other = "canary" if ".control." in genuine else "control"
    altered = genuine.replace(f".{reply.headers['x-cohortgate-variant']}.", f".{other}.", 1)
    reply = outcome(client, certs, {"exposure": altered, "metric": "conversion", "value": 1})
    assert reply.status == 403 and reply.headers["content-type"].startswith("application/json")
    assert reply.json()["error"]["code"] == "forged"
    assert api.get("/outcomes")["counts"]["forged"] == before + 1


def test_the_outcomes_route_is_authenticated_like_any_route(plane):
    client, api, certs = plane
    body = {"exposure": "1.tabular.canary.ab.1.AAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA", "metric": "conversion", "value": 1}
    counts = api.get("/outcomes")["counts"]
    assert client.request("/v1/outcomes", body=json.dumps(body).encode()).status == 401  # no JWT
    assert outcome(client, certs, body, scopes=("predict",)).status == 403  # the route's scope is missing
    # a client cannot take the gateway's mark or the admin path: it is stripped, and Envoy drops Authorization
    forged_mark = client.request(
        "/v2/models/tabular/infer",
        token=mint(certs, "user-1"),
        headers={"x-cohortgate-outcomes": "1"},
        body=b"{}",
    )
    assert forged_mark.status == 200 and forged_mark.json()["upstream"] in ("control-eu", "canary-eu")
    assert api.get("/outcomes")["counts"] == counts  # nothing reached the ledger


def test_the_gateway_mark_is_short_lived(plane):
    """The controller refuses a mark older than a minute: a captured one cannot be replayed later."""
    from cohortgate.controller.outcomes_api import PASS_MAX_AGE_S
    from cohortgate.core.exposure import mac_key
    from cohortgate.core.exposure import mint as mint_token

    _, api, _ = plane
    stale = mint_token(mac_key(SECRET.encode()), "outcomes", "controller", "gateway", time.time() - PASS_MAX_AGE_S - 30)
    req = urllib.request.Request(
        f"http://127.0.0.1:{api.port}/outcomes",
        data=b"[]",
        headers={"x-cohortgate-outcomes": stale, "content-type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401
    assert os.environ.get("COHORTGATE_EXPOSURE_KEY") == SECRET  # the fixture's key is in force
