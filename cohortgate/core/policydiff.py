"""What a policy change does, for a reviewer: structural changes and the users each route moves.

Pure: two compiled policies in, a `PolicyDiff` out. The user movement is measured, not estimated:
a fixed sample of unit ids is bucketed under both policies with the real cohort code.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cohortgate.core import cohorts
from cohortgate.core.policy import Backend, Guardrails, JwtSettings, Policy, Rollout, Route

SAMPLE_UNITS = 20_000


@dataclass(frozen=True, slots=True)
class RouteDiff:
    name: str
    changes: tuple[str, ...]
    moved_share: float = 0.0  # share of sampled units that change variant
    moves: tuple[tuple[str, str, float], ...] = ()  # (from, to, share)


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    routes: tuple[RouteDiff, ...] = ()
    global_changes: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.global_changes or any(r.changes for r in self.routes))

    def lines(self) -> list[str]:
        out = list(self.global_changes)
        out += [f"+ route {name}" for name in self.added]
        out += [f"- route {name}" for name in self.removed]
        for r in self.routes:
            if not r.changes:
                continue
            out.append(f"~ route {r.name}")
            out += [f"    {c}" for c in r.changes]
            for src, dst, share in r.moves:
                out.append(f"    moves {share * 100:.1f} % of users from {src} to {dst}")
        return out or ["no changes"]


def _backends(backends: Iterable[Backend]) -> list[str]:
    return [f"{b.url} ({b.region})" for b in backends]


def _shown(value: Any) -> str:
    """Sets and tuples sorted and bracketed, so a reviewer reads values rather than reprs."""
    if isinstance(value, frozenset | set):
        return str(sorted(value))
    if isinstance(value, tuple):
        return str(list(value))
    if isinstance(value, Mapping):
        return str({k: _shown(v) for k, v in sorted(value.items())})
    return str(value)


def _fields(label: str, old: Any, new: Any, names: tuple[str, ...]) -> list[str]:
    """``label.field a -> b`` for each named field that differs: the reviewer sees which one changed."""
    return [
        f"{label}.{name} {_shown(getattr(old, name))} -> {_shown(getattr(new, name))}"
        for name in names
        if getattr(old, name) != getattr(new, name)
    ]


def _identities(route: Route) -> list[str]:
    return sorted(route.identities | {p + "*" for p in route.identity_prefixes})


def _route_changes(old: Route, new: Route) -> list[str]:
    changes: list[str] = []
    changes += _fields("match", old, new, ("path_prefix", "model", "methods"))
    if _identities(old) != _identities(new):
        changes.append(f"auth.identities {_identities(old)} -> {_identities(new)}")
    changes += _fields("auth", old, new, ("scopes", "claims"))
    unit = (old.unit_source, old.unit_key), (new.unit_source, new.unit_key)
    if unit[0] != unit[1]:
        changes.append(f"cohorts.unit {unit[0][0]} {unit[0][1]} -> {unit[1][0]} {unit[1][1]}")
    if old.salt != new.salt:
        changes.append(f"cohorts.salt {old.salt!r} -> {new.salt!r}: every unit is reshuffled")
    if old.eligibility != new.eligibility:
        before = [e.describe() for e in old.eligibility]
        after = [e.describe() for e in new.eligibility]
        changes.append(f"cohorts.eligibility {before} -> {after}")
    if dict(old.overrides) != dict(new.overrides):
        changes.append(f"cohorts.overrides {_overrides(old)} -> {_overrides(new)}")
    source = (old.residency_source, old.residency_key), (new.residency_source, new.residency_key)
    if source[0] != source[1]:
        changes.append(f"residency.source {source[0][0]} {source[0][1]} -> {source[1][0]} {source[1][1]}")
    changes += _fields("residency", old, new, ("allowed_regions", "default_region"))
    if old.fallback_control != new.fallback_control:

        def said(r: Route) -> str:
            return "fallback_control" if r.fallback_control else "deny"

        changes.append(f"residency.on_missing_region {said(old)} -> {said(new)}")
    old_v = {v.name: v for v in old.variants}
    new_v = {v.name: v for v in new.variants}
    for name in new_v.keys() - old_v.keys():
        changes.append(f"+ variant {name} weight {new_v[name].weight}: {', '.join(_backends(new_v[name].backends))}")
    for name in old_v.keys() - new_v.keys():
        changes.append(f"- variant {name}")
    for name in old_v.keys() & new_v.keys():
        a, b = old_v[name], new_v[name]
        if a.weight != b.weight:
            changes.append(f"variant {name}: weight {a.weight} -> {b.weight}")
        if _backends(a.backends) != _backends(b.backends):
            changes.append(f"variant {name}: backends {_backends(a.backends)} -> {_backends(b.backends)}")
        if [x.model for x in a.backends] != [x.model for x in b.backends]:
            changes.append(
                f"variant {name}: model files {[x.model for x in a.backends]} -> {[x.model for x in b.backends]}"
            )
    old_s = {s.name: s for s in old.shadows}
    new_s = {s.name: s for s in new.shadows}
    for name in new_s.keys() - old_s.keys():
        changes.append(f"+ shadow {name} {new_s[name].percent}%: {', '.join(_backends(new_s[name].backends))}")
    for name in old_s.keys() - new_s.keys():
        changes.append(f"- shadow {name}")
    for name in old_s.keys() & new_s.keys():
        sa, sb = old_s[name], new_s[name]
        if sa.percent != sb.percent:
            changes.append(f"shadow {name}: percent {sa.percent}% -> {sb.percent}%")
        if _backends(sa.backends) != _backends(sb.backends):
            changes.append(f"shadow {name}: backends {_backends(sa.backends)} -> {_backends(sb.backends)}")
    changes += _fields("guardrails", old.guardrails, new.guardrails, _names(Guardrails))
    if old.rollout is None or new.rollout is None:
        if old.rollout != new.rollout:
            changes.append(f"rollout {_rollout(old.rollout)} -> {_rollout(new.rollout)}")
    else:
        changes += _fields("rollout", old.rollout, new.rollout, _names(Rollout))
    return changes


def _overrides(route: Route) -> dict[str, str]:
    return {unit: route.variants[i].name for unit, i in sorted(route.overrides.items())}


def _rollout(rollout: Rollout | None) -> str:
    if rollout is None:
        return "none"
    return f"{rollout.variant} steps {list(rollout.steps)} every {rollout.interval_s:g}s"


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _movement(old: Route, new: Route, sample: int) -> tuple[float, tuple[tuple[str, str, float], ...]]:
    """Variant-to-variant movement over ``sample`` unit ids (eligibility and overrides aside)."""
    moves: Counter[tuple[str, str]] = Counter()
    for i in range(sample):
        unit = f"unit-{i}"
        a = old.variants[cohorts.owner_of(old.bounds, old.owners, cohorts.bucket_of(old.salt_key, unit))].name
        b = new.variants[cohorts.owner_of(new.bounds, new.owners, cohorts.bucket_of(new.salt_key, unit))].name
        if a != b:
            moves[(a, b)] += 1
    total = sum(moves.values()) / sample
    return total, tuple((a, b, n / sample) for (a, b), n in sorted(moves.items()))


def diff(old: Policy, new: Policy, *, sample: int = SAMPLE_UNITS) -> PolicyDiff:
    global_changes: list[str] = []
    global_changes += _fields("jwt", old.jwt, new.jwt, _names(JwtSettings))
    if old.response_headers != new.response_headers:
        global_changes.append(f"response_headers {old.response_headers} -> {new.response_headers}")
    added = tuple(r.name for r in new.routes if r.name not in old.by_name)
    removed = tuple(r.name for r in old.routes if r.name not in new.by_name)
    routes = []
    for r in new.routes:
        before = old.by_name.get(r.name)
        if before is None:
            continue
        changes = _route_changes(before, r)
        share, moves = _movement(before, r, sample) if changes else (0.0, ())
        routes.append(RouteDiff(r.name, tuple(changes), share, moves))
    return PolicyDiff(added, removed, tuple(routes), tuple(global_changes))
