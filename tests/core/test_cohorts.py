"""Sticky cohorts: the five properties the policy's users rely on."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from cohortgate.core import cohorts
from tests.strategies import ramp, salts, units, weights


@given(w=weights(), salt=salts, unit=units)
def test_deterministic(w, salt, unit):
    key = cohorts.salt_key(salt)
    first = cohorts.assign(w, key, unit)
    assert all(cohorts.assign(w, cohorts.salt_key(salt), unit) == first for _ in range(3))
    assert w[first] > 0


@settings(max_examples=10, deadline=None)
@given(w=weights(), salt=salts)
def test_even_split_within_one_point(w, salt):
    key = cohorts.salt_key(salt)
    bounds, owners = cohorts.layout(w)
    n = 100_000
    counts = np.zeros(len(w))
    for i in range(n):
        counts[cohorts.owner_of(bounds, owners, cohorts.bucket_of(key, f"user-{i}"))] += 1
    shares = counts / n * 100
    assert np.all(np.abs(shares - np.array(w)) <= 1.0), (w, shares)


@given(step=ramp(), salt=salts, unit_list=st.lists(units, min_size=1, max_size=200))
def test_monotone_ramp_moves_units_only_into_the_grown_variant(step, salt, unit_list):
    before, after, grown = step
    key = cohorts.salt_key(salt)
    for unit in unit_list:
        old, new = cohorts.assign(before, key, unit), cohorts.assign(after, key, unit)
        if old != new:
            assert new == grown, (before, after, unit)


@given(step=ramp(), salt=salts, unit_list=st.lists(units, min_size=1, max_size=200))
def test_rollback_returns_units_to_where_they_were(step, salt, unit_list):
    """Ramp up, then roll the grown variant back to 0: its units go to control, nobody else moves."""
    before, after, grown = step
    rolled_back = list(after)
    rolled_back[0] += rolled_back[grown]
    rolled_back[grown] = 0
    key = cohorts.salt_key(salt)
    for unit in unit_list:
        was, ramped, back = (cohorts.assign(w, key, unit) for w in (before, after, rolled_back))
        # the variant's units (from before the ramp and from the ramp) are all back on control
        assert back == (0 if ramped == grown else ramped), (before, after, unit)
        # and every unit outside the variant before the ramp sits where it sat then
        if was != grown:
            assert back == was, (before, after, unit)


def test_independent_routes_with_different_salts():
    """Membership in one route's canary says nothing about another route's (chi-square)."""
    a, b = cohorts.salt_key("route-a"), cohorts.salt_key("route-b")
    w = [50, 50]
    table = np.zeros((2, 2))
    for i in range(20_000):
        unit = f"user-{i}"
        table[cohorts.assign(w, a, unit), cohorts.assign(w, b, unit)] += 1
    _, p, _, _ = stats.chi2_contingency(table)
    assert p > 0.001, table
    # and the salt really enters the hash: nearly every unit lands in another bucket (1 in 10 000 alike)
    differ = sum(cohorts.bucket_of(a, f"user-{i}") != cohorts.bucket_of(b, f"user-{i}") for i in range(1000))
    assert differ >= 990, differ


def test_layout_rejects_bad_weights():
    for bad in ([50, 40], [101, -1], [-5, 105]):
        try:
            cohorts.layout(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_three_way_layout_owners_cover_all_buckets():
    bounds, owners = cohorts.layout([60, 25, 15])
    seen = [cohorts.owner_of(bounds, owners, b) for b in range(cohorts.BUCKETS)]
    assert [seen.count(i) for i in range(3)] == [6000, 2500, 1500]


def test_bucket_is_a_stable_function_of_salt_and_unit():
    """Golden values: a change of hash function would silently reshuffle every live experiment."""
    tabular, other = cohorts.salt_key("tabular-2026-11"), cohorts.salt_key("other-salt")
    assert [cohorts.bucket_of(tabular, u) for u in ("alice", "bob", "carol", "")] == [6004, 7253, 4905, 7755]
    assert [cohorts.bucket_of(other, u) for u in ("alice", "bob", "carol", "")] == [1755, 9483, 1985, 7157]


# ------------------------------------------------------------------ ramps with many challengers (issue 16.9)


def stacked_layout(weights):
    """The layout before issue 16.9 (kept here to reproduce the finding): challengers after the
    second stacked on the first, so growing the first shifted them."""
    sized = [w * cohorts.PER_PERCENT for w in weights]
    challengers = list(range(1, len(weights)))
    top = challengers[1] if len(challengers) >= 2 else None
    ranges = [(sized[i], i) for i in challengers if i != top] + [(sized[0], 0)]
    if top is not None:
        ranges.append((sized[top], top))
    bounds, owners, edge = [], [], 0
    for size, owner in ranges:
        if size:
            edge += size
            bounds.append(edge)
            owners.append(owner)
    return tuple(bounds[:-1]), tuple(owners)


def owners_of_every_bucket(lay) -> list[int]:
    bounds, owners = lay
    return [cohorts.owner_of(bounds, owners, b) for b in range(cohorts.BUCKETS)]


def monotone(before, after, lay=cohorts.layout) -> bool:
    """Brute force over every bucket: units move only control -> grown, or shrunk -> control."""
    for a, b in zip(owners_of_every_bucket(lay(before)), owners_of_every_bucket(lay(after)), strict=True):
        if a != b and not ((a == 0 and after[b] > before[b]) or (b == 0 and after[a] < before[a])):
            return False
    return True


def test_the_findings_ramp_moved_a_user_from_control_to_v3_and_is_now_refused():
    before, after = [21, 16, 1, 62], [2, 35, 1, 62]  # control, v1, v2, v3: raise v1 from 16 to 35
    old = [(a, b) for a, b in zip(*map(owners_of_every_bucket, map(stacked_layout, (before, after))), strict=True)]
    assert (0, 3) in old and (3, 1) in old  # reproduced: control -> v3, v3 -> v1
    assert not monotone(before, after)  # no layout keeps this one (v1 and v3 share a full lane)
    problem = cohorts.ramp_problem(before, after, ["control", "v1", "v2", "v3"])
    assert problem is not None and problem.startswith(
        "raising 'v1' from 16% to 35% would move 19% of all units from 'control' to 'v3', "
        "19% of all units from 'v3' to 'v1': "
    )


def test_one_or_two_challengers_keep_the_layout_they_always_had():
    """Live experiments with one or two challengers must not be reshuffled by the new lanes."""
    for w in ([100], [90, 10], [0, 100], [60, 25, 15], [0, 50, 50], [100, 0, 0], [34, 0, 66]):
        assert cohorts.layout(w) == stacked_layout(w), w
    key = cohorts.salt_key("tabular-2026-11")
    # buckets 6004, 7253, 4905, 7755 (pinned above): golden owners under two two-challenger splits
    assert [cohorts.assign([50, 25, 25], key, u) for u in ("alice", "bob", "carol", "")] == [0, 0, 0, 2]
    assert [cohorts.assign([20, 70, 10], key, u) for u in ("alice", "bob", "carol", "")] == [1, 0, 1, 0]


@st.composite
def many_weights(draw, fitting: bool):
    """Weights for 1 to 7 challengers; ``fitting``: every lane holds its two challengers."""
    m = draw(st.integers(1, 7))
    if not fitting:
        return draw(weights(m + 1))
    lanes, slots = cohorts._slots(m)
    room = [cohorts.BUCKETS // lanes // cohorts.PER_PERCENT] * lanes
    w = [0] * (m + 1)
    for i, (lane, _) in enumerate(slots, start=1):
        w[i] = draw(st.integers(0, room[lane]))
        room[lane] -= w[i]
    w[0] = 100 - sum(w)
    return w


@settings(max_examples=200, deadline=None)
@given(w=many_weights(fitting=False))
def test_every_variant_owns_exactly_its_weight_for_any_number_of_challengers(w):
    bounds, owners = cohorts.layout(w)
    edges = [0, *bounds, cohorts.BUCKETS]
    owned = [0] * len(w)
    for i, owner in enumerate(owners):
        assert edges[i + 1] > edges[i]
        owned[owner] += edges[i + 1] - edges[i]
    assert owned == [x * cohorts.PER_PERCENT for x in w]


@settings(max_examples=100, deadline=None)
@given(data=st.data(), before=many_weights(fitting=True))
def test_within_lanes_any_ramp_or_rollback_moves_units_only_through_control(data, before):
    """Raise or lower any one challenger, for any number of challengers, staying within its lane."""
    m = len(before) - 1
    lanes, slots = cohorts._slots(m)
    index = data.draw(st.integers(1, m))
    lane = slots[index - 1][0]
    lane_room = cohorts.BUCKETS // lanes // cohorts.PER_PERCENT - sum(
        before[i + 1] for i, (p, _) in enumerate(slots) if p == lane
    )
    after = list(before)
    after[index] = data.draw(st.integers(0, before[index] + min(before[0], lane_room)))
    after[0] = before[0] - (after[index] - before[index])
    assert monotone(before, after), (before, after)
    assert cohorts.ramp_problem(before, after) is None
    assert cohorts.moves(before, after) == (
        {(0, index): (after[index] - before[index]) * 100}
        if after[index] > before[index]
        else {(index, 0): (before[index] - after[index]) * 100}
        if after[index] < before[index]
        else {}
    )


@settings(max_examples=100, deadline=None)
@given(data=st.data(), before=many_weights(fitting=False))
def test_ramp_problem_is_exact_for_any_weights(data, before):
    """No false alarms, no misses: the check agrees with every bucket's owner before and after."""
    index = data.draw(st.integers(1, len(before) - 1))
    after = list(before)
    after[index] = data.draw(st.integers(0, before[index] + before[0]))
    after[0] = before[0] - (after[index] - before[index])
    problem = cohorts.ramp_problem(before, after)
    assert (problem is None) is monotone(before, after), (before, after, problem)
    if problem is not None:
        assert "would move" in problem and "% of all units from" in problem
