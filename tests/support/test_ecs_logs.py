"""``--log-format ecs``: service logs through Elastic's ecs-logging formatter, and the gateway's audit
trail mapped to ECS with subjects still hashed.

The allowed values below are ECS's own (https://www.elastic.co/guide/en/ecs/current/ecs-allowed-values-event-*.html);
a document using another value is rejected by Elastic's ingest pipelines that validate categorisation.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from cohortgate.support import logs
from gateway.audit import AuditLog

ECS_EVENT_KIND = {"alert", "enrichment", "event", "metric", "state", "pipeline_error", "signal"}
ECS_EVENT_CATEGORY = {
    "api", "authentication", "configuration", "database", "driver", "email", "file", "host", "iam",
    "intrusion_detection", "library", "malware", "network", "package", "process", "registry", "session",
    "threat", "vulnerability", "web",
}  # fmt: skip
ECS_EVENT_TYPE = {
    "access", "admin", "allowed", "change", "connection", "creation", "deletion", "denied", "end", "error",
    "group", "indicator", "info", "installation", "protocol", "start", "user",
}  # fmt: skip
ECS_EVENT_OUTCOME = {"failure", "success", "unknown"}


@pytest.fixture
def root_logging() -> Iterator[None]:
    """`configure` replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_service_log_lines_are_ecs(root_logging: None) -> None:
    out = io.StringIO()
    logs.configure("controller", "info", "ecs", stream=out)
    log = logging.getLogger("cohortgate.test")
    log.info("rolled back %s", "tabular/canary", extra={"trace.id": "4bf92f3577b34da6a3ce929d0e0e4736"})
    try:
        raise ValueError("bad weights")
    except ValueError:
        log.exception("cannot apply")
    log.debug("not at info")
    first, second = (orjson.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "rolled back tabular/canary"
    assert first["log.level"] == "info"
    assert first["ecs.version"] == logs.ECS_VERSION
    assert first["service"] == {"name": "cohortgate-controller", "type": "cohortgate"}
    assert first["event"]["dataset"] == "cohortgate.controller"
    assert first["trace"]["id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert first["log"]["logger"] == "cohortgate.test"
    dt.datetime.fromisoformat(first["@timestamp"].replace("Z", "+00:00"))
    assert second["error"]["type"] == "ValueError"
    assert second["error"]["message"] == "bad weights"
    assert "raise ValueError" in second["error"]["stack_trace"]


def test_ecs_version_is_the_formatters() -> None:
    """The audit documents claim the same ECS version as the service logs."""
    import ecs_logging

    assert logs.ECS_VERSION == ecs_logging.ECS_VERSION


def test_text_stays_the_default(root_logging: None) -> None:
    out = io.StringIO()
    logs.configure("gateway", "info", stream=out)
    logging.getLogger("cohortgate.test").warning("plain")
    assert out.getvalue().rstrip().endswith("WARNING cohortgate.test: plain")
    with pytest.raises(ValueError, match="log format 'xml'"):
        logs.configure("gateway", "info", "xml")


def _audit(log_format: str, *entries: tuple) -> list[dict]:
    buf = io.BytesIO()
    audit = AuditLog(buf, lambda sub: f"h:{len(sub)}", log_format=log_format)
    for entry in entries:
        audit.record(entry)
    audit.flush()
    audit.close()
    return [orjson.loads(line) for line in buf.getvalue().splitlines()]


ALLOW = (1764780000.5, "req-1", "spiffe://cohortgate.local/app-demo", "alice", "tabular", "canary", "eu", "allow", "bucket", 200, ("challenger",))  # fmt: skip  # noqa: E501
DENY = (1764780001.0, "req-2", None, "mallory", "tabular", None, None, "deny", "invalid_token", 401, ())
ERROR = (1764780002.0, "", None, None, None, None, None, "error", "internal_error", 503, ())


def test_audit_records_map_to_ecs_with_subjects_hashed() -> None:
    allow, deny, error = _audit("ecs", ALLOW, DENY, ERROR)
    assert allow["@timestamp"] == "2025-12-03T16:40:00.500Z"
    assert allow["ecs.version"] == logs.ECS_VERSION
    assert allow["event"]["type"] == ["allowed"] and allow["event"]["outcome"] == "success"
    assert deny["event"]["type"] == ["denied"] and deny["event"]["outcome"] == "failure"
    assert deny["event"]["reason"] == "invalid_token"
    assert error["event"]["type"] == ["error"]
    assert allow["user"] == {"id": "h:5"}  # the hash, never the subject
    assert "alice" not in orjson.dumps(allow).decode() and "mallory" not in orjson.dumps(deny).decode()
    assert "user" not in error
    assert allow["client"]["user"]["id"] == "spiffe://cohortgate.local/app-demo"
    assert allow["http"] == {"request": {"id": "req-1"}, "response": {"status_code": 200}}
    assert deny["http"]["response"]["status_code"] == 401
    assert allow["cohortgate"] == {
        "route": "tabular",
        "variant": "canary",
        "region": "eu",
        "shadows": ["challenger"],
        "identity": "spiffe://cohortgate.local/app-demo",
    }
    assert allow["service"]["name"] == "cohortgate-gateway"
    for doc in (allow, deny, error):
        assert doc["event"]["kind"] in ECS_EVENT_KIND
        assert set(doc["event"]["category"]) <= ECS_EVENT_CATEGORY
        assert set(doc["event"]["type"]) <= ECS_EVENT_TYPE
        assert doc["event"]["outcome"] in ECS_EVENT_OUTCOME
        assert "trace" not in doc


def test_audit_trace_id_when_the_request_carried_one() -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    (ecs,) = _audit("ecs", (*ALLOW, trace))
    assert ecs["trace"] == {"id": trace}
    (plain,) = _audit("json", (*ALLOW, trace))
    assert plain["trace_id"] == trace


def test_plain_audit_lines_are_unchanged() -> None:
    (line,) = _audit("json", ALLOW)
    assert list(line) == ["time", "request_id", "identity", "subject", "route", "variant", "region", "outcome", "reason", "status", "shadows"]  # fmt: skip  # noqa: E501
    assert line["subject"] == "h:5"
    with pytest.raises(ValueError, match="audit format"):
        AuditLog(io.BytesIO(), str, log_format="xml")
