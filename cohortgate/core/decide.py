"""`decide(policy, facts) -> Decision`: the whole per-request verdict, as a pure function.

No sockets, no clocks, no randomness: the same policy and facts always give the same decision, so
every rule is tested without an event loop. The steps, in order (each may end in a denial):

1. authentication: a verified token is required unless the policy says otherwise  -> 401
2. route: method + path (whole-segment prefixes, OIP model names)                  -> 404
   (a sidecar's host-local path, core.contract.sidecar_local_only, on any route         -> 403)
3. authorisation: mTLS SPIFFE identity, token scopes and claims                     -> 403
4. residency: the request's region (claim/header, or the policy's default)          -> 451
5. cohort: override, else eligibility, else the sticky hash bucket -> variant (a bandit
   route first honours the unit's signed assignment note, core/sticky.py);
   a token without the route's unit claim                                          -> 401
6. backend: the variant's backend in the region, else control's (if allowed)        -> 451
7. shadows: each sampled per request id, kept only with a backend in the region

With ``trace=True`` the decision also carries a sentence per step (for `policy explain`); the
request path leaves it off and pays for no string formatting.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cohortgate.core import cohorts, sticky
from cohortgate.core.contract import sidecar_local_only
from cohortgate.core.errors import Denial
from cohortgate.core.policy import Policy, Route


@dataclass(frozen=True, slots=True)
class Facts:
    """What the adapter knows about a request, already verified."""

    method: str
    path: str  # without the query string
    headers: Mapping[str, str]  # lower-cased names
    identity: str | None = None  # SPIFFE ID from the verified client certificate
    claims: Mapping[str, Any] | None = field(default=None, repr=False)  # verified JWT claims
    request_id: str = ""
    sticky: str | None = field(default=None, repr=False)  # the client's echoed assignment note (core.sticky)
    sticky_keys: tuple[bytes, ...] = field(default=(), repr=False)  # its keys; none: no sticky notes


@dataclass(frozen=True, slots=True)
class Decision:
    denial: Denial | None = None
    message: str = ""
    route: str | None = None
    variant: str | None = None
    cluster: str | None = None  # Envoy cluster for the chosen backend
    region: str | None = None
    shadows: tuple[str, ...] = ()  # Envoy clusters to mirror to
    shadow_names: tuple[str, ...] = ()
    bucket: int | None = None
    assignment: str = ""  # override | ineligible | no_unit | hash | sticky
    fallback: bool = False  # served by control because the variant had no in-region backend
    unit: str | None = field(default=None, repr=False)  # raw unit: hash it before it leaves the process
    trace: tuple[str, ...] = ()
    sticky: str = field(default="", repr=False)  # bandit routes: the assignment note to send back
    segment: str = ""  # a segmented bandit route: the request's allocation segment (in its exposure token)

    @property
    def allowed(self) -> bool:
        return self.denial is None

    @property
    def status(self) -> int:
        return 200 if self.denial is None else self.denial.status


def _deny(denial: Denial, message: str, trace: list[str] | None, route: str | None = None) -> Decision:
    if trace is not None:
        trace.append(f"denied: {denial.code} ({denial.status}): {message}")
    return Decision(denial=denial, message=message, route=route, trace=tuple(trace or ()))


#: a unit's bucket (a keyed BLAKE2b, ~2-3 us) by (route salt key, unit): a returning unit costs a lookup.
#: Bounded (least recently used go first); holds raw units, which never leave the process.
_bucket_of = functools.lru_cache(maxsize=65_536)(cohorts.bucket_of)


def _value(route_source: str, key: str, facts: Facts) -> str | None:
    if route_source == "header":
        return facts.headers.get(key)
    value = facts.claims.get(key) if facts.claims is not None else None
    if value is None or isinstance(value, dict | list):
        return None
    return value if isinstance(value, str) else str(value)


def _region(route: Route, facts: Facts) -> str | None:
    """The request's region: a non-empty string, else None ("missing region", whatever the claim held).

    One rule for every source and representation: a list, tuple, mapping (plain or the gateway's
    frozen ``MappingProxyType``), number, boolean, null or "" is no region, and the route's
    missing-region behaviour applies. Never ``str()`` of it: ``['eu']`` is not region ``"('eu',)"``,
    ``1`` is not region ``"1"``. A string outside the route's regions stays what it says, so it is
    refused (451) rather than guessed into the default region.
    """
    if route.residency_source == "header":
        value: Any = facts.headers.get(route.residency_key)
    else:
        value = facts.claims.get(route.residency_key) if facts.claims is not None else None
    return value if isinstance(value, str) and value else None


def _unit(route: Route, facts: Facts) -> str | None:
    """The cohort unit: a non-empty string (or an integer id, as its digits), else None.

    A token that carries no such claim is refused at step 5 (a verified caller without an identity
    to bucket would land in control with a null audit subject); a missing header unit, or no token
    on a policy that does not require one, gets control.
    """
    if route.unit_source == "header":
        return facts.headers.get(route.unit_key) or None
    value = facts.claims.get(route.unit_key) if facts.claims is not None else None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        return frozenset(s for s in scp if isinstance(s, str))
    if isinstance(scp, str):
        return frozenset(scp.split())
    return frozenset()


def _identity_allowed(route: Route, identity: str | None) -> bool:
    if route.identity_any:
        return True
    if identity is None:
        return False
    # str.startswith takes the tuple itself (no generator per request); an empty tuple matches nothing
    return identity in route.identities or identity.startswith(route.identity_prefixes)


def _sample(key: bytes, request_id: str) -> int:
    digest = hashlib.blake2b(request_id.encode(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big") % cohorts.BUCKETS


def _held(route: Route, facts: Facts, unit: str) -> int | None:
    """The arm a valid assignment note keeps this unit on, if that arm is still live (a rolled-back
    or removed arm lets go of its units: they take the layout like anyone new)."""
    if not facts.sticky or not facts.sticky_keys:
        return None
    name = sticky.verify(facts.sticky, facts.sticky_keys, route.name, route.salt, unit)
    if name is None:
        return None
    for i, v in enumerate(route.variants):
        if v.name == name:
            return i if v.enabled and v.weight > 0 else None
    return None


def decide(policy: Policy, facts: Facts, *, trace: bool = False) -> Decision:
    steps: list[str] | None = [] if trace else None

    # 1. authentication
    if facts.claims is None and policy.jwt.required:
        return _deny(Denial.UNAUTHENTICATED, "A valid bearer token is required.", steps)

    # 2. route (never a sidecar's host-local extension, such as shared memory, whatever the policy matches)
    if sidecar_local_only(facts.path):
        message = f"{facts.path} is only served to clients on the model's own host, never through the gateway."
        return _deny(Denial.FORBIDDEN, message, steps)
    route = policy.match(facts.method, facts.path, facts.headers.get(":authority") if policy.by_host else None)
    if route is None:
        return _deny(Denial.NO_ROUTE, f"No route matches {facts.method} {facts.path}.", steps)
    if steps is not None:
        steps.append(f"route {route.name!r} matches {facts.method} {facts.path}")

    # 3. authorisation
    if not _identity_allowed(route, facts.identity):
        who = facts.identity or "a client without a SPIFFE identity"
        return _deny(Denial.FORBIDDEN, f"{who} may not call route {route.name!r}.", steps, route.name)
    claims = facts.claims or {}
    if route.scopes:
        scope = claims.get("scope")  # the common form, checked without building a set per request
        missing = (
            () if isinstance(scope, str) and route.scopes.issubset(scope.split()) else route.scopes - _scopes(claims)
        )
        if missing:
            return _deny(
                Denial.FORBIDDEN,
                f"The token lacks scope {', '.join(sorted(missing))} required by route {route.name!r}.",
                steps,
                route.name,
            )
    for claim, allowed in route.claims.items():
        value = _value("claim", claim, facts)
        if value not in allowed:
            return _deny(
                Denial.FORBIDDEN,
                f"The token's {claim!r} claim does not allow route {route.name!r}.",
                steps,
                route.name,
            )
    if steps is not None:
        steps.append(f"authorised: identity {facts.identity or '-'}, scopes and claims satisfied")

    # 4. residency
    region = _region(route, facts)
    if region is None:
        if route.default_region is None:
            return _deny(
                Denial.RESIDENCY_UNAVAILABLE,
                f"The request carries no residency ({route.residency_source} {route.residency_key!r}) "
                f"and route {route.name!r} does not guess one.",
                steps,
                route.name,
            )
        region = route.default_region
        if steps is not None:
            steps.append(f"residency unknown: the route's default region {region!r} applies")
    elif steps is not None:
        steps.append(f"residency {region!r} from {route.residency_source} {route.residency_key!r}")
    if region not in route.allowed_regions:
        return _deny(
            Denial.RESIDENCY_UNAVAILABLE,
            f"Route {route.name!r} serves no backend in region {region!r}.",
            steps,
            route.name,
        )

    # 5. cohort
    unit = _unit(route, facts)
    bucket = None
    segment = ""
    if unit is None and route.unit_source == "claim" and facts.claims is not None:
        return _deny(
            Denial.UNAUTHENTICATED,
            f"The bearer token has no usable {route.unit_key!r} claim, which route {route.name!r} assigns cohorts by.",
            steps,
            route.name,
        )
    if unit is None:
        index, assignment = 0, "no_unit"
        if steps is not None:
            steps.append(f"no cohort unit ({route.unit_source} {route.unit_key!r}): control")
    elif (override := route.overrides.get(unit)) is not None and route.variants[override].enabled:
        index, assignment = override, "override"
        if steps is not None:
            steps.append(f"override: unit pinned to {route.variants[index].name!r}")
    else:
        failed = None
        for rule in route.eligibility:
            if not rule.passes(_value(rule.source, rule.key, facts)):
                failed = rule
                break
        if failed is not None:
            index, assignment = 0, "ineligible"
            if steps is not None:
                steps.append(f"ineligible ({failed.describe()} fails): control")
        else:
            bucket = _bucket_of(route.salt_key, unit)
            bounds, owners = route.bounds, route.owners
            if route.segment_layouts and route.allocation is not None:  # the segment's own weights
                segment = route.allocation.segment_of(region, facts.headers, facts.claims)
                bounds, owners = route.segment_layouts.get(segment, (bounds, owners))
                if steps is not None:
                    steps.append(f"allocation segment {segment!r}: the bandit's weights for it apply")
            index, assignment = cohorts.owner_of(bounds, owners, bucket), "hash"
            held = _held(route, facts, unit) if route.allocation is not None else None
            if held is not None:
                index, assignment = held, "sticky"
                if steps is not None:
                    steps.append(f"sticky: the unit's assignment note keeps it on {route.variants[index].name!r}")
            elif steps is not None:
                weights = ", ".join(f"{v.name} {v.weight}%" for v in route.variants)
                steps.append(
                    f"bucket {bucket} of {cohorts.BUCKETS} (salt {route.salt!r}; {weights}) "
                    f"-> {route.variants[index].name!r}"
                )
    variant = route.variants[index]

    # 6. backend in region
    fallback = False
    backends = variant.by_region.get(region)
    if not backends:
        control_backends = route.control.by_region.get(region) if route.fallback_control else None
        if not control_backends:
            return _deny(
                Denial.RESIDENCY_UNAVAILABLE,
                f"Variant {variant.name!r} of route {route.name!r} has no backend in region {region!r}.",
                steps,
                route.name,
            )
        if steps is not None:
            steps.append(f"{variant.name!r} has no backend in {region!r}: falling back to control")
        variant, backends, fallback = route.control, control_backends, True
    backend = backends[(bucket or 0) % len(backends)]
    if steps is not None:
        steps.append(f"backend {backend.url} (region {backend.region}, cluster {backend.cluster})")

    # 7. shadows
    shadows: list[str] = []
    shadow_names: list[str] = []
    for shadow in route.shadows:
        if _sample(shadow.key, facts.request_id or unit or "") >= shadow.threshold:
            if steps is not None:
                steps.append(f"shadow {shadow.name!r}: not sampled ({shadow.percent}%)")
            continue
        in_region = shadow.by_region.get(region)
        if not in_region:
            if steps is not None:
                steps.append(f"shadow {shadow.name!r}: dropped, no backend in region {region!r}")
            continue
        target = in_region[(bucket or 0) % len(in_region)]
        shadows.append(target.cluster)
        shadow_names.append(shadow.name)
        if steps is not None:
            steps.append(f"shadow {shadow.name!r}: mirrored to {target.url} (cluster {target.cluster})")

    if route.allocation is not None and route.allocation.segment_defs and not segment:
        segment = route.allocation.segment_of(region, facts.headers, facts.claims)
    note = ""
    # overrides and ineligible units are not the bandit's to pin; a fallback is not the unit's arm
    pin = assignment in ("hash", "sticky") and not fallback
    if pin and route.allocation is not None and facts.sticky_keys and unit is not None:
        note = sticky.mint(facts.sticky_keys[0], route.name, route.salt, unit, variant.name)

    return Decision(
        route=route.name,
        variant=variant.name,
        cluster=backend.cluster,
        region=region,
        shadows=tuple(shadows),
        shadow_names=tuple(shadow_names),
        bucket=bucket,
        assignment=assignment,
        fallback=fallback,
        unit=unit,
        trace=tuple(steps or ()),
        sticky=note,
        segment=segment,
    )
