"""An OpenFeature provider: which variant of a route a user is in, exactly as the gateway assigns it.

An application asks through the standard API (``openfeature.api``): the flag key is a route's name,
the evaluation context's ``targeting_key`` is the cohort unit (the token's unit claim, or the unit
header, whichever the route buckets by), and its attributes stand for the rest of the request the
gateway would see: the claims of its verified token (residency, eligibility, scopes; a token is
presumed, as routes under ``jwt.required`` demand) and its headers (string attributes), by the
same names.

    client.get_string_value("fraud", "control", EvaluationContext("user-42", {"residency": "eu"}))
        -> "canary"                      the variant that serves this user now
    client.get_boolean_value("fraud/canary", False, ctx)
        -> True                          is the user in that variant?

No second implementation of the assignment: each evaluation builds the request's ``Facts`` and
calls ``cohortgate.core.decide.decide`` on the *effective* policy, the file's policy with the
controller's weights and rolled-back variants on top (``cohortgate.store.state.effective_policy``,
kept current by ``follow`` from a running state store, or re-read from the state file when its
mtime changes). Same salt, same layout, same overrides, eligibility and in-region fallback as the
gateway. A request the gateway would refuse (no residency, a forbidden identity) resolves to the
caller's default with ``INVALID_CONTEXT`` and the gateway's denial in the message.

Resolution details: ``variant`` is the variant's name; ``reason`` is ``SPLIT`` for a hash bucket,
``TARGETING_MATCH`` for an override or an ineligible user (control), ``DEFAULT`` without a unit;
``flag_metadata`` holds route, bucket, assignment, fallback, region and the policy digest, for
logging exposures consistently with the gateway's audit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata

from cohortgate.core.decide import Decision, Facts, decide
from cohortgate.core.policy import OIP_MODEL_PREFIX, Policy, Route, load_policy
from cohortgate.store.state import InProcessState, StateStore, effective_policy, follow

#: flag key ``route/variant`` asks a yes/no question about one variant.
VARIANT_SEPARATOR = "/"
_REASONS = {"hash": Reason.SPLIT, "override": Reason.TARGETING_MATCH, "ineligible": Reason.TARGETING_MATCH}


class _Holder:
    """The smallest policy holder ``follow`` keeps current (the gateway's is ``PolicyHolder``)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._listeners: list[Any] = []

    def subscribe(self, listener: Any) -> None:
        self._listeners.append(listener)

    def swap(self, policy: Policy) -> None:
        old, self.policy = self.policy, policy
        for listener in self._listeners:
            listener(old, policy)


class _StateFile:
    """The controller's state file, re-read when it changes (checked at most every ``poll_s``).

    A change is any difference in (mtime, inode, size) of the file or its ``.prev`` twin: writes
    replace the file by rename, so two writes within one mtime tick still differ by inode."""

    def __init__(self, base: Policy, path: Path, poll_s: float) -> None:
        self.base, self.path, self.poll_s = base, path, poll_s
        self._seen: tuple[Any, ...] | None = None
        self._checked = float("-inf")
        self.policy = base

    def _signature(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for p in (self.path, self.path.with_name(self.path.name + ".prev")):
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_ino, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def current(self) -> Policy:
        now = time.monotonic()
        if now - self._checked >= self.poll_s:
            self._checked = now
            seen = self._signature()
            if seen != self._seen:
                self._seen = seen
                store = InProcessState(self.path)  # reads the newest readable generation, as gateways do
                self.policy = effective_policy(self.base, store.snapshot(), store.safe_mode is not None)
        return self.policy


def _request(route: Route) -> tuple[str, str]:
    """A method and path that ``policy.match`` sends to ``route`` (what a client of it would send)."""
    methods = route.methods
    method = "POST" if methods is None or "POST" in methods else sorted(methods)[0]
    if route.model is not None:
        return method, f"{OIP_MODEL_PREFIX}{route.model}/infer"
    return method, route.path_prefix or "/"


class CohortgateProvider(AbstractProvider):
    """Answers string flags (the variant) and boolean flags (``route/variant``) per route.

    Give it the policy (or its path) and where the controller's states are: a running ``store``
    (``RedisState`` or ``InProcessState``; the application starts and closes it, and the provider
    follows it like a gateway does), or a ``state_file``, or neither (the file's weights).
    ``identity`` is the SPIFFE ID the application's own requests carry, for routes that restrict it.
    """

    def __init__(
        self,
        policy: Policy | str | os.PathLike[str],
        *,
        store: StateStore | None = None,
        state_file: str | os.PathLike[str] | None = None,
        poll_s: float = 1.0,
        identity: str | None = None,
    ) -> None:
        super().__init__()
        if store is not None and state_file is not None:
            raise ValueError("give a running store or a state file, not both")
        base = policy if isinstance(policy, Policy) else load_policy(policy)
        self.identity = identity
        self._holder = _Holder(base)
        self._file = _StateFile(base, Path(state_file), poll_s) if state_file is not None else None
        if store is not None:
            follow(self._holder, store)

    @property
    def policy(self) -> Policy:
        """The effective policy evaluations read now."""
        return self._file.current() if self._file is not None else self._holder.policy

    def get_metadata(self) -> Metadata:
        return Metadata(name="cohortgate")

    # ------------------------------------------------------------------ the one evaluation

    def decision(self, route_name: str, context: EvaluationContext | None) -> Decision | None:
        """The gateway's decision for a request to ``route_name`` described by ``context``; None
        when no such route exists."""
        policy = self.policy
        route = policy.by_name.get(route_name)
        if route is None:
            return None
        attributes: Mapping[str, Any] = context.attributes if context is not None else {}
        claims = dict(attributes)
        headers = {k.lower(): v for k, v in attributes.items() if isinstance(v, str)}
        unit = context.targeting_key if context is not None else None
        if unit:
            if route.unit_source == "claim":
                claims[route.unit_key] = unit
            else:
                headers[route.unit_key] = unit
        method, path = _request(route)
        return decide(policy, Facts(method, path, headers, self.identity, claims))

    def _resolve(self, flag_key: str, context: EvaluationContext | None) -> tuple[Decision | None, str | None]:
        route_name, _, _ = flag_key.partition(VARIANT_SEPARATOR)
        decision = self.decision(route_name, context)
        if decision is not None and decision.allowed and decision.route != route_name:
            return None, f"route {route_name!r} cannot be addressed on its own (another route matches first)"
        return decision, None

    def _error(self, default: Any, code: ErrorCode, message: str) -> FlagResolutionDetails[Any]:
        return FlagResolutionDetails(default, error_code=code, error_message=message, reason=Reason.ERROR)

    def _details(self, flag_key: str, default: Any, context: EvaluationContext | None, boolean: bool):
        route_name, _, variant = flag_key.partition(VARIANT_SEPARATOR)
        if not context or not context.targeting_key:
            return self._error(default, ErrorCode.TARGETING_KEY_MISSING, "the cohort unit goes in targeting_key")
        decision, problem = self._resolve(flag_key, context)
        if decision is None:
            if problem is not None:
                return self._error(default, ErrorCode.GENERAL, problem)
            return self._error(default, ErrorCode.FLAG_NOT_FOUND, f"no route {route_name!r} in the policy")
        if boolean:
            route = self.policy.by_name[route_name]
            if variant not in {v.name for v in route.variants}:
                return self._error(
                    default, ErrorCode.FLAG_NOT_FOUND, f"route {route_name!r} has no variant {variant!r}"
                )
        if decision.denial is not None:
            message = f"the gateway would refuse this request: {decision.denial.code} ({decision.status}): "
            return self._error(default, ErrorCode.INVALID_CONTEXT, message + decision.message)
        metadata: dict[str, bool | int | float | str] = {
            "route": route_name,
            "assignment": decision.assignment,
            "fallback": decision.fallback,
            "region": decision.region or "",
            "policy_digest": self.policy.digest,
        }
        if decision.bucket is not None:
            metadata["bucket"] = decision.bucket
        value = decision.variant == variant if boolean else decision.variant
        return FlagResolutionDetails(
            value,
            variant=decision.variant,
            reason=_REASONS.get(decision.assignment, Reason.DEFAULT),
            flag_metadata=metadata,
        )

    # ------------------------------------------------------------------ the OpenFeature interface

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        if VARIANT_SEPARATOR in flag_key:
            return self._error(default_value, ErrorCode.TYPE_MISMATCH, "route/variant flags are boolean")
        return self._details(flag_key, default_value, evaluation_context, boolean=False)

    def resolve_boolean_details(
        self, flag_key: str, default_value: bool, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[bool]:
        if VARIANT_SEPARATOR not in flag_key:
            return self._error(default_value, ErrorCode.TYPE_MISMATCH, "a route's flag is a string (its variant)")
        return self._details(flag_key, default_value, evaluation_context, boolean=True)

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return self._error(default_value, ErrorCode.TYPE_MISMATCH, "cohortgate flags are strings or booleans")

    def resolve_float_details(
        self, flag_key: str, default_value: float, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[float]:
        return self._error(default_value, ErrorCode.TYPE_MISMATCH, "cohortgate flags are strings or booleans")

    def resolve_object_details(self, flag_key: str, default_value: Any, evaluation_context: Any = None) -> Any:
        return self._error(default_value, ErrorCode.TYPE_MISMATCH, "cohortgate flags are strings or booleans")
