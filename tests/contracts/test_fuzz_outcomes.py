"""Schemathesis against ``POST /v1/outcomes`` through real Envoy (issue 28).

The route as clients meet it: Envoy terminates mTLS (the test PKI's client certificate), the
gateway checks the JWT and the route's ``outcomes`` scope, marks the request and Envoy rewrites it
to the controller's ``/outcomes``. The plane is ``tests/integration/test_outcomes_e2e.py``'s (the
gateway process, Envoy, the controller API in a thread). The document is the controller's own
operation moved to ``/v1/outcomes``, with the JWT as its bearer and the answers the gateway adds
(401 without a valid token, 403 without the scope, 413 from Envoy's body limit).

Every answer must be a success or a JSON error ``{"error": {"code", "message"}}`` whose code is one
of the stable codes below; never a 5xx, never a stack trace, never undocumented. A second run
enumerates real exposure tokens and the route's metric, so schema-valid bodies are accepted (202)
and repeated ones are duplicates (200), not only refused.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import requests
from schemathesis import GenerationMode

from cohortgate.controller.openapi import SCHEMAS, outcome_operations
from cohortgate.deploy import pki
from tests.contracts.fuzzing import fuzz
from tests.integration.conftest import Client, certs, mint, upstreams  # noqa: F401 - fixtures
from tests.integration.test_outcomes_e2e import plane  # noqa: F401 - the Envoy + gateway + controller fixture

pytestmark = pytest.mark.integration

EXAMPLES = 25  # per generation mode (schema-valid, schema-violating), seeded
PATH = "/v1/outcomes"
#: What an answer's ``error.code`` may be on this route: the gateway's refusals, the controller's
#: outcome statuses, and the body checks of both.
STABLE_CODES = frozenset(
    {
        "unauthenticated",
        "forbidden",
        "malformed",
        "bad_record",
        "forged",
        "expired",
        "not_yet_valid",
        "unknown_metric",
        "too_large",
        "payload_too_large",
        "bad_request",
        "unsupported_media_type",
    }
)


def outcomes_document() -> dict[str, Any]:
    """The controller's POST /outcomes as the client sees it through Envoy."""
    post = copy.deepcopy(outcome_operations()["post"])
    post["security"] = [{"jwt": []}]
    post["responses"]["401"]["description"] = "No valid JWT (the gateway)."
    post["responses"]["403"]["description"] += " Or the JWT lacks the route's scope (the gateway)."
    return {
        "openapi": "3.1.0",
        "info": {"title": "cohortgate outcomes through Envoy", "version": "1"},
        "paths": {PATH: {"post": post}},
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {"jwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


@pytest.fixture(scope="module")
def envoy(plane) -> tuple[str, dict[str, Any], dict[str, str], Client, pki.CertPaths]:  # noqa: F811
    client, _api, certs = plane  # noqa: F811
    tls = {"verify": str(certs.ca_cert), "cert": tuple(str(p) for p in certs.clients["app-demo"])}
    headers = {"Authorization": f"Bearer {mint(certs, 'reporter', scopes=['outcomes'])}"}
    return f"https://localhost:{client.port}", tls, headers, client, certs


def stable_json_error(label: str, response: requests.Response) -> str | None:
    """Our check beside schemathesis': a refusal is JSON with a stable code and a sentence."""
    if response.status_code < 400:
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} is not a JSON error: {response.text[:80]!r}"
    if not isinstance(error, dict) or error.get("code") not in STABLE_CODES or not error.get("message"):
        return f"{response.status_code} error without a stable code and a message: {json.dumps(error)[:120]}"
    return None


def assert_clean(report) -> None:
    assert report.sent[f"POST {PATH}"] > 0, "nothing was fuzzed"
    assert not report.failures, "\n".join(report.lines())
    assert not any(code >= 500 for code in report.statuses[f"POST {PATH}"]), report.statuses


def test_outcomes_through_envoy_keep_their_contract(envoy):
    base, tls, headers, _, _ = envoy
    report = fuzz(outcomes_document(), base, examples=EXAMPLES, headers=headers, tls=tls, check=stable_json_error)
    assert_clean(report)
    statuses = report.statuses[f"POST {PATH}"]
    assert 400 in statuses  # the controller's body checks were reached, not only the gateway's


def test_real_exposure_tokens_are_accepted_then_duplicates(envoy):
    base, tls, headers, client, paths = envoy
    tokens = []
    for i in range(6):
        reply = client.request(token=mint(paths, f"fuzz-user-{i}"))
        assert reply.status == 200, reply.body
        tokens.append(reply.headers["x-cohortgate-exposure"])
    doc = outcomes_document()
    outcome = doc["paths"][PATH]["post"]["requestBody"]["content"]["application/json"]["schema"]["anyOf"][0]
    outcome["properties"]["exposure"]["enum"] = tokens
    outcome["properties"]["metric"]["enum"] = ["conversion"]
    report = fuzz(
        doc,
        base,
        examples=EXAMPLES,
        headers=headers,
        tls=tls,
        check=stable_json_error,
        modes=(GenerationMode.POSITIVE,),
    )
    assert_clean(report)
    statuses = report.statuses[f"POST {PATH}"]
    assert 202 in statuses and 200 in statuses, statuses  # accepted, then the same outcome again: duplicate


def test_without_a_token_every_fuzzed_outcome_is_refused(envoy):
    base, tls, _, _, _ = envoy

    def refused(label: str, response: requests.Response) -> str | None:
        if response.status_code != 401:
            return f"answered {response.status_code} without a JWT"
        return stable_json_error(label, response)

    report = fuzz(outcomes_document(), base, examples=10, tls=tls, check=refused, modes=(GenerationMode.POSITIVE,))
    assert not [line for line in report.lines() if "without a JWT" in line], "\n".join(report.lines())


def test_a_request_envoys_codec_refuses_is_a_json_400(envoy):
    """Found by this fuzzing: a header name with an underscore (which the listener rejects) got
    Envoy's text/plain "Bad Request"; it is a JSON error with a stable code now."""
    base, tls, headers, _, _ = envoy
    for path in (PATH, "/v2/models/tabular/infer"):
        response = requests.post(
            base + path,
            data=b"{}",
            timeout=20,
            headers={**headers, "x_under": "1", "content-type": "application/json"},
            **tls,
        )
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == "bad_request"
        assert stable_json_error(f"POST {path}", response) is None
