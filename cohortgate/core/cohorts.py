"""Sticky cohorts: a unit's bucket is a keyed hash of (salt, unit), never a random draw.

Buckets run over ``0..BUCKETS-1``; a variant of weight ``w`` percent owns ``w * 100`` of them.
The layout of those ranges is chosen so that ramps move as few users as possible:

* control owns the middle; the first challenger grows upwards from bucket 0, the second grows
  downwards from the top, and further challengers stack after the first.
* So when one challenger's weight grows while control's shrinks (a rollout step), every unit that
  changes variant moves *into* that challenger, and rolling it back to 0 returns exactly those units
  to control. With one or two challengers this holds for any move between a challenger and control;
  with three or more, growing the first challenger shifts the ranges of the stacked ones (a pure
  function of the weights cannot avoid that: see docs/policy.md).
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


def layout(weights: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bucket ranges for ``weights`` (control first, percentages summing to 100).

    Returns ``(bounds, owners)``: bucket ``b`` belongs to ``owners[bisect_right(bounds, b)]``,
    where each bound is the exclusive upper end of a range. Empty ranges are left out.
    """
    if sum(weights) != 100 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative and sum to 100, got {list(weights)}")
    sized = [w * PER_PERCENT for w in weights]
    ranges: list[tuple[int, int]] = []  # (size, owner) in bucket order
    challengers = list(range(1, len(weights)))
    top = challengers[1] if len(challengers) >= 2 else None
    bottom = [i for i in challengers if i != top]
    ranges.extend((sized[i], i) for i in bottom)
    ranges.append((sized[0], 0))
    if top is not None:
        ranges.append((sized[top], top))
    bounds: list[int] = []
    owners: list[int] = []
    edge = 0
    for size, owner in ranges:
        if size:
            edge += size
            bounds.append(edge)
            owners.append(owner)
    return tuple(bounds[:-1]), tuple(owners)


def owner_of(bounds: tuple[int, ...], owners: tuple[int, ...], bucket: int) -> int:
    """Index of the variant owning ``bucket`` in a layout."""
    return owners[bisect_right(bounds, bucket)]


def assign(weights: Sequence[int], key: bytes, unit: str) -> int:
    """Convenience for tests and tools: the variant index ``unit`` lands in under ``weights``."""
    bounds, owners = layout(weights)
    return owner_of(bounds, owners, bucket_of(key, unit))
