"""Sticky cohorts: a unit's bucket is a keyed hash of (salt, unit), never a random draw.

Buckets run over ``0..BUCKETS-1``; a variant of weight ``w`` percent owns ``w * 100`` of them.
Which buckets it owns (the layout) is a pure function of the weights, the same on every gateway,
chosen so that ramps move as few users as possible:

* The range is cut into ``ceil(challengers / 2)`` equal lanes. Each lane hosts two challengers: one
  grows up from the lane's start, one grows down from its end, and control owns what lies between.
  Challenger 1 holds the bottom of the first lane and challenger 2 the top of the last, so with one
  or two challengers this is the one-lane layout cohortgate always used (buckets did not move).
* While each lane holds its two challengers (with two challengers: always; with three or four,
  each pair at most 50 %; with five or six, 33 %), raising one challenger moves units only from
  control into it, and lowering it (a rollback) returns exactly those units to control. Nobody
  else moves, for any number of challengers.
* A lane that overflows gives its challengers what fits, and the rest spills into the lowest buckets
  control still holds elsewhere. Then a ramp can move units between other variants. No stateless
  layout avoids that for every weight vector with three or more challengers: moves along each
  challenger alone would force each challenger's buckets to depend on its own weight only, and
  then challengers 2 and 3 both at 1 % would both need the one bucket challenger 1 reaches last.
  ``ramp_problem`` measures, exactly, who a weight change moves, so the rollout refuses such a
  step and says which units would move instead of reshuffling an experiment silently.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Sequence

BUCKETS = 10_000
PER_PERCENT = BUCKETS // 100


def salt_key(salt: str) -> bytes:
    """A fixed-size blake2b key derived from the salt (computed once per route, not per request)."""
    return hashlib.blake2b(salt.encode(), digest_size=32).digest()


def bucket_of(key: bytes, unit: str) -> int:
    """The unit's bucket in ``0..BUCKETS-1`` (64-bit keyed hash, so the modulo bias is ~1e-15)."""
    digest = hashlib.blake2b(unit.encode(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big") % BUCKETS


_LOW, _HIGH = 0, 1


def _slots(challengers: int) -> tuple[int, list[tuple[int, int]]]:
    """(number of lanes, (lane, side) of each challenger in order)."""
    lanes = max(1, (challengers + 1) // 2)
    order = [(0, _LOW), (lanes - 1, _HIGH), (0, _HIGH), (lanes - 1, _LOW)]
    order += [(p, side) for p in range(1, lanes - 1) for side in (_LOW, _HIGH)]
    return lanes, list(dict.fromkeys(order))[:challengers]


def layout(weights: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bucket ranges for ``weights`` (control first, percentages summing to 100).

    Returns ``(bounds, owners)``: bucket ``b`` belongs to ``owners[bisect_right(bounds, b)]``,
    where each bound is the exclusive upper end of a range. Empty ranges are left out.
    """
    if sum(weights) != 100 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative and sum to 100, got {list(weights)}")
    sized = [w * PER_PERCENT for w in weights]
    lanes, slots = _slots(len(weights) - 1)
    edges = [p * BUCKETS // lanes for p in range(lanes + 1)]
    home: dict[tuple[int, int], int] = {slot: i + 1 for i, slot in enumerate(slots)}
    taken: list[tuple[int, int, int]] = []  # (start, end, owner)
    spill: list[tuple[int, int]] = []  # (owner, buckets that did not fit in the home lane)
    for p in range(lanes):
        start, end = edges[p], edges[p + 1]
        low, high = home.get((p, _LOW)), home.get((p, _HIGH))
        fit_low = min(sized[low], end - start) if low is not None else 0
        fit_high = min(sized[high], end - start - fit_low) if high is not None else 0
        if low is not None:
            taken.append((start, start + fit_low, low))
            spill.append((low, sized[low] - fit_low))
        if high is not None:
            taken.append((end - fit_high, end, high))
            spill.append((high, sized[high] - fit_high))
    free: list[tuple[int, int]] = []  # control's buckets, ascending
    edge = 0
    for start, end, _ in sorted(taken):
        if start > edge:
            free.append((edge, start))
        edge = max(edge, end)
    if edge < BUCKETS:
        free.append((edge, BUCKETS))
    for owner, amount in sorted(spill):  # overflow only: into the lowest buckets control holds
        while amount:
            start, end = free.pop(0)
            used = min(amount, end - start)
            taken.append((start, start + used, owner))
            if start + used < end:
                free.insert(0, (start + used, end))
            amount -= used
    ranges = sorted([(s, e, o) for s, e, o in taken if e > s] + [(s, e, 0) for s, e in free])
    bounds: list[int] = []
    owners: list[int] = []
    for _, end, owner in ranges:
        if owners and owners[-1] == owner:
            bounds[-1] = end
        else:
            bounds.append(end)
            owners.append(owner)
    return tuple(bounds[:-1]), tuple(owners)


def moves(before: Sequence[int], after: Sequence[int]) -> dict[tuple[int, int], int]:
    """Exactly how many buckets pass from variant ``a`` to variant ``b`` when the weights change."""
    old, new = layout(before), layout(after)
    cuts = sorted({0, *old[0], *new[0]})
    out: dict[tuple[int, int], int] = {}
    for start, end in zip(cuts, [*cuts[1:], BUCKETS], strict=True):
        a, b = owner_of(*old, start), owner_of(*new, start)
        if a != b:
            out[(a, b)] = out.get((a, b), 0) + end - start
    return out


def ramp_problem(before: Sequence[int], after: Sequence[int], names: Sequence[str] | None = None) -> str | None:
    """None when the change moves units only between control and challengers whose weight changed
    in that direction (control -> a grown one, a shrunk one -> control); else a sentence saying
    which units would move where (as shares of all units), for the operator who asked."""

    def label(i: int) -> str:
        return repr(names[i]) if names is not None else f"variant {i}"

    bad = {
        (a, b): n
        for (a, b), n in moves(before, after).items()
        if not ((a == 0 and after[b] > before[b]) or (b == 0 and after[a] < before[a]))
    }
    if not bad:
        return None
    changed = " and ".join(
        f"{'raising' if after[i] > before[i] else 'lowering'} {label(i)} from {before[i]}% to {after[i]}%"
        for i in range(1, len(before))
        if before[i] != after[i]
    )
    moved = ", ".join(
        f"{n / PER_PERCENT:g}% of all units from {label(a)} to {label(b)}" for (a, b), n in sorted(bad.items())
    )
    return (
        f"{changed or 'these weights'} would move {moved}: with three or more challengers a lane of the cohort "
        "layout is full; lower or roll back another challenger first, or set the weights in the policy "
        "(`cohortgate policy diff` shows who moves)"
    )


def owner_of(bounds: tuple[int, ...], owners: tuple[int, ...], bucket: int) -> int:
    """Index of the variant owning ``bucket`` in a layout."""
    return owners[bisect_right(bounds, bucket)]


def assign(weights: Sequence[int], key: bytes, unit: str) -> int:
    """Convenience for tests and tools: the variant index ``unit`` lands in under ``weights``."""
    bounds, owners = layout(weights)
    return owner_of(bounds, owners, bucket_of(key, unit))
