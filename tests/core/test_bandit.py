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
    text = (ROOT / "policies" / "bandit.yaml").read_text()
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
        ("      reward: conversion\n      segments: [region]\n", "", "47:7", "gateways do not apply it yet"),
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
    text = (ROOT / "policies" / "bandit.yaml").read_text().replace("ranker-bandit-2026-11", salt)
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
