"""decide(): denials with their codes, sticky routing, overrides/eligibility, residency as a property."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cohortgate.core import cohorts
from cohortgate.core.decide import Facts, decide
from cohortgate.core.errors import Denial
from cohortgate.core.policy import load_policy, parse_policy
from tests.strategies import REGIONS, residency_policies, units

EXAMPLE = load_policy(Path(__file__).resolve().parents[2] / "policies" / "example.yaml")
APP = "spiffe://cohortgate.local/app-demo"
INFER = "/v2/models/tabular/infer"


def facts(path=INFER, *, method="POST", identity=APP, headers=None, request_id="r-1", **claims):
    base = {"sub": "alice", "residency": "eu", "scope": "predict"}
    base.update(claims)
    return Facts(method, path, headers or {}, identity, {k: v for k, v in base.items() if v is not None}, request_id)


def test_allowed_request_names_cluster_variant_and_region():
    d = decide(EXAMPLE, facts())
    assert d.allowed and d.status == 200
    assert (d.route, d.region, d.assignment) == ("tabular", "eu", "hash")
    assert d.cluster in {b.cluster for v in EXAMPLE.by_name["tabular"].variants for b in v.by_region["eu"]}


@pytest.mark.parametrize(
    ("make", "denial"),
    [
        (lambda: Facts("POST", INFER, {}, APP, None), Denial.UNAUTHENTICATED),
        (lambda: facts("/v2/models/unknown/infer"), Denial.NO_ROUTE),
        (lambda: facts(method="DELETE"), Denial.NO_ROUTE),
        (lambda: facts(identity="spiffe://cohortgate.local/batch-job"), Denial.FORBIDDEN),
        (lambda: facts(identity=None), Denial.FORBIDDEN),
        (lambda: facts(identity="spiffe://evil.example/app-demo"), Denial.FORBIDDEN),
        (lambda: facts(scope="read"), Denial.FORBIDDEN),
        (lambda: facts("/v2/models/ae-scoring/infer", residency="ae"), Denial.FORBIDDEN),  # no tier claim
        (lambda: facts("/v2/models/ae-scoring/infer", residency="eu", tier="gold"), Denial.RESIDENCY_UNAVAILABLE),
        (lambda: facts(residency=None), Denial.RESIDENCY_UNAVAILABLE),
        (lambda: facts(residency="us"), Denial.RESIDENCY_UNAVAILABLE),
    ],
)
def test_denials_carry_stable_codes(make, denial):
    d = decide(EXAMPLE, make())
    assert d.denial is denial and d.status == denial.status
    assert d.message.endswith(".") and d.cluster is None and d.shadows == ()


def test_ae_route_serves_ae_with_the_right_tier():
    d = decide(EXAMPLE, facts("/v2/models/ae-scoring/infer", residency="ae", tier="silver"))
    assert d.allowed and d.cluster == "cg.ae-scoring.control.0" and d.region == "ae"


@given(unit=units)
def test_same_unit_same_variant(unit):
    first = decide(EXAMPLE, facts(sub=unit, request_id="a"))
    again = decide(EXAMPLE, facts(sub=unit, request_id="b"))
    assert (first.variant, first.cluster, first.bucket) == (again.variant, again.cluster, again.bucket)


def test_overrides_win_over_hashing_and_eligibility():
    d = decide(EXAMPLE, facts(sub="qa-canary", headers={"x-device": "bot"}))
    assert (d.variant, d.assignment) == ("canary", "override")
    rolled_back = EXAMPLE.with_weights({"tabular": {"control": 100, "canary": 0}}, disabled={"tabular": ["canary"]})
    d = decide(rolled_back, facts(sub="qa-canary"))
    assert d.variant == "control", "a rolled-back variant is unreachable, overrides included"


def test_ineligible_units_always_get_control():
    all_canary = EXAMPLE.with_weights({"tabular": {"control": 0, "canary": 100}})
    assert decide(all_canary, facts(sub="bob")).variant == "canary"
    d = decide(all_canary, facts(sub="bob", headers={"x-device": "bot"}))
    assert (d.variant, d.assignment, d.bucket) == ("control", "ineligible", None)


def test_missing_unit_claim_is_401_and_missing_unit_header_gets_control():
    """A token without the unit claim is refused (issue 16.5); a request without a unit header is
    served in control, unhashed."""
    all_canary = EXAMPLE.with_weights({"tabular": {"control": 0, "canary": 100}})
    d = decide(all_canary, facts(sub=None))
    assert (d.denial, d.status, d.cluster) == (Denial.UNAUTHENTICATED, 401, None) and "'sub'" in d.message
    by_header = parse_policy(
        """
version: 1
jwt: {issuer: i, audience: a, jwks: jwks.json}
routes:
  - name: h
    match: {model: h}
    cohorts: {unit: {header: x-user-id}}
    residency: {source: {header: x-region}, default_region: eu}
    variants:
      - {name: control, weight: 0, backends: [{url: "http://127.0.0.1:1", region: eu}]}
      - {name: canary, weight: 100, backends: [{url: "http://127.0.0.1:2", region: eu}]}
"""
    )
    assert decide(by_header, facts("/v2/models/h/infer", headers={"x-user-id": "u"})).variant == "canary"
    d = decide(by_header, facts("/v2/models/h/infer"))
    assert (d.variant, d.assignment, d.bucket) == ("control", "no_unit", None)


def test_canary_without_region_backend_falls_back_to_control_in_region():
    all_canary = EXAMPLE.with_weights({"tabular": {"control": 0, "canary": 100}})
    d = decide(all_canary, facts(sub="bob", residency="ae"))
    assert d.allowed and d.variant == "control" and d.fallback and d.cluster == "cg.tabular.control.1"


def test_shadow_sampling_is_deterministic_per_request_and_near_its_percent():
    ids = [f"req-{i}" for i in range(4000)]
    mirrored = [bool(decide(EXAMPLE, facts(request_id=r)).shadows) for r in ids]
    assert mirrored == [bool(decide(EXAMPLE, facts(request_id=r)).shadows) for r in ids]
    assert 0.46 < sum(mirrored) / len(ids) < 0.54  # policy: 50 %


def test_split_of_the_example_over_many_users():
    counts = {"control": 0, "canary": 0}
    for i in range(20_000):
        counts[decide(EXAMPLE, facts(sub=f"user-{i}")).variant] += 1
    assert abs(counts["canary"] / 20_000 - 0.10) < 0.01


def test_trace_explains_every_step_and_hot_path_skips_it():
    d = decide(EXAMPLE, facts(), trace=True)
    assert len(d.trace) >= 5 and any(s.startswith("bucket ") for s in d.trace)
    assert decide(EXAMPLE, facts()).trace == ()


@settings(max_examples=300, deadline=None)
@given(
    text=residency_policies(),
    region=st.one_of(st.none(), st.sampled_from(REGIONS)),
    unit=units,
    request_id=st.text(max_size=12),
)
def test_no_decision_ever_leaves_the_request_region(text, region, unit, request_id):
    policy = parse_policy(text)
    route = policy.routes[0]
    claims = {"sub": unit}
    if region is not None:
        claims["residency"] = region
    d = decide(policy, Facts("POST", "/v2/models/m/infer", {}, None, claims, request_id))
    region_of = {b.cluster: b.region for b in policy.backends}
    effective = region if region is not None else route.default_region
    if effective is None or effective not in route.allowed_regions:
        assert d.denial is Denial.RESIDENCY_UNAVAILABLE
        return
    # The unit's variant (no overrides or eligibility in these policies): refused only when neither it
    # nor, under fallback_control, control has a backend in the region; otherwise it must be served.
    variant = route.variants[cohorts.owner_of(route.bounds, route.owners, cohorts.bucket_of(route.salt_key, unit))]
    own = bool(variant.by_region.get(effective))
    servable = own or (route.fallback_control and bool(route.control.by_region.get(effective)))
    if not servable:
        assert d.denial is Denial.RESIDENCY_UNAVAILABLE
        return
    assert d.allowed, (d.denial, d.message)
    assert d.variant == (variant.name if own else route.control.name) and d.fallback is (not own)
    assert d.region == effective
    assert region_of[d.cluster] == effective
    assert all(region_of[c] == effective for c in d.shadows)


@given(unit=units)
def test_bucket_reported_matches_the_cohort_hash(unit):
    d = decide(EXAMPLE, facts(sub=unit))
    assert d.bucket == cohorts.bucket_of(EXAMPLE.by_name["tabular"].salt_key, unit)
