"""Rows -> placements, through the gateway's own `decide` (never a copy of its rules).

A batch row is not a request: nobody authenticates it, so the operator's job stands in for steps
1-3 of `decide` (the route's identity, scope and claim rules are lifted, on a one-route copy of the
policy). Steps 4-7 -- residency, cohort (overrides, eligibility, the salted bucket), the in-region
backend with control's fallback, shadows -- run unchanged, on the facts a request would carry:
each key the route reads (its unit, its residency, its eligibility predicates) is read from the
input column of that name, as a claim or a header exactly as the route says.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from cohortgate.core import cohorts
from cohortgate.core.decide import Decision, Facts, decide
from cohortgate.core.policy import OIP_MODEL_PREFIX, Policy, Route


class AssignError(ValueError):
    """The route cannot be used for batch scoring as asked (unknown route, bad weights)."""


@dataclass(frozen=True, slots=True)
class Key:
    """One value the route reads from a request, and the input column that holds it."""

    source: str  # "claim" | "header"
    name: str  # claim name, or lower-cased header name (also the column name)
    why: str  # unit | residency | eligibility


def route_keys(route: Route) -> tuple[Key, ...]:
    keys = [
        Key(route.unit_source, route.unit_key, "unit"),
        Key(route.residency_source, route.residency_key, "residency"),
    ]
    keys += [Key(rule.source, rule.key, "eligibility") for rule in route.eligibility]
    return tuple(dict.fromkeys(keys))


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class Assigner:
    """Places rows on one route of a policy with the gateway's `decide` (steps 4-7)."""

    def __init__(
        self, policy: Policy, route_name: str, *, weights: Mapping[str, int] | None = None, shadows: bool = False
    ) -> None:
        route = policy.by_name.get(route_name)
        if route is None:
            raise AssignError(f"policy {policy.path} has no route {route_name!r} (routes: {sorted(policy.by_name)})")
        if weights:
            unknown = set(weights) - {v.name for v in route.variants}
            if unknown:
                raise AssignError(f"route {route_name!r} has no variant {sorted(unknown)}")
            try:
                route = route.with_weights(weights)
            except ValueError as exc:
                raise AssignError(str(exc)) from None
        # The operator's job is authorised to score the route; everything after authorisation is the
        # gateway's. Shadows asked for score every row that has an in-region shadow backend: the
        # gateway samples them to bound live load, which a batch job does not have.
        operator = replace(
            route,
            identity_any=True,
            scopes=frozenset(),
            claims=MappingProxyType({}),
            shadows=tuple(replace(s, threshold=cohorts.BUCKETS) for s in route.shadows) if shadows else (),
        )
        by_model = {operator.model: (operator,)} if operator.model is not None else {}
        by_prefix = (
            {} if operator.model is not None else {(operator.path_prefix or "/").rstrip("/") or "/": (operator,)}
        )
        self.policy = replace(
            policy,
            jwt=replace(policy.jwt, required=False),
            routes=(operator,),
            by_name=MappingProxyType({operator.name: operator}),
            by_model=MappingProxyType(by_model),
            by_prefix=MappingProxyType(by_prefix),
        )
        self.route = operator
        self.method = "POST" if operator.methods is None or "POST" in operator.methods else min(operator.methods)
        self.path = (
            f"{OIP_MODEL_PREFIX}{operator.model}/infer" if operator.model is not None else operator.path_prefix or "/"
        )
        if self.policy.match(self.method, self.path) is not operator:  # pragma: no cover - guards the construction
            raise AssignError(f"route {route_name!r} does not match its own path {self.path}")
        self.keys = route_keys(operator)

    def facts(self, values: Mapping[str, Any], row: int = 0) -> Facts:
        """The facts a request carrying these values would present to `decide` (absent: left out)."""
        claims: dict[str, Any] = {}
        headers: dict[str, str] = {}
        for key in self.keys:
            value = values.get(key.name)
            if _absent(value):
                continue
            if key.source == "claim":
                claims[key.name] = value
            else:
                headers[key.name] = value if isinstance(value, str) else str(value)
        return Facts(self.method, self.path, headers, None, claims, "")

    def decide(self, values: Mapping[str, Any]) -> Decision:
        return decide(self.policy, self.facts(values))

    def place(self, columns: Mapping[str, Sequence[Any]], rows: int) -> list[Decision]:
        """One decision per row; ``columns`` holds the route's key columns as Python values.

        `decide` is pure and a batch row has no request id, so rows with the same key values (the
        same user scored several times) share one decision: it is computed once per distinct tuple.
        """
        present = [(k.name, columns[k.name]) for k in self.keys if k.name in columns]
        names = [name for name, _ in present]
        cache: dict[tuple[Any, ...], Decision] = {}
        out: list[Decision] = []
        for values in zip(*(col for _, col in present), strict=True) if present else [()] * rows:
            key = (*values, *map(type, values))  # 1, 1.0 and True are equal keys but not equal facts
            try:
                found = cache.get(key)
            except TypeError:  # an unhashable value (a list in a claim column): no sharing
                found = None
            if found is None:
                found = self.decide(dict(zip(names, values, strict=True)))
                if len(cache) < 1_000_000:
                    with contextlib.suppress(TypeError):
                        cache[key] = found
            out.append(found)
        return out

    def missing(self, names: Iterable[str]) -> list[Key]:
        have = set(names)
        return [k for k in self.keys if k.name not in have]
