"""Issue 16.5: validly signed tokens whose claims would otherwise slip through.

An ``exp`` of NaN, Infinity or 1e400 never compares as past, so such a token never expired; a token
without the route's cohort-unit claim (``sub`` by default) was served in control with a null audit
subject. Both are 401 ``unauthenticated`` now, with a sentence that says why.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
import pytest

from cohortgate.core.decide import Facts, decide
from cohortgate.core.errors import Denial, RequestDenied
from cohortgate.core.policy import load_policy, parse_policy
from cohortgate.deploy import pki
from gateway.auth import TokenVerifier
from gateway.jwks import JwksFile, KeySet

ISSUER = pki.DEFAULT_ISSUER
AUDIENCE = pki.DEFAULT_AUDIENCE
NOW = 1_800_000_000
EXAMPLE = load_policy(Path(__file__).resolve().parents[2] / "policies" / "example.yaml")
APP = "spiffe://cohortgate.local/app-demo"
INFER = "/v2/models/tabular/infer"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("certs"), clients=[])


@pytest.fixture
def verifier(certs: pki.CertPaths) -> TokenVerifier:
    return TokenVerifier(KeySet(JwksFile(certs.jwks)), ISSUER, AUDIENCE, ["ES256"], clock=lambda: float(NOW))


def signed(certs: pki.CertPaths, payload_json: str) -> str:
    """A token whose payload is exactly this JSON text (so ``1e400`` stays a literal), validly signed."""
    key = pki._load_key(certs.jwt_key)
    return jwt.api_jws.PyJWS().encode(
        payload_json.encode(), key, algorithm="ES256", headers={"kid": pki.public_jwk(key)["kid"]}
    )


def payload(exp: str, **extra: Any) -> str:
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": NOW, "residency": "eu", "scope": "predict"}
    base.update(extra)
    return json.dumps(base)[:-1] + f', "exp": {exp}}}'


def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(RequestDenied) as info:
        verifier.verify("Bearer " + token)
    assert (info.value.denial, info.value.status, info.value.code) == (Denial.UNAUTHENTICATED, 401, "unauthenticated")
    return info.value.message


@pytest.mark.parametrize("exp", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400])
def test_a_non_finite_exp_is_refused(certs: pki.CertPaths, verifier: TokenVerifier, exp: str) -> None:
    message = refused(verifier, signed(certs, payload(exp)))
    if exp.startswith("-"):  # minus infinity is in the past: expired, or not finite; refused either way
        assert "exp" in message or "expired" in message
    else:
        assert message == "The bearer token's 'exp' claim is not a finite number of seconds."
    assert verifier.cached == 0


@pytest.mark.parametrize("claim", ["nbf", "iat"])
@pytest.mark.parametrize("value", ["NaN", "-Infinity", "1e400"])
def test_non_finite_nbf_and_iat_are_refused_too(certs: pki.CertPaths, verifier: TokenVerifier, claim, value) -> None:
    token = signed(certs, payload(str(NOW + 600))[:-1] + f', "{claim}": {value}}}')
    assert refused(verifier, token) == f"The bearer token's {claim!r} claim is not a finite number of seconds."


def test_a_large_but_finite_exp_is_still_a_valid_token(certs: pki.CertPaths, verifier: TokenVerifier) -> None:
    """The control: the same signing path with an ordinary far-future exp verifies."""
    assert verifier.verify("Bearer " + signed(certs, payload("1e18")))["sub"] == "alice"
    assert verifier.verify("Bearer " + signed(certs, payload(str(NOW + 600))))["sub"] == "alice"


def facts(claims: dict[str, Any] | None, headers: dict[str, str] | None = None) -> Facts:
    return Facts("POST", INFER, headers or {}, APP, claims, "r-1")


UNIT_MESSAGE = "The bearer token has no usable 'sub' claim, which route 'tabular' assigns cohorts by."


@pytest.mark.parametrize("sub", [None, ""])
def test_a_verified_token_without_the_routes_unit_claim_is_refused(certs, verifier, sub) -> None:
    """End to end: pyjwt accepts the token (it requires no sub), the core refuses it for the route."""
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "iat": NOW, "exp": NOW + 600}
    claims |= {"residency": "eu", "scope": "predict"}
    if sub is not None:
        claims["sub"] = sub
    key = pki._load_key(certs.jwt_key)
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": pki.public_jwk(key)["kid"]})
    verified = verifier.verify("Bearer " + token)
    assert EXAMPLE.by_name["tabular"].unit_key == "sub"
    d = decide(EXAMPLE, facts(dict(verified)))
    assert (d.denial, d.status, d.route, d.message) == (Denial.UNAUTHENTICATED, 401, "tabular", UNIT_MESSAGE)
    assert d.variant is None and d.cluster is None


@pytest.mark.parametrize(
    "sub", [("alice",), ["alice"], MappingProxyType({"id": "alice"}), {"id": "alice"}, True, False, 1.5, None]
)
def test_a_unit_claim_that_is_not_an_identifier_is_refused(sub) -> None:
    """Frozen (tuple, mapping proxy) and plain (list, dict) claims alike; booleans and floats too."""
    d = decide(EXAMPLE, facts({"sub": sub, "residency": "eu", "scope": "predict"}))
    assert (d.denial, d.message) == (Denial.UNAUTHENTICATED, UNIT_MESSAGE)


def test_an_integer_unit_is_its_digits() -> None:
    assert decide(EXAMPLE, facts({"sub": 42, "residency": "eu", "scope": "predict"})).unit == "42"


def test_the_same_token_with_a_sub_is_served(certs, verifier) -> None:
    token = pki.mint_token(certs, "alice", residency="eu", scopes=["predict"], now=NOW)
    d = decide(EXAMPLE, facts(dict(verifier.verify("Bearer " + token))))
    assert d.allowed and d.unit == "alice" and d.assignment == "hash"


OPTIONAL_TOKEN = """
version: 1
jwt: {issuer: i, audience: a, jwks: jwks.json, required: false}
routes:
  - name: r
    match: {model: m}
    residency: {default_region: eu}
    cohorts: {unit: UNIT}
    variants:
      - {name: control, weight: 0, backends: [{url: "http://127.0.0.1:1", region: eu}]}
      - {name: canary, weight: 100, backends: [{url: "http://127.0.0.1:2", region: eu}]}
"""


def test_a_missing_header_unit_or_no_token_at_all_still_gets_control() -> None:
    """A header unit is the client's to send or not; and where the policy serves requests without a
    token, such a request has no unit at all. Neither is a bad token: both get control, as before."""
    by_header = parse_policy(OPTIONAL_TOKEN.replace("UNIT", "{header: x-user}"), "inline.yaml")
    no_header = decide(by_header, Facts("POST", "/v2/models/m/infer", {}, None, None, "r"))
    assert (no_header.allowed, no_header.variant, no_header.assignment) == (True, "control", "no_unit")
    with_header = decide(by_header, Facts("POST", "/v2/models/m/infer", {"x-user": "u"}, None, None, "r"))
    assert (with_header.variant, with_header.assignment) == ("canary", "hash")
    by_claim = parse_policy(OPTIONAL_TOKEN.replace("UNIT", "{claim: sub}"), "inline.yaml")
    anonymous = decide(by_claim, Facts("POST", "/v2/models/m/infer", {}, None, None, "r"))
    assert (anonymous.allowed, anonymous.variant, anonymous.assignment) == (True, "control", "no_unit")
    tokened = decide(by_claim, Facts("POST", "/v2/models/m/infer", {}, None, {"iss": "i"}, "r"))
    assert (tokened.status, tokened.route) == (401, "r")


@pytest.mark.parametrize("residency", [["eu"], {"region": "eu"}, 1, True, ""])
def test_a_signed_non_string_residency_is_no_region_through_the_verifier(certs, verifier, residency) -> None:
    """Issue 16.4 with the gateway's own frozen claims: the same answer as a token without the claim."""
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": NOW, "exp": NOW + 600, "scope": "predict"}
    key = pki._load_key(certs.jwt_key)
    kid = {"kid": pki.public_jwk(key)["kid"]}
    odd = verifier.verify("Bearer " + jwt.encode({**claims, "residency": residency}, key, "ES256", headers=kid))
    none = verifier.verify("Bearer " + jwt.encode(claims, key, "ES256", headers=kid))
    assert isinstance(odd["residency"], type(residency)) is isinstance(residency, str | int)  # frozen: tuple/proxy
    assert EXAMPLE.by_name["tabular"].default_region is None
    d = decide(EXAMPLE, facts(odd))
    assert d == decide(EXAMPLE, facts(none))
    assert d.denial is Denial.RESIDENCY_UNAVAILABLE and "carries no residency" in d.message


# ------------------------------------------------------------------ through the ext_proc engine


def engine_answer(certs: pki.CertPaths, raw_token: str):
    """The gateway's answer to one request carrying ``raw_token``, over both transports."""
    import orjson
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import json_format

    from gateway.extproc import Processor, ProcessorSettings
    from gateway.service import PolicyHolder, build_verifier

    text = (Path(__file__).resolve().parents[2] / "policies" / "example.yaml").read_text()
    policy = parse_policy(text.replace("../certs/jwks.json", str(certs.jwks)), "example.yaml")
    engine = Processor(PolicyHolder(policy), build_verifier(policy.jwt), ProcessorSettings(unit_salt=b"s"))
    req = pb.ProcessingRequest()
    headers = {":method": "POST", ":path": INFER, ":authority": "x", "x-request-id": "req-1"}
    headers["authorization"] = "Bearer " + raw_token
    for key, value in headers.items():
        req.request_headers.headers.headers.add(key=key, raw_value=value.encode())
    attrs = req.attributes["envoy.filters.http.ext_proc"]
    attrs.fields["connection.uri_san_peer_certificate"].string_value = APP
    attrs.fields["connection.mtls"].bool_value = True
    proto = engine.new_processor().handle(req)
    via_json = json_format.Parse(
        engine.handle_json(json_format.MessageToJson(req, preserving_proto_field_name=True).encode()),
        pb.ProcessingResponse(),
    )
    assert proto == via_json
    imm = proto.immediate_response
    headers = {o.header.key: o.header.raw_value.decode() for o in imm.headers.set_headers}
    return imm.status.code, headers, orjson.loads(imm.body) if imm.body else None


def test_the_gateway_answers_401_json_for_a_nan_exp_and_a_missing_sub(certs: pki.CertPaths) -> None:
    status, headers, body = engine_answer(certs, signed(certs, payload("NaN")))
    assert (status, body["error"]["code"]) == (401, "unauthenticated") and "www-authenticate" in headers
    assert body["error"]["message"] == "The bearer token's 'exp' claim is not a finite number of seconds."
    issued = int(time.time()) - 60  # the engine's verifier reads the real clock
    no_sub = json.loads(payload(str(2**40), iat=issued))
    del no_sub["sub"]
    status, headers, body = engine_answer(certs, signed(certs, json.dumps(no_sub)))
    assert (status, body["error"]["code"]) == (401, "unauthenticated") and "www-authenticate" in headers
    assert body["error"]["message"] == UNIT_MESSAGE
    # the control: the same token with a sub is routed (no immediate answer at all)
    assert engine_answer(certs, signed(certs, payload(str(2**40), iat=issued)))[0] == 0
