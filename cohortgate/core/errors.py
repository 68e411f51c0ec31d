"""Errors that carry their HTTP status, and the denial codes a client can rely on.

Two tiers, as in Envoy AI Gateway, MLServer and httpx:

    CohortgateError                  base of everything this project raises on purpose
    ├── PolicyError                  a policy file is invalid; lists every problem as FILE:LINE:COL
    └── RequestDenied                a user-visible answer: stable code + HTTP status + sentence
        (raised by adapters such as JWT verification; `decide` returns denials as values)

Anything else that escapes (a bug, a library failure) is internal: the adapter logs and counts
it, and answers fail-closed with 503 -- never a stack trace to the client. Third-party exceptions
(pyjwt, onnxruntime, redis) are translated into these at the boundary, in one place each.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from pathlib import Path


class Denial(enum.Enum):
    """Stable denial codes. The value is ``(code, HTTP status, default sentence)``."""

    UNAUTHENTICATED = ("unauthenticated", 401, "A valid bearer token is required.")
    FORBIDDEN = ("forbidden", 403, "This identity is not allowed to call this route.")
    NO_ROUTE = ("no_route", 404, "No route matches this request.")
    PAYLOAD_TOO_LARGE = ("payload_too_large", 413, "The request is larger than this route allows.")
    RESIDENCY_UNAVAILABLE = (
        "residency_unavailable",
        451,
        "No backend serves this request inside its data-residency region.",
    )
    UNAVAILABLE = ("unavailable", 503, "The gateway cannot decide on this request right now.")

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def status(self) -> int:
        return self.value[1]

    @property
    def default_message(self) -> str:
        return self.value[2]

    @property
    def grpc_status(self) -> int:
        """The gRPC status code a gRPC caller gets instead of the HTTP status (same sentence)."""
        return GRPC_STATUS[self.code]


#: Denial code -> gRPC status code (grpc/status.h): what a gRPC caller (``content-type: application/grpc``)
#: is answered instead of the HTTP status; residency is a precondition of the request, not a permission.
GRPC_STATUS: dict[str, int] = {
    "unauthenticated": 16,  # UNAUTHENTICATED
    "forbidden": 7,  # PERMISSION_DENIED
    "no_route": 5,  # NOT_FOUND
    "payload_too_large": 8,  # RESOURCE_EXHAUSTED
    "residency_unavailable": 9,  # FAILED_PRECONDITION
    "unavailable": 14,  # UNAVAILABLE
}


class CohortgateError(Exception):
    """Base of every error cohortgate raises on purpose."""


class RequestDenied(CohortgateError):
    """A request is refused with a stable code, an HTTP status and a sentence a person understands."""

    def __init__(self, denial: Denial, message: str | None = None) -> None:
        self.denial = denial
        self.message = message or denial.default_message
        super().__init__(self.message)

    @property
    def code(self) -> str:
        return self.denial.code

    @property
    def status(self) -> int:
        return self.denial.status


class PolicyError(CohortgateError):
    """A policy file is invalid. ``problems`` holds every ``FILE:LINE:COL: message`` line."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in policy"
        super().__init__(head + ":\n" + "\n".join(self.problems))


def failure_line(path: Path | None, exc: BaseException, keeping: str, trigger: str, reason: str | None = None) -> str:
    """The one structured log line of a refused policy reload (gateway and controller log the same shape)."""
    if isinstance(exc, PolicyError):
        reason, problems = reason or "invalid", list(exc.problems)
    else:
        problems = [f"{path}:1:1: {exc}"] if reason is None else [str(exc)]
        reason = reason or type(exc).__name__
    doc = {
        "event": "policy_reload_failed",
        "file": str(path),
        "trigger": trigger,
        "reason": reason,
        "problems": problems,
        "keeping": keeping[:12],
    }
    return json.dumps(doc, separators=(",", ":"))
