"""The processor memoises `decide` for a returning caller (issue 25): the answers and audit lines are
exactly those of deciding every request afresh, the memo is off where a decision depends on more than
the read headers, the identity and the claims, and it never outlives a policy or a claims object."""

from __future__ import annotations

import io
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cohortgate.core.contract import HEADER_CLUSTER, HEADER_REGION, HEADER_SHADOWS, HEADER_VARIANT
from cohortgate.core.policy import Policy, parse_policy
from cohortgate.deploy import pki
from gateway.audit import AuditLog
from gateway.extproc import Processor, ProcessorSettings, hash_unit
from gateway.service import PolicyHolder, build_verifier
from tests.gateway.test_extproc import APP, INFER, POLICY, SALT, envoy_json, infer, request, set_headers, token

SHADOWS = """    shadows:
      - name: challenger
        percent: 100
        backends:
          - {{url: "http://127.0.0.1:18104", region: eu}}
"""
ELIGIBILITY = "      eligibility: [{{header: x-device, not_in: [bot]}}]\n"


def _text(certs: pki.CertPaths, *, shadows: bool) -> str:
    text = POLICY if shadows else POLICY.replace(SHADOWS, "")
    assert shadows or text != POLICY
    salt = "      salt: tabular-test\n"
    assert text.count(salt) == 1
    text = text.replace(salt, salt + ELIGIBILITY)  # a header only a route reads: part of the memo's key
    return text.format(jwks=certs.jwks, response_headers="true")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("memo") / "certs", clients=())


@pytest.fixture(scope="module")
def policy(certs: pki.CertPaths) -> Policy:
    return parse_policy(_text(certs, shadows=False), filename="memo.yaml")


@pytest.fixture(scope="module")
def verifier(policy: Policy) -> Any:
    return build_verifier(policy.jwt)


@pytest.fixture(scope="module")
def tokens(certs: pki.CertPaths) -> dict[tuple[str, str | None], str]:
    """A few users' tokens, minted once (hypothesis draws from them)."""
    return {
        (sub, residency): "Bearer " + token(certs, sub, residency=residency)
        for sub in ("user-1", "user-2", "user-3", "qa-canary")
        for residency in ("eu", "ae", None)
    }


def _engine(policy: Policy, verifier: Any, audit: Any = None) -> Processor:
    return Processor(PolicyHolder(policy), verifier, ProcessorSettings(SALT), audit, clock=lambda: 1_700_000_000.25)


def _fresh(policy: Policy, verifier: Any, audit: Any = None) -> Processor:
    """The same processor deciding every request afresh: its memo switched off."""
    engine = _engine(policy, verifier, audit)
    engine._current()
    engine._memo = None
    return engine


def test_a_returning_caller_is_decided_once(policy: Policy, verifier: Any, tokens: dict[Any, str]) -> None:
    engine = _engine(policy, verifier)
    auth = tokens["user-1", "eu"]
    first = engine.handle_proto(request(infer(auth)))
    assert engine._memo is not None and len(engine._decisions) == 1
    for rid in ("req-2", "req-3"):  # another request id, body size, query string: the same decision
        again = engine.handle_proto(request(infer(auth, path=INFER + "?x=1", **{"x-request-id": rid})))
        assert again == first
    assert len(engine._decisions) == 2  # the raw :path is part of the key: a query string is another entry
    assert engine.stats.allowed == 3


def test_headers_a_route_reads_are_part_of_the_key(policy: Policy, verifier: Any, tokens: dict[Any, str]) -> None:
    engine = _engine(policy, verifier)
    auth = tokens["qa-canary", "eu"]  # pinned to the canary by an override, ineligible units aside
    assert set_headers(engine.handle_proto(request(infer(auth))))[HEADER_VARIANT] == "canary"
    as_bot = set_headers(engine.handle_proto(request(infer(auth, **{"x-device": "bot"}))))
    assert as_bot[HEADER_VARIANT] == "canary"  # an override wins over eligibility
    auth = tokens["user-2", "eu"]
    policy = policy.with_weights({"tabular": {"control": 0, "canary": 100}})  # every eligible unit: canary
    engine = _engine(policy, verifier)
    human = engine.handle_proto(request(infer(auth, **{"x-device": "ios"})))
    bot = engine.handle_proto(request(infer(auth, **{"x-device": "bot"})))
    assert set_headers(human)[HEADER_VARIANT] == "canary" and set_headers(bot)[HEADER_VARIANT] == "control"
    assert set_headers(human) == set_headers(
        _fresh(policy, verifier).handle_proto(request(infer(auth, **{"x-device": "ios"})))
    )


def test_the_identity_is_part_of_the_key(policy: Policy, verifier: Any, tokens: dict[Any, str]) -> None:
    engine = _engine(policy, verifier)
    auth = tokens["user-1", "eu"]
    assert HEADER_CLUSTER in set_headers(engine.handle_proto(request(infer(auth))))
    refused = engine.handle_proto(request(infer(auth), uri="spiffe://cohortgate.local/other"))
    assert refused.immediate_response.status.code == 403
    refused = engine.handle_proto(request(infer(auth), uri=None))
    assert refused.immediate_response.status.code == 403


def test_shadows_sampled_per_request_switch_the_memo_off(
    certs: pki.CertPaths, verifier: Any, tokens: dict[Any, str]
) -> None:
    text = _text(certs, shadows=True).replace("percent: 100", "percent: 50")
    engine = _engine(parse_policy(text, filename="shadows.yaml"), verifier)
    auth = tokens["user-1", "eu"]
    mirrored = {
        HEADER_SHADOWS[0] in set_headers(engine.handle_proto(request(infer(auth, **{"x-request-id": f"r-{i}"}))))
        for i in range(40)
    }
    assert engine._memo is None and mirrored == {True, False}


def test_a_policy_change_empties_the_memo(policy: Policy, verifier: Any, tokens: dict[Any, str]) -> None:
    engine = _engine(policy, verifier)
    auth = tokens["user-3", "eu"]
    engine.handle_proto(request(infer(auth)))
    holder = engine.policies
    assert isinstance(holder, PolicyHolder)
    for weights, cluster in (
        ({"control": 0, "canary": 100}, "cg.tabular.canary.0"),
        ({"control": 100, "canary": 0}, "cg.tabular.control.0"),
    ):
        holder.swap(policy.with_weights({"tabular": weights}))
        assert set_headers(engine.handle_proto(request(infer(auth))))[HEADER_CLUSTER] == cluster
        assert len(engine._decisions) == 1


class _Claims:
    """A verifier that hands out a new claims object on each call, whatever the token says."""

    def __init__(self) -> None:
        self.residency = "eu"

    def verify(self, authorization: str | None) -> Mapping[str, Any]:
        return MappingProxyType({"sub": "user-1", "scope": "predict", "residency": self.residency})


def test_a_hit_needs_the_very_claims_object(policy: Policy) -> None:
    """Keyed on the claims' id, checked by identity: another claims object is never another's hit,
    even where the id repeats (the first object died) or the token's text is the same."""
    claims = _Claims()
    engine = Processor(PolicyHolder(policy), claims, ProcessorSettings(SALT))
    assert set_headers(engine.handle_proto(request(infer("Bearer x"))))[HEADER_REGION] == "eu"
    claims.residency = "ae"
    assert set_headers(engine.handle_proto(request(infer("Bearer x"))))[HEADER_REGION] == "ae"


def test_the_memo_is_bounded(
    policy: Policy, verifier: Any, tokens: dict[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.extproc._DECISIONS_LIMIT", 3)
    engine = _engine(policy, verifier)
    for auth in list(tokens.values())[:7]:
        engine.handle_proto(request(infer(auth)))
        assert len(engine._decisions) <= 3


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    canary=st.sampled_from([10, 50, 100]),
    calls=st.lists(
        st.tuples(
            st.sampled_from(["user-1", "user-2", "user-3", "qa-canary", None]),
            st.sampled_from(["eu", "ae", None]),
            st.sampled_from([INFER, INFER + "?v=2", "/v2/models/ae-scoring/infer", "/v1/header/a", "/nope"]),
            st.sampled_from(["POST", "GET", "PUT"]),
            st.sampled_from([None, "bot", "ios"]),
            st.sampled_from([None, "u-1", "u-2"]),
            st.sampled_from([APP, "spiffe://cohortgate.local/other", None]),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_memoised_answers_and_audit_lines_are_those_of_fresh_decisions(
    policy: Policy, verifier: Any, tokens: dict[Any, str], canary: int, calls: list[tuple[Any, ...]]
) -> None:
    policy = policy.with_weights({"tabular": {"control": 100 - canary, "canary": canary}})
    sinks = io.BytesIO(), io.BytesIO()
    audits = [AuditLog(sink, lambda s: hash_unit(SALT, s)) for sink in sinks]
    memoised, fresh = _engine(policy, verifier, audits[0]), _fresh(policy, verifier, audits[1])
    for i, (sub, residency, path, method, device, user, uri) in enumerate(calls):
        extra = {":method": method, "x-request-id": f"req-{i}"}
        if device is not None:
            extra["x-device"] = device
        if user is not None:
            extra["x-user-id"] = user
        msg = request(infer(tokens[sub, residency] if sub else None, path=path, **extra), uri=uri)
        assert memoised.handle_proto(msg) == fresh.handle_proto(msg)
        assert memoised.handle_json(envoy_json(msg)) == fresh.handle_json(envoy_json(msg))
    for audit in audits:
        audit.flush()
        audit.close()
    assert sinks[0].getvalue() == sinks[1].getvalue()
    assert memoised.stats == fresh.stats
