"""The processor's trace span: a child of the request's traceparent, with the decision's routing facts and
never a token; parent-based sampling; and nothing at all when tracing is off (opentelemetry not even
imported). The SDK's in-memory exporter stands in for the collector here; the OTLP wire is tested
end to end in tests/integration/test_observability.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cohortgate.core.policy import Policy
from cohortgate.deploy import pki
from cohortgate.support.tracing import Tracing, trace_id
from gateway.extproc import Processor, ProcessorSettings
from gateway.service import PolicyHolder, build_verifier
from tests.gateway.test_extproc import SALT, envoy_json, infer, make_policy, request, token
from tests.needs import import_or_missing

ROOT = Path(__file__).resolve().parents[2]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{PARENT}-01"
UNSAMPLED = f"00-{TRACE}-{PARENT}-00"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("tracing") / "certs", clients=())


@pytest.fixture(scope="module")
def policy(certs: pki.CertPaths) -> Policy:
    return make_policy(certs)


@pytest.fixture(scope="module")
def verifier(policy: Policy) -> Any:
    return build_verifier(policy.jwt)


class Traced:
    def __init__(self, policy: Policy, verifier: Any, ratio: float) -> None:
        memory = import_or_missing("opentelemetry.sdk.trace.export.in_memory_span_exporter")
        self.exporter = memory.InMemorySpanExporter()
        self.tracing = Tracing("gateway", None, ratio, exporter=self.exporter)
        self.engine = Processor(
            PolicyHolder(policy), verifier, ProcessorSettings(unit_salt=SALT, max_body_bytes=1000), tracing=self.tracing
        )

    def spans(self) -> list[Any]:
        self.tracing.provider.force_flush()
        return list(self.exporter.get_finished_spans())


@pytest.fixture
def traced(policy: Policy, verifier: Any) -> Any:
    t = Traced(policy, verifier, ratio=0.0)
    yield t
    t.tracing.shutdown()


def test_an_allowed_request_is_a_child_span_with_its_route_and_variant(traced: Traced, certs: pki.CertPaths) -> None:
    auth = "Bearer " + token(certs, "user-1")
    resp = traced.engine.new_processor().handle(request(infer(auth, traceparent=SAMPLED)))
    assert resp is not None and resp.WhichOneof("response") == "request_headers"
    (span,) = traced.spans()
    assert span.name == "cohortgate.decide"
    assert format(span.context.trace_id, "032x") == TRACE
    assert format(span.parent.span_id, "016x") == PARENT
    attrs = dict(span.attributes)
    assert attrs["cohortgate.decision"] == "allow"
    assert attrs["cohortgate.route"] == "tabular"
    assert attrs["cohortgate.variant"] == "control"  # user-1 is bucket 2350: control (test_extproc)
    assert not any(auth.split()[1] in str(v) or "user-1" in str(v) for v in attrs.values())
    assert span.start_time <= span.end_time


def test_a_denial_carries_its_code(traced: Traced) -> None:
    traced.engine.handle_json(envoy_json(request(infer("Bearer not-a-jwt", traceparent=SAMPLED))))
    (span,) = traced.spans()
    attrs = dict(span.attributes)
    assert attrs["cohortgate.decision"] == "deny"
    assert attrs["cohortgate.denial_code"] == "unauthenticated"
    assert attrs["http.response.status_code"] == 401
    assert "not-a-jwt" not in str(attrs)


def test_sampling_follows_the_parent_then_the_ratio(policy: Policy, verifier: Any, certs: pki.CertPaths) -> None:
    auth = "Bearer " + token(certs, "user-1")
    never = Traced(policy, verifier, ratio=0.0)
    never.engine.new_processor().handle(request(infer(auth, traceparent=UNSAMPLED)))
    never.engine.new_processor().handle(request(infer(auth)))
    assert never.spans() == []  # an unsampled parent, and no parent at ratio 0
    always = Traced(policy, verifier, ratio=1.0)
    always.engine.new_processor().handle(request(infer(auth)))
    (root,) = always.spans()
    assert root.parent is None  # no traceparent: a root span of its own trace
    for t in (never, always):
        t.tracing.shutdown()


def test_answers_are_the_same_with_and_without_tracing(
    traced: Traced, policy: Policy, verifier: Any, certs: pki.CertPaths
) -> None:
    plain = Processor(PolicyHolder(policy), verifier, ProcessorSettings(unit_salt=SALT, max_body_bytes=1000))
    for auth in ("Bearer " + token(certs, "user-7"), None, "Bearer junk"):
        req = request(infer(auth, traceparent=SAMPLED))
        assert traced.engine.new_processor().handle(req) == plain.new_processor().handle(req)
    assert "traceparent" not in plain._wanted and "traceparent" in traced.engine._wanted


class ListAudit:
    def __init__(self) -> None:
        self.entries: list[tuple[Any, ...]] = []

    def record(self, entry: tuple[Any, ...]) -> None:
        self.entries.append(entry)


def test_audit_entries_carry_the_trace_id_only_when_tracing(
    traced: Traced, policy: Policy, verifier: Any, certs: pki.CertPaths
) -> None:
    auth = "Bearer " + token(certs, "user-1")
    on, off = ListAudit(), ListAudit()
    traced.engine.audit = on
    plain = Processor(PolicyHolder(policy), verifier, ProcessorSettings(unit_salt=SALT, max_body_bytes=1000), off)
    for engine in (traced.engine, plain):
        engine.new_processor().handle(request(infer(auth, traceparent=UNSAMPLED)))  # logged even if not sampled
        engine.new_processor().handle(request(infer(None, traceparent=SAMPLED)))
        engine.new_processor().handle(request(infer(auth)))
    assert [e.trace_id for e in on.entries[:2]] == [TRACE, TRACE]
    assert on.entries[2].trace_id is None  # no traceparent: no trace id (the line has no trace field)
    assert all(e.trace_id is None for e in off.entries)  # tracing off


def test_off_means_opentelemetry_is_never_imported() -> None:
    """A gateway without --otlp-endpoint builds its engine and answers without loading opentelemetry."""
    code = (
        "import sys\n"
        "from gateway.service import GatewayConfig, _tracing\n"
        "from gateway.extproc import Processor\n"
        "assert _tracing(GatewayConfig(policy_path='p.yaml')) is None\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'opentelemetry imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_trace_id_of_a_traceparent() -> None:
    assert trace_id(SAMPLED) == TRACE
    assert trace_id(None) is None
    assert trace_id("00-" + "0" * 32 + f"-{PARENT}-01") is None
    assert trace_id("garbage") is None
    with pytest.raises(ValueError, match="ratio"):
        Tracing("gateway", None, 1.5)
