"""Issue 16.4: one residency rule in the core, whatever the claim holds and however it is held.

The gateway hands the core frozen claims (lists as tuples, objects as ``MappingProxyType``); the core
tests and `policy explain` hand it plain dicts and lists. A list claim ``["eu"]`` used to be served
in the default region by one and refused naming region ``('eu',)`` by the other, and integers and
booleans became regions ``"1"``/``"True"``. The rule now: a region is a non-empty string; anything
else is a missing region and gets the route's missing-region behaviour.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cohortgate.core.decide import Facts, decide
from cohortgate.core.errors import Denial
from cohortgate.core.policy import parse_policy
from tests.strategies import REGIONS, residency_policies

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.just(""),
    st.sampled_from(REGIONS),
    st.text(max_size=6),
)
claim_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6,
)


def frozen(value: Any) -> Any:
    """The gateway's representation (gateway/auth.py freezes verified claims this way)."""
    if isinstance(value, dict):
        return MappingProxyType({k: frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(frozen(v) for v in value)
    return value


def request(claims: dict[str, Any] | MappingProxyType) -> Facts:
    return Facts("POST", "/v2/models/m/infer", {}, None, claims, "req-1")


@settings(max_examples=400, deadline=None)
@given(text=residency_policies(), value=claim_values)
def test_every_claim_value_gets_one_answer_in_both_representations(text, value):
    policy = parse_policy(text)
    route = policy.routes[0]
    plain = decide(policy, request({"sub": "alice", "residency": value}))
    assert decide(policy, request(MappingProxyType({"sub": "alice", "residency": frozen(value)}))) == plain
    assert decide(policy, request({"sub": "alice", "residency": frozen(value)})) == plain
    if isinstance(value, str) and value:
        # a string is the region it names: served there, or refused naming it (never guessed away)
        if plain.allowed:
            assert plain.region == value
        else:
            assert plain.denial is Denial.RESIDENCY_UNAVAILABLE and repr(value) in plain.message
        return
    # anything else is exactly "no residency claim": the default region, or 451 without one
    assert plain == decide(policy, request({"sub": "alice"}))
    if route.default_region is None:
        assert plain.denial is Denial.RESIDENCY_UNAVAILABLE and "carries no residency" in plain.message
    elif plain.allowed:
        assert plain.region == route.default_region


POLICY = """
version: 1
jwt: {issuer: i, audience: a, jwks: jwks.json}
routes:
  - name: r
    match: {model: m}
    residency: {default_region: DEFAULT, allowed_regions: [eu, us]}
    variants:
      - name: control
        weight: 100
        backends: [{url: "http://127.0.0.1:1", region: eu}, {url: "http://127.0.0.1:2", region: us}]
"""


def test_the_findings_cases():
    """The outside review's cases, by name: a list, a tuple, an int, a bool, a mapping, empty."""
    with_default = parse_policy(POLICY.replace("DEFAULT", "us"))
    without = parse_policy(POLICY.replace("default_region: DEFAULT, ", ""))
    for value in (["eu"], ("eu",), 1, True, {"region": "eu"}, MappingProxyType({"region": "eu"}), "", None):
        served = decide(with_default, request({"sub": "u", "residency": value}))
        assert (served.allowed, served.region) == (True, "us"), value
        refused = decide(without, request({"sub": "u", "residency": value}))
        assert refused.denial is Denial.RESIDENCY_UNAVAILABLE and "carries no residency" in refused.message
        assert "('eu',)" not in refused.message and "True" not in refused.message
    assert decide(without, request({"sub": "u", "residency": "eu"})).region == "eu"
    assert decide(with_default, request({"sub": "u", "residency": "in"})).denial is Denial.RESIDENCY_UNAVAILABLE
