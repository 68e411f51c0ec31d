"""Contract fuzzing: schemathesis generates requests from a service's own OpenAPI document.

``fuzz`` runs a bounded, seeded number of examples per operation (hypothesis with ``derandomize``:
the same examples every run) against a running service and returns every failure as one line per
operation, so a test can show them all at once instead of stopping at the first. Each response
is judged by schemathesis' checks (documented status, content type, headers and body schema; no
5xx; an operation that needs a token refuses the same request without it) plus one of ours: no
stack trace in any body.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.core import NotSet
from schemathesis.core.failures import FailureGroup

#: What a Python (or aiohttp) stack trace leaves in a body.
STACK_TRACE = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+|\bat 0x[0-9a-f]{6,}\b")


@dataclass
class Report:
    """Per operation: how many requests were sent, the statuses seen, and what failed."""

    sent: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, set[int]] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [f"{label}: {msg}" for label, msgs in sorted(self.failures.items()) for msg in msgs]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FailureGroup):
        return "; ".join(sorted({_one(f) for f in exc.exceptions}))
    return _one(exc)


def _one(exc: BaseException) -> str:
    title = getattr(exc, "title", None)
    if title is not None:
        message = (getattr(exc, "message", "") or "").strip().splitlines()
        return f"{title}: {message[0] if message else ''}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def fuzz(
    schema_doc: Mapping,
    base_url: str,
    *,
    examples: int,
    headers: Mapping[str, str] | None = None,
    skip: Iterable[str] = (),
    check: Callable[[str, object], str | None] | None = None,
    excluded_checks: Mapping[str, Sequence[Callable]] | None = None,
    modes: Sequence[GenerationMode] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
    timeout_s: float = 20.0,
    tls: Mapping[str, Any] | None = None,
) -> Report:
    """Fuzz every operation of ``schema_doc`` (but those labelled in ``skip``, e.g. ``GET /api/events``).

    ``tls``: requests' ``verify`` and ``cert`` for every request (schemathesis' own re-sends too),
    e.g. the test CA and a client certificate for Envoy's mTLS listener.
    """
    schema = schemathesis.openapi.from_dict(dict(schema_doc))
    report = Report()
    skipped = set(skip)
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        if label in skipped:
            continue
        report.sent[label] = 0
        report.statuses[label] = set()
        started = time.perf_counter()
        excluded = list((excluded_checks or {}).get(label, ()))
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode)
            if tls:
                strategy = strategy.map(lambda case, tls=dict(tls): _WithTls(case, tls))
            _fuzz_one(strategy, label, report, base_url, examples, dict(headers or {}), check, excluded, timeout_s)
        report.seconds[label] = time.perf_counter() - started
    return report


class _WithTls:
    """A case whose requests (and schemathesis' re-sends) carry TLS settings. A wrapper, so the fuzzing
    function's source, from which hypothesis derives its seed, and thus every other run's examples
    stay as they were."""

    def __init__(self, case: Any, tls: Mapping[str, Any]) -> None:
        self._case, self._tls = case, tls

    def __getattr__(self, name: str) -> Any:
        return getattr(self._case, name)

    def call(self, **kwargs: Any) -> Any:
        return self._case.call(**kwargs, **self._tls)

    def validate_response(self, response: Any, **kwargs: Any) -> None:
        kwargs["transport_kwargs"] = {**(kwargs.get("transport_kwargs") or {}), **self._tls}
        self._case.validate_response(response, **kwargs)


def _fuzz_one(strategy, label, report, base_url, examples, headers, check, excluded, timeout_s) -> None:
    seen: set[str] = set()

    @hypothesis.settings(
        max_examples=examples,
        derandomize=True,  # seeded: the same requests every run
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report, don't minimise
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(strategy)
    def one(case) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=timeout_s)
        report.sent[label] += 1
        report.statuses[label].add(response.status_code)
        problems = []
        if STACK_TRACE.search(response.text or ""):
            problems.append(f"stack trace in a {response.status_code} body")
        if check is not None and (extra := check(label, response)):
            problems.append(extra)
        try:
            case.validate_response(
                response, headers=headers, excluded_checks=excluded, transport_kwargs={"base_url": base_url}
            )
        except (FailureGroup, Exception) as exc:
            sent = repr(case.body)[:80] if not isinstance(case.body, NotSet) else repr(dict(case.query or {}))[:80]
            problems.append(f"{_describe(exc)} (status {response.status_code}; sent {sent})")
        for p in problems:
            if p not in seen:
                seen.add(p)
                report.failures.setdefault(label, []).append(p)

    with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # nothing to negate in this operation
        one()


UNDECLARED = ("PUT", "DELETE", "PATCH", "TRACE")


def undeclared_methods(schema_doc: Mapping, base_url: str, *, headers: Mapping[str, str] | None = None) -> list[str]:
    """Every documented path asked with methods its document does not declare: each must be a JSON
    405 whose ``Allow`` lists the declared methods (RFC 9110), with no stack trace. Schemathesis'
    coverage phase does the same (its ST204); this keeps it in the bounded pytest run."""
    problems = []
    for path, ops in schema_doc["paths"].items():
        url = base_url + re.sub(r"\{(\w+)\}", lambda m, ops=ops: _param_value(ops, m.group(1)), path)
        declared = {m.upper() for m in ops}
        for method in UNDECLARED:
            if method in declared:
                continue
            response = requests.request(method, url, headers=dict(headers or {}), timeout=20)
            allow = {m.strip() for m in response.headers.get("Allow", "").split(",") if m.strip()}
            if response.status_code != 405:
                problems.append(f"{method} {path}: {response.status_code}, not 405")
            elif not declared <= allow:
                problems.append(f"{method} {path}: 405 with Allow {sorted(allow)}, not {sorted(declared)}")
            elif not response.headers.get("Content-Type", "").startswith("application/json"):
                problems.append(f"{method} {path}: 405 is not JSON")
            if STACK_TRACE.search(response.text or ""):
                problems.append(f"{method} {path}: stack trace in the body")
    return problems


def _param_value(ops: Mapping, name: str) -> str:
    for op in ops.values():
        for param in op.get("parameters", ()):
            if param["name"] == name and param["in"] == "path":
                return str(param["schema"].get("enum", ["x"])[0])
    return "x"
