"""Bandit allocation (core/bandit.py), sticky notes (core/sticky.py), the policy block and decide()."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from cohortgate.core import bandit, sticky
from cohortgate.core.decide import Facts, decide
from cohortgate.core.errors import PolicyError
from cohortgate.core.policy import load_policy, parse_policy


def bandit_route_text() -> str:
    """policies/bandit.yaml up to its outcomes route: the ranker route's allocation block ends it, so
    tests can append to that block."""
    return (ROOT / "policies" / "bandit.yaml").read_text().partition("\n\n  # Where clients post")[0] + "\n"


ROOT = Path(__file__).resolve().parents[2]
DEMO = load_policy(ROOT / "policies" / "bandit.yaml")
APP = "spiffe://cohortgate.local/app-demo"
INFER = "/v2/models/ranker/infer"
KEYS = (sticky.sticky_key(b"k" * 32),)
ARMS = ("control", "canary", "challenger")


def facts(unit: str, note: str | None = None, keys=KEYS) -> Facts:
    claims = {"sub": unit, "residency": "eu", "scope": "predict"}
    return Facts("POST", INFER, {}, APP, claims, "r-1", note, keys)


# ----------------------------------------------------------------------------- the policy block


def test_demo_policy_compiles_its_allocation():
    al = DEMO.by_name["ranker"].allocation
    assert al is not None
    assert (al.strategy, al.reward, al.reward_kind, al.update_s, al.min_share) == (
        "thompson",
        "conversion",
        "binary",
        10,
        0.05,
    )


def _with_allocation(block: str, extra: str = "") -> str:
    text = bandit_route_text()
    head, _, _ = text.partition("    allocation:")
    return head + extra + "    allocation:\n" + block


@pytest.mark.parametrize(
    ("block", "extra", "where", "words"),
    [
        ("      reward: clicks\n", "", "46:7", "reward 'clicks' is not one of the route's metrics (conversion)"),
        ("      reward: conversion\n      strategy: softmax\n", "", "47:17", "allocation.strategy: Input should be"),
        ("      reward: conversion\n      min_share: 0.4\n", "", "47:7", "asks for more than all the traffic"),
        ("      reward: conversion\n", "    rollout: {variant: canary, steps: [50]}\n", "46:5", "not both"),
        ("      reward: conversion\n      segments: [region, region]\n", "", "47:7", "named twice"),
        ("      reward: conversion\n      segments: [tier]\n", "", "47:18", "neither `region` nor one of"),
        (
            "      reward: conversion\n      segments: [{name: tier, source: claim, key: tier, values: [Gold]}]\n",
            "",
            "47:18",
            "'Gold' is not a lower-case label",
        ),
        (
            "      reward: conversion\n      segments: [{name: tier, source: claim, values: [gold]}]\n",
            "",
            "47:18",
            "a claim segment needs `key`",
        ),
        (
            "      reward: conversion\n      segments: [{name: a, source: claim, key: a, values: [a1, a2, a3, a4, a5]},"
            " {name: b, source: claim, key: b, values: [b1, b2, b3, b4, b5]},"
            " {name: c, source: claim, key: c, values: [c1]}]\n",
            "",
            "47:7",
            "72 segments (each value and `other`, combined); at most 64",
        ),
    ],
)
def test_bad_allocation_blocks_say_where_and_why(block, extra, where, words):
    with pytest.raises(PolicyError) as err:
        parse_policy(_with_allocation(block, extra), filename="b.yaml", base_dir=ROOT / "policies")
    assert f"b.yaml:{where}: " in str(err.value) and words in str(err.value)


def test_fixed_weights_stay_the_default():
    assert load_policy(ROOT / "policies" / "example.yaml").by_name["tabular"].allocation is None


# ----------------------------------------------------------------------------- strategies


def test_floor_and_weights_keep_every_arm_at_least_min_share():
    w = bandit.to_weights(bandit.floor([1.0, 0.0, 0.0], 0.05), 0.05)
    assert w == [90, 5, 5]
    for shares in ([0.2, 0.3, 0.5], [1 / 3] * 3, [0.0, 0.0, 0.0], [0.999, 0.0005, 0.0005]):
        w = bandit.to_weights(bandit.floor(shares, 0.07), 0.07)
        assert sum(w) == 100 and min(w) >= 7
    with pytest.raises(ValueError):
        bandit.floor([0.5, 0.5, 0.0], 0.4)


def test_thompson_two_arm_probability_matches_scipy_integration():
    """P(B > A) for Beta posteriors, by the strategy's draws vs scipy's quadrature."""
    a, b = bandit.ArmStats(200, 40.0, 40.0), bandit.ArmStats(200, 52.0, 52.0)
    pa, pb = stats.beta(41, 161), stats.beta(53, 149)
    exact, _ = integrate.quad(lambda x: pb.pdf(x) * pa.cdf(x), 0, 1)
    got = bandit.thompson([a, b], "binary", "increase", np.random.default_rng(1), draws=200_000)
    assert got[1] == pytest.approx(exact, abs=0.005)


def test_thompson_for_mean_rewards_and_direction():
    low, high = bandit.ArmStats.of([1.0, 2.0, 1.5] * 50), bandit.ArmStats.of([3.0, 2.5, 3.5] * 50)
    rng = np.random.default_rng(2)
    assert bandit.thompson([low, high], "mean", "increase", rng)[1] > 0.99
    assert bandit.thompson([low, high], "mean", "decrease", rng)[0] > 0.99


def test_ucb_tries_every_arm_first_then_the_best_index():
    s = [bandit.ArmStats(10, 5.0, 5.0), bandit.ArmStats(0), bandit.ArmStats(10, 1.0, 1.0)]
    assert list(bandit.ucb(s, "binary", "increase")) == [0, 1, 0]
    s[1] = bandit.ArmStats(10, 2.0, 2.0)
    assert list(bandit.ucb(s, "binary", "increase")) == [1, 0, 0]


def test_epsilon_greedy_spreads_epsilon_evenly():
    s = [bandit.ArmStats(10, 5.0, 5.0), bandit.ArmStats(10, 7.0, 7.0)]
    assert list(bandit.epsilon_greedy(s, "increase", 0.2)) == pytest.approx([0.1, 0.9])


@pytest.mark.parametrize("strategy", bandit.STRATEGIES)
def test_every_strategy_moves_most_units_to_the_best_arm(strategy):
    rng = np.random.default_rng(3)
    data = {
        "a": bandit.ArmStats(500, 50.0, 50.0),
        "b": bandit.ArmStats(500, 100.0, 100.0),
        "c": bandit.ArmStats(500, 60.0, 60.0),
    }
    w = bandit.allocate(strategy, data, "binary", "increase", 0.05, rng)
    assert sum(w.values()) == 100 and min(w.values()) >= 5
    assert max(w, key=w.__getitem__) == "b" and w["b"] >= 80


def test_segments_allocate_separately_and_thin_ones_borrow_the_pool():
    seg = {
        "eu": {"a": bandit.ArmStats(300, 90.0, 90.0), "b": bandit.ArmStats(300, 30.0, 30.0)},
        "ae": {"a": bandit.ArmStats(300, 30.0, 30.0), "b": bandit.ArmStats(300, 90.0, 90.0)},
        "in": {"a": bandit.ArmStats(3, 0.0, 0.0), "b": bandit.ArmStats(3, 3.0, 3.0)},
    }
    w = bandit.allocate_segments("thompson", seg, "binary", "increase", 0.05, np.random.default_rng(4))
    assert w["eu"]["a"] >= 90 and w["ae"]["b"] >= 90
    assert 30 <= w["in"]["a"] <= 70  # pooled: the arms tie overall, not b's 3 of 3


def test_segments_without_units_start_from_the_pool_and_only_live_arms_are_weighed():
    seg = {"eu": {"a": bandit.ArmStats(300, 90.0, 90.0), "b": bandit.ArmStats(300, 30.0, 30.0)}}
    pooled = {"a": bandit.ArmStats(300, 90.0, 90.0), "b": bandit.ArmStats(600, 30.0, 30.0)}  # "c" rolled back
    w = bandit.allocate_segments(
        "thompson", seg, "binary", "increase", 0.05, np.random.default_rng(4), segments=("eu", "us"), pooled=pooled
    )
    assert set(w) == {"eu", "us"} and all(set(x) == {"a", "b"} for x in w.values())
    assert w["us"]["a"] >= 90  # no units in us yet: the route's tallies, where a leads


def test_ipw_corrects_the_bias_of_adaptive_allocation():
    """Units admitted at a moving propensity: the naive mean of an arm drifts with time, IPW does not.

    The arm's reward rises over time while its share shrinks, so early units (high share, low
    reward) outnumber late ones: the naive mean is biased low; weighting by 1/p restores the mean
    over the whole population of units."""
    rng = np.random.default_rng(5)
    t = np.arange(20_000) / 20_000
    p = 0.9 - 0.8 * t  # the arm's share when each unit arrived
    y = (rng.random(t.size) < 0.1 + 0.4 * t).astype(float)  # the unit's reward on this arm
    admitted = rng.random(t.size) < p
    est = bandit.ipw("a", y[admitted], p[admitted])
    truth = float(y.mean())  # what every unit would have given on this arm
    assert abs(est.naive - truth) > 0.05
    assert abs(est.ipw - truth) < 3 * est.ipw_se + 0.005
    assert est.ci[0] < truth < est.ci[1]


def test_ipw_with_a_fixed_propensity_is_the_plain_mean():
    est = bandit.ipw("a", [1.0, 0.0, 1.0, 1.0], [0.5] * 4)
    assert est.ipw == est.naive == 0.75


# ----------------------------------------------------------------------------- sticky notes


def test_notes_verify_only_for_their_route_salt_and_unit():
    note = sticky.mint(KEYS[0], "ranker", "s1", "alice", "canary")
    assert sticky.verify(note, KEYS, "ranker", "s1", "alice") == "canary"
    assert sticky.verify(note, KEYS, "ranker", "s1", "bob") is None
    assert sticky.verify(note, KEYS, "ranker", "s2", "alice") is None
    assert sticky.verify(note, KEYS, "other", "s1", "alice") is None
    forged = note.replace("canary", "control")
    assert sticky.verify(forged, KEYS, "ranker", "s1", "alice") is None
    assert sticky.verify(note, (sticky.sticky_key(b"x" * 32),), "ranker", "s1", "alice") is None
    rotated = (sticky.sticky_key(b"x" * 32), KEYS[0])
    assert sticky.verify(note, rotated, "ranker", "s1", "alice") == "canary"
    for junk in ("", "1.canary", "2.canary." + "A" * 22, "1.Canary." + "A" * 22, "x" * 500):
        assert sticky.verify(junk, KEYS, "ranker", "s1", "alice") is None


def _policy(weights: list[int], disabled: tuple[str, ...] = (), salt: str | None = None):
    policy = DEMO.with_weights({"ranker": dict(zip(ARMS, weights, strict=True))}, {"ranker": disabled})
    if salt is None:
        return policy
    text = bandit_route_text().replace("ranker-bandit-2026-11", salt)
    fresh = parse_policy(text, filename="b.yaml", base_dir=ROOT / "policies")
    return fresh.with_weights({"ranker": dict(zip(ARMS, weights, strict=True))})


@st.composite
def allocations(draw) -> list[int]:
    """Weights a bandit with a 5 % floor may publish."""
    a = draw(st.integers(5, 90))
    b = draw(st.integers(5, 95 - a))
    return [a, b, 100 - a - b]


@settings(max_examples=60, deadline=None)
@given(
    units=st.lists(st.text("abcdefghij0123456789", min_size=1, max_size=8), min_size=1, max_size=30, unique=True),
    moves=st.lists(allocations(), min_size=1, max_size=6),
)
def test_no_exposed_unit_changes_arm_while_its_note_is_intact(units, moves):
    notes, arms = {}, {}
    first = _policy(moves[0])
    for unit in units:
        d = decide(first, facts(unit))
        assert d.assignment == "hash" and d.sticky
        notes[unit], arms[unit] = d.sticky, d.variant
    for weights in moves[1:]:
        policy = _policy(weights)
        for unit in units:
            d = decide(policy, facts(unit, notes[unit]))
            assert d.variant == arms[unit] and d.assignment == "sticky"
            assert d.sticky == notes[unit]  # deterministic: the same note comes back


@settings(max_examples=30, deadline=None)
@given(units=st.lists(st.text("abcdef0123", min_size=1, max_size=6), min_size=5, max_size=30, unique=True))
def test_a_new_salt_starts_a_new_experiment(units):
    old = _policy([34, 33, 33])
    new = _policy([34, 33, 33], salt="ranker-bandit-2027-01")
    for unit in units:
        note = decide(old, facts(unit)).sticky
        d = decide(new, facts(unit, note))
        assert d.assignment == "hash"  # the old note does not count under the new salt
        assert d.sticky == sticky.mint(KEYS[0], "ranker", "ranker-bandit-2027-01", unit, d.variant)


def test_a_rolled_back_arm_lets_go_of_its_units():
    units = [f"u{i}" for i in range(300)]
    start = _policy([34, 33, 33])
    held = {u: decide(start, facts(u)) for u in units}
    on_canary = [u for u, d in held.items() if d.variant == "canary"]
    assert on_canary
    after = _policy([67, 0, 33], disabled=("canary",))
    for u in units:
        d = decide(after, facts(u, held[u].sticky))
        if u in on_canary:
            assert d.variant != "canary" and d.assignment == "hash"
        else:
            assert d.variant == held[u].variant


def test_another_units_note_or_no_keys_pins_nothing():
    policy = _policy([34, 33, 33])
    theirs = decide(policy, facts("alice")).sticky
    d = decide(policy, facts("bob", theirs))
    assert d.assignment == "hash"
    unkeyed = decide(policy, facts("alice", theirs, keys=()))
    assert unkeyed.assignment == "hash" and unkeyed.sticky == ""


def test_routes_without_allocation_never_pin():
    example = load_policy(ROOT / "policies" / "example.yaml")
    claims = {"sub": "alice", "residency": "eu", "scope": "predict"}
    d = decide(example, Facts("POST", "/v2/models/tabular/infer", {}, APP, claims, "r", None, KEYS))
    assert d.sticky == "" and d.assignment == "hash"


# ----------------------------------------------------------------------------- per-segment allocation


def _segmented_text() -> str:
    """The demo route served in eu and us, its bandit per region and per the token's `tier` claim."""
    lines = []
    for line in bandit_route_text().splitlines():
        lines.append(line)
        if "region: eu, model:" in line:
            port = line.split("127.0.0.1:")[1][:5]
            lines.append(f'          - {{url: "http://127.0.0.1:2{port[1:]}", region: us}}')
    lines.append("      segments: [region, {name: tier, source: claim, key: tier, values: [free, pro]}]")
    return "\n".join(lines) + "\n"


SEGMENTED = parse_policy(_segmented_text(), filename="segmented.yaml", base_dir=ROOT / "policies")
EU_CONTROL_US_CHALLENGER = {
    "eu_free": {"control": 100, "canary": 0, "challenger": 0},
    "eu_pro": {"control": 100, "canary": 0, "challenger": 0},
    "us_free": {"control": 0, "canary": 0, "challenger": 100},
}


def seg_facts(unit: str, region: str, tier: object, note: str | None = None) -> Facts:
    claims = {"sub": unit, "residency": region, "scope": "predict", "tier": tier}
    return Facts("POST", INFER, {}, APP, claims, "r-1", note, KEYS)


def _segmented(segment_weights, weights=(34, 33, 33), disabled=()):
    w = dict(zip(ARMS, weights, strict=True))
    return SEGMENTED.with_weights({"ranker": w}, {"ranker": disabled}, {"ranker": segment_weights})


def test_segments_compile_to_bounded_labels():
    al = SEGMENTED.by_name["ranker"].allocation
    assert al is not None and al.segments == ("region", "tier")
    assert al.segment_names() == (
        "eu_free", "eu_pro", "eu_other", "us_free", "us_pro", "us_other", "other_free", "other_pro", "other_other"
    )  # fmt: skip
    assert al.segment_of("us", {}, {"tier": "pro"}) == "us_pro"
    # undeclared or non-string values are `other`: a client cannot mint segments of its own
    assert al.segment_of("eu", {}, {"tier": "platinum"}) == "eu_other"
    assert al.segment_of("eu", {}, {"tier": ["pro"]}) == "eu_other"
    assert al.segment_of("eu", {}, None) == "eu_other"


def test_a_quality_segment_can_be_named():
    text = _segmented_text().replace(
        "segments: [region, {name: tier, source: claim, key: tier, values: [free, pro]}]", "segments: [plan]"
    )
    text = text.replace(
        "    allocation:\n",
        "    quality:\n      segments: [{name: plan, source: header, key: X-Plan, values: [basic]}]\n    allocation:\n",
    )
    al = parse_policy(text, base_dir=ROOT / "policies").by_name["ranker"].allocation
    assert al is not None and al.segment_names() == ("basic", "other")
    assert al.segment_of("eu", {"x-plan": "basic"}, None) == "basic"


def test_each_segment_assigns_new_units_by_its_own_weights():
    policy = _segmented(EU_CONTROL_US_CHALLENGER)
    eu = [decide(policy, seg_facts(f"u{i}", "eu", "pro")) for i in range(200)]
    us = [decide(policy, seg_facts(f"u{i}", "us", "free")) for i in range(200)]
    assert {d.variant for d in eu} == {"control"} and {d.segment for d in eu} == {"eu_pro"}
    assert {d.variant for d in us} == {"challenger"} and {d.segment for d in us} == {"us_free"}
    # a segment without published weights (us_pro) takes the route's: all three arms
    rest = {decide(policy, seg_facts(f"u{i}", "us", "pro")).variant for i in range(200)}
    assert rest == set(ARMS)
    explained = decide(policy, seg_facts("u1", "eu", "pro"), trace=True).trace
    assert any("allocation segment 'eu_pro'" in step for step in explained)


def test_a_rolled_back_arm_gives_its_segment_share_to_control():
    policy = _segmented({"us_free": {"control": 0, "canary": 100, "challenger": 0}}, (50, 0, 50), ("canary",))
    got = {decide(policy, seg_facts(f"u{i}", "us", "free")).variant for i in range(200)}
    assert got == {"control"}


@settings(max_examples=40, deadline=None)
@given(
    units=st.lists(st.text("abcdefghij0123456789", min_size=1, max_size=8), min_size=1, max_size=20, unique=True),
    moves=st.lists(st.tuples(allocations(), allocations(), allocations()), min_size=1, max_size=5),
    where=st.sampled_from([("eu", "pro"), ("us", "free"), ("eu", None)]),
)
def test_no_exposed_unit_changes_arm_whatever_its_segment_publishes(units, moves, where):
    def publish(move):
        segs = dict(zip(("eu_pro", "us_free", "eu_other"), move, strict=True))
        return _segmented({s: dict(zip(ARMS, w, strict=True)) for s, w in segs.items()})

    notes, arms = {}, {}
    for unit in units:
        d = decide(publish(moves[0]), seg_facts(unit, *where))
        notes[unit], arms[unit] = d.sticky, d.variant
    for move in moves[1:]:
        policy = publish(move)
        for unit in units:
            d = decide(policy, seg_facts(unit, *where, note=notes[unit]))
            assert d.variant == arms[unit] and d.assignment == "sticky"


def test_segment_weights_survive_the_state_and_old_states_still_load():
    from types import MappingProxyType

    from cohortgate.core.rollout import RouteState
    from cohortgate.store.state import effective_policy

    st_ = RouteState(
        "ranker",
        MappingProxyType({"control": 34, "canary": 33, "challenger": 33}),
        MappingProxyType({}),
        segment_weights=MappingProxyType(
            {
                "us_free": MappingProxyType({"control": 0, "canary": 0, "challenger": 100}),
                "mars_free": MappingProxyType({"control": 100}),  # not a segment of the policy: ignored
                "eu_pro": MappingProxyType({"control": 90}),  # does not sum to 100: ignored
            }
        ),
    )
    doc = st_.to_json()
    back = RouteState.from_json(doc)
    assert back == st_
    old = {k: v for k, v in doc.items() if k != "segment_weights"}  # a state file written before segments
    assert RouteState.from_json(old).segment_weights == {}
    assert "segment_weights" not in RouteState.from_json(old).to_json()
    route = effective_policy(SEGMENTED, {"ranker": back}).by_name["ranker"]
    assert set(route.segment_layouts) == {"us_free"}


def test_the_exposure_token_carries_the_segment_signed():
    from cohortgate.core import exposure

    key = exposure.parse_keys("s" * 32)
    token = exposure.mint(key[0], "ranker", "canary", "abc", 1000.0, "AAAAAAAA", segment="eu_pro")
    assert token.startswith("2.") and exposure.verify(token, key, 1000.0, 60).segment == "eu_pro"
    plain = exposure.mint(key[0], "ranker", "canary", "abc", 1000.0, "AAAAAAAA")
    assert plain.startswith("1.") and exposure.verify(plain, key, 1000.0, 60).segment == ""
    moved = token.replace(".eu_pro.", ".us_pro.")
    with pytest.raises(exposure.ExposureRefused) as err:
        exposure.verify(moved, key, 1000.0, 60)
    assert err.value.code == "forged"
