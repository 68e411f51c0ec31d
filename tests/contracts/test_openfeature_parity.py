"""The OpenFeature provider names the variant the gateway routes to, for 10 000 users.

The gateway's side is the real ext_proc ``Processor`` (JWT verified, SPIFFE identity, headers read as
Envoy sends them) following the same state store with ``follow``, as the gateway's composition root
does. The provider is asked through the OpenFeature API (``api.get_client()``), the way an
application would. The controller's effective weights (control 75, canary 25, beta rolled back)
differ from the file's (80/10/10), so parity includes them; residency varies so that the in-region
fallback and the missing-region denial are compared too.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

from cohortgate.core.policy import Policy, parse_policy
from cohortgate.core.rollout import Phase, RouteState, VariantState
from cohortgate.deploy import pki
from cohortgate.flags import CohortgateProvider
from cohortgate.store.state import InProcessState, RedisState, follow
from gateway.extproc import Processor, ProcessorSettings
from gateway.service import PolicyHolder, build_verifier
from tests.controller.conftest import RedisServer
from tests.gateway.test_extproc import denial, request, set_headers

USERS = 10_000
APP = "spiffe://cohortgate.local/app-shop"
POLICY = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
response_headers: true
routes:
  - name: fraud
    match: {{model: fraud, methods: [POST]}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [predict]
    cohorts:
      unit: {{claim: sub}}
      salt: fraud-parity
      overrides: {{qa-canary: canary, qa-beta: beta}}
      eligibility:
        - {{claim: tier, not_in: [internal]}}
    residency:
      source: {{claim: residency}}
      on_missing_region: fallback_control  # canary has no ae backend: its ae users get control
    variants:
      - name: control
        weight: 80
        backends:
          - {{url: "http://127.0.0.1:18201", region: eu}}
          - {{url: "http://127.0.0.1:18202", region: ae}}
      - name: canary
        weight: 10
        backends:
          - {{url: "http://127.0.0.1:18203", region: eu}}
      - name: beta
        weight: 10
        backends:
          - {{url: "http://127.0.0.1:18204", region: eu}}
          - {{url: "http://127.0.0.1:18205", region: ae}}
  - name: search
    match: {{path_prefix: /v1/search}}
    cohorts:
      unit: {{header: x-user-id}}
    residency:
      source: {{header: x-region}}
      default_region: eu
    variants:
      - name: control
        weight: 50
        backends: [{{url: "http://127.0.0.1:18206", region: eu}}]
      - name: treatment
        weight: 50
        backends: [{{url: "http://127.0.0.1:18207", region: eu}}]
"""

EFFECTIVE = RouteState(
    "fraud",
    {"control": 75, "canary": 25, "beta": 0},
    {
        "canary": VariantState(Phase.PROMOTING, 1, 1.0, "step"),
        "beta": VariantState(Phase.ROLLED_BACK, -1, 1.0, "breach"),
    },
    version=3,
    updated_by="controller",
)
SEARCH = RouteState(
    "search", {"control": 70, "treatment": 30}, {"treatment": VariantState(Phase.RUNNING, 0, 1.0, "")}, 2
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("parity") / "certs", clients=())


@pytest.fixture(scope="module")
def policy(certs: pki.CertPaths) -> Policy:
    return parse_policy(POLICY.format(jwks=certs.jwks), filename="parity.yaml")


def store_with_states(path: Path | None = None) -> InProcessState:
    store = InProcessState(path)

    async def put() -> None:
        await store.put(EFFECTIVE)
        await store.put(SEARCH)

    asyncio.run(put())
    return store


def gateway_engine(policy: Policy, store: InProcessState) -> Processor:
    holder = PolicyHolder(policy)
    follow(holder, store)  # as gateway.service does
    return Processor(holder, build_verifier(policy.jwt), ProcessorSettings(unit_salt=b"parity-salt"))


def user(i: int) -> tuple[str, dict[str, str]]:
    """Unit and claims of user i: 85 % eu, 10 % ae (canary has no ae backend), 3 % no residency,
    2 % internal tier (ineligible); a few pinned by overrides."""
    unit = ("qa-canary", "qa-beta")[i] if i < 2 else f"user-{i}"
    claims: dict[str, str] = {}
    r = i % 100
    if r < 85:
        claims["residency"] = "eu"
    elif r < 95:
        claims["residency"] = "ae"
    elif r < 97:
        claims["tier"] = "internal"
        claims["residency"] = "eu"
    return unit, claims


def gateway_answer(engine: Processor, path: str, headers: dict[str, str]) -> str:
    resp = engine.handle_proto(request({":method": "POST", ":path": path, **headers}, uri=APP))
    if resp.WhichOneof("response") == "immediate_response":
        return f"denied {denial(resp)[0]}"
    return set_headers(resp)["x-cohortgate-variant"]


def provider_answer(client, route: str, unit: str, attributes: dict[str, str]) -> str:
    return outcome(client.get_string_details(route, "DEFAULT", EvaluationContext(unit, attributes)))


def outcome(details) -> str:
    """The variant, or ``denied STATUS`` as ``gateway_answer`` says it."""
    if details.error_code is not None:
        assert details.error_code == ErrorCode.INVALID_CONTEXT, details.error_message
        return "denied " + details.error_message.split("(")[1].split(")")[0]
    return details.value


@pytest.fixture(params=["store", "state_file"])
def pair(request, policy: Policy, tmp_path: Path):
    """(gateway engine, OpenFeature client) following the same states: a running store, or the file."""
    if request.param == "store":
        store = store_with_states()
        provider = CohortgateProvider(policy, store=store, identity=APP)
    else:
        path = tmp_path / "state.json"
        store = store_with_states(path)
        provider = CohortgateProvider(policy, state_file=path, identity=APP)
        store = InProcessState(path)  # the gateway reads the same file
    api.set_provider(provider, domain=f"parity-{request.param}")
    yield gateway_engine(policy, store), api.get_client(f"parity-{request.param}"), provider, request.param
    api.clear_providers()


@pytest.fixture(scope="module")
def tokens(certs: pki.CertPaths) -> list[str]:
    """One ES256 token per user, as ``pki.mint_token`` makes them, with the key loaded once."""
    key = serialization.load_pem_private_key(Path(certs.jwt_key).read_bytes(), password=None)
    kid = pki.public_jwk(key)["kid"]
    now = int(time.time())
    base = {"iss": pki.DEFAULT_ISSUER, "aud": pki.DEFAULT_AUDIENCE, "iat": now, "nbf": now, "exp": now + 3600}
    out = []
    for i in range(USERS):
        unit, claims = user(i)
        payload = {**base, "sub": unit, "scope": "predict", **claims}
        out.append(jwt.encode(payload, key, algorithm="ES256", headers={"kid": kid}))
    return out


def test_the_provider_names_the_gateways_variant_for_10000_users(pair, tokens: list[str]):
    engine, client, _, _ = pair
    users = USERS if pair[3] == "store" else USERS // 5  # the file's reader is the same after it loads
    outcomes: Counter[str] = Counter()
    mismatches = []
    for i in range(users):
        unit, claims = user(i)
        gw = gateway_answer(engine, "/v2/models/fraud/infer", {"authorization": f"Bearer {tokens[i]}"})
        of = provider_answer(client, "fraud", unit, {"scope": "predict", **claims})
        outcomes[gw] += 1
        if gw != of:
            mismatches.append((unit, claims, gw, of))
        region = {"x-region": claims["residency"]} if "residency" in claims else {}
        # the policy requires a token everywhere (jwt.required): the provider presumes one
        headers = {"x-user-id": unit, "authorization": f"Bearer {tokens[i]}", **region}
        gw = gateway_answer(engine, "/v1/search", headers)
        of = provider_answer(client, "search", unit, region)
        outcomes["search " + gw] += 1
        if gw != of:
            mismatches.append((unit, region, gw, of))
    assert not mismatches, mismatches[:10]
    # the effective weights, not the file's: beta rolled back (even its override), canary at 25 %
    assert outcomes["beta"] == 0
    eu_hashed = sum(1 for i in range(2, users) if i % 100 < 85)
    assert 0.22 < outcomes["canary"] / eu_hashed < 0.28
    assert outcomes["denied 451"] == users * 3 // 100  # no residency, and the route has no default region
    served = outcomes["search treatment"] + outcomes["search control"]  # ae is denied there: eu only
    assert 0.26 < outcomes["search treatment"] / served < 0.34


def test_a_rolled_back_variant_is_off_even_for_its_override(pair):
    _, client, _, _ = pair
    ctx = EvaluationContext("qa-beta", {"scope": "predict", "residency": "eu"})
    assert client.get_string_value("fraud", "x", ctx) != "beta"  # rolled back: the override is off
    assert client.get_boolean_value("fraud/beta", True, ctx) is False
    canary = client.get_string_details("fraud", "x", EvaluationContext("qa-canary", ctx.attributes))
    assert canary.value == "canary" and canary.reason == Reason.TARGETING_MATCH
    assert canary.flag_metadata["assignment"] == "override"


def test_resolution_details(pair):
    _, client, _, _ = pair
    eu = {"scope": "predict", "residency": "eu"}
    hashed = client.get_string_details("fraud", "x", EvaluationContext("user-7", eu))
    assert hashed.reason == Reason.SPLIT and hashed.variant == hashed.value
    assert 0 <= hashed.flag_metadata["bucket"] < 10_000 and hashed.flag_metadata["route"] == "fraud"
    ineligible = client.get_string_details("fraud", "x", EvaluationContext("user-7", {**eu, "tier": "internal"}))
    assert ineligible.value == "control" and ineligible.reason == Reason.TARGETING_MATCH
    fallback = client.get_string_details("fraud", "x", EvaluationContext("qa-canary", {**eu, "residency": "ae"}))
    assert fallback.value == "control" and fallback.flag_metadata["fallback"] is True
    missing = client.get_string_details("fraud", "dflt", EvaluationContext(None, eu))
    assert missing.value == "dflt" and missing.error_code == ErrorCode.TARGETING_KEY_MISSING
    unknown = client.get_string_details("nope", "dflt", EvaluationContext("u", eu))
    assert unknown.value == "dflt" and unknown.error_code == ErrorCode.FLAG_NOT_FOUND
    no_variant = client.get_boolean_details("fraud/nope", False, EvaluationContext("u", eu))
    assert no_variant.error_code == ErrorCode.FLAG_NOT_FOUND
    assert client.get_integer_details("fraud", 3, EvaluationContext("u", eu)).error_code == ErrorCode.TYPE_MISMATCH


def test_a_provider_without_the_apps_identity_is_refused_like_the_gateway(policy: Policy):
    provider = CohortgateProvider(policy)  # no SPIFFE identity: route fraud restricts it
    details = provider.resolve_string_details("fraud", "d", EvaluationContext("u", {"scope": "predict"}))
    assert details.value == "d" and details.error_code == ErrorCode.INVALID_CONTEXT
    assert "forbidden (403)" in details.error_message


@pytest.mark.parametrize("mode", ["store", "state_file"])
def test_the_provider_follows_the_controllers_next_write(policy: Policy, tmp_path: Path, mode: str):
    """A rollback the controller writes reaches the provider as it reaches gateways: at once from a
    running store (its watch callback), on the next read after the file's mtime changes."""
    path = tmp_path / "state.json"
    store = store_with_states(path)
    if mode == "store":
        provider = CohortgateProvider(policy, store=store, identity=APP)
    else:
        provider = CohortgateProvider(policy, state_file=path, poll_s=0.0, identity=APP)
    eu = {"scope": "predict", "residency": "eu"}
    in_canary = [
        u
        for u in (f"user-{i}" for i in range(200))
        if provider.resolve_string_details("fraud", "", EvaluationContext(u, eu)).value == "canary"
    ]
    assert in_canary
    rolled_back = RouteState(
        "fraud",
        {"control": 100, "canary": 0, "beta": 0},
        {
            "canary": VariantState(Phase.ROLLED_BACK, -1, 2.0, "breach"),
            "beta": VariantState(Phase.ROLLED_BACK, -1, 1.0, "breach"),
        },
        version=4,
        updated_by="controller",
    )
    writer = store if mode == "store" else InProcessState(path)
    asyncio.run(writer.put(rolled_back))
    for unit in in_canary:
        assert provider.resolve_string_details("fraud", "", EvaluationContext(unit, eu)).value == "control"


@pytest.mark.integration
async def test_over_redis_the_provider_and_a_gateway_follow_the_same_writes(
    policy: Policy, tmp_path: Path, tokens: list[str]
):
    """The controller writes to a real redis-server; a gateway's engine and the provider each follow
    it with their own ``RedisState`` (pub/sub), and agree before and after a rollback."""
    server = RedisServer(tmp_path / "redis").start()
    stores: list[RedisState] = []
    try:
        writer = RedisState(server.url)
        writer.connect()
        stores.append(writer)
        await writer.put(EFFECTIVE)
        for_gateway, for_provider = RedisState(server.url), RedisState(server.url)
        stores += [for_gateway, for_provider]
        await for_gateway.start()
        await for_provider.start()
        engine = gateway_engine(policy, for_gateway)
        provider = CohortgateProvider(policy, store=for_provider, identity=APP)

        def compare(n: int) -> Counter[str]:
            seen: Counter[str] = Counter()
            for i in range(n):
                unit, claims = user(i)
                gw = gateway_answer(engine, "/v2/models/fraud/infer", {"authorization": f"Bearer {tokens[i]}"})
                ctx = EvaluationContext(unit, {"scope": "predict", **claims})
                of = outcome(provider.resolve_string_details("fraud", "", ctx))
                assert gw == of, (unit, claims, gw, of)
                seen[gw] += 1
            return seen

        assert compare(1000)["canary"] > 0
        rolled_back = RouteState(
            "fraud",
            {"control": 100, "canary": 0, "beta": 0},
            {"canary": VariantState(Phase.ROLLED_BACK, -1, 2.0, "breach"), "beta": EFFECTIVE.variants["beta"]},
            version=4,
            updated_by="controller",
        )
        await writer.put(rolled_back, expected_version=3)
        for _ in range(200):  # pub/sub: both readers re-read the route within a few ms (10 s at most here)
            if for_gateway.snapshot()["fraud"].version == 4 and for_provider.snapshot()["fraud"].version == 4:
                break
            await asyncio.sleep(0.05)
        assert compare(1000)["canary"] == 0
    finally:
        for store in stores:
            await store.close()
        server.stop()
