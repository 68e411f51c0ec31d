"""What a policy change does, for a reviewer: structural changes and the users each route moves.

Pure: two compiled policies in, a `PolicyDiff` out. The user movement is measured, not estimated:
a fixed sample of unit ids is bucketed under both policies with the real cohort code.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cohortgate.core import cohorts
from cohortgate.core.policy import Policy, Route

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


def _backends(backends) -> list[str]:
    return [f"{b.url} ({b.region})" for b in backends]


def _route_changes(old: Route, new: Route) -> list[str]:
    changes: list[str] = []
    if (old.path_prefix, old.model, old.methods) != (new.path_prefix, new.model, new.methods):
        changes.append("match changed")
    if (old.identities, old.identity_prefixes, old.scopes, dict(old.claims)) != (
        new.identities,
        new.identity_prefixes,
        new.scopes,
        dict(new.claims),
    ):
        changes.append(
            f"auth: identities {sorted(old.identities | set(p + '*' for p in old.identity_prefixes))} -> "
            f"{sorted(new.identities | set(p + '*' for p in new.identity_prefixes))}, "
            f"scopes {sorted(old.scopes)} -> {sorted(new.scopes)}"
        )
    if old.salt != new.salt:
        changes.append(f"salt {old.salt!r} -> {new.salt!r}: every unit is reshuffled")
    if (old.eligibility, dict(old.overrides)) != (new.eligibility, dict(new.overrides)):
        changes.append("eligibility or overrides changed")
    if (old.allowed_regions, old.default_region, old.fallback_control) != (
        new.allowed_regions,
        new.default_region,
        new.fallback_control,
    ):
        changes.append(
            f"residency: regions {sorted(old.allowed_regions)} -> {sorted(new.allowed_regions)}, "
            f"default {old.default_region} -> {new.default_region}"
        )
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
    old_s = {s.name: s for s in old.shadows}
    new_s = {s.name: s for s in new.shadows}
    for name in new_s.keys() - old_s.keys():
        changes.append(f"+ shadow {name} {new_s[name].percent}%: {', '.join(_backends(new_s[name].backends))}")
    for name in old_s.keys() - new_s.keys():
        changes.append(f"- shadow {name}")
    for name in old_s.keys() & new_s.keys():
        a, b = old_s[name], new_s[name]
        if a.percent != b.percent or _backends(a.backends) != _backends(b.backends):
            changes.append(f"shadow {name}: {a.percent}% -> {b.percent}%")
    if (old.guardrails, old.rollout) != (new.guardrails, new.rollout):
        changes.append("guardrails or rollout changed")
    return changes


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
    global_changes = []
    if old.jwt != new.jwt:
        global_changes.append(f"jwt: issuer/audience/algorithms/jwks changed ({old.jwt.jwks} -> {new.jwt.jwks})")
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
