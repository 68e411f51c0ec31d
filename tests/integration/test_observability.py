"""A real Prometheus scrapes a running gateway, controller and Envoy, loads the rendered alerting rules,
and raises the processor-down and fail-closed alerts when the gateway is killed; every metric name the
rules and the dashboard may use (`cohortgate.deploy.promql.EXPORTED`) is in some live scrape.

Prometheus scrapes and evaluates every second; alerts are asserted in their ``pending`` state, which
Prometheus enters at the first evaluation where the expression holds (``for:`` only delays ``firing``),
so the test needs seconds, not the rules' minutes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cohortgate.deploy import alerts, grafana, pki
from cohortgate.deploy.grafana_preview import fetch, page
from cohortgate.deploy.promql import CONTROLLER, ENVOY, EXPORTED, GATEWAY, SIDECAR
from tests.dashboard.harness import ControllerProc
from tests.integration.conftest import Client, GatewayProcess, free_port, mint
from tests.needs import missing

pytestmark = pytest.mark.integration

#: a loaded 2-core CI machine: Prometheus, Envoy, the gateway and the controller all start here
START_TIMEOUT_S = 60.0
ALERT_TIMEOUT_S = 60.0


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def names_in(exposition: str) -> set[str]:
    """Sample names a scrape offers as Prometheus stores them, plus those of labelled metrics with no
    child yet (only their ``# TYPE`` line is there)."""
    samples: set[str] = set()
    typed: dict[str, str] = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            typed[name] = kind
        elif line and not line.startswith("#"):
            samples.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))  # type: ignore[union-attr]
    names = set(samples)
    for name, kind in typed.items():
        expected = {
            "counter": [name if name.endswith("_total") else name + "_total"],
            "histogram": [name + suffix for suffix in ("_bucket", "_sum", "_count")],
        }.get(kind, [name])
        if not any(e in samples or name in samples for e in expected):
            names |= set(expected)
    return names


def wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"{what} not seen in {timeout}s (last: {last!r})")


class OtlpReceiver:
    """An OTLP/HTTP collector in the test: ``POST /v1/traces`` with an ExportTraceServiceRequest
    (protobuf), kept as decoded spans (trace id, parent span id, name, attributes)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self._body()
                ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf"
                if ok:
                    request = ExportTraceServiceRequest.FromString(body)
                    for rs in request.resource_spans:
                        service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                receiver.spans.append(
                                    {
                                        "service": service,
                                        "name": span.name,
                                        "trace_id": span.trace_id.hex(),
                                        "span_id": span.span_id.hex(),
                                        "parent_span_id": span.parent_span_id.hex(),
                                        "attributes": {a.key: _any_value(a.value) for a in span.attributes},
                                        "start": span.start_time_unix_nano,
                                        "end": span.end_time_unix_nano,
                                    }
                                )
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def _body(self) -> bytes:
                """Envoy's OTLP/HTTP exporter sends its body chunked; the SDKs give a length."""
                if "chunked" not in self.headers.get("transfer-encoding", ""):
                    return self.rfile.read(int(self.headers.get("content-length", 0)))
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return body

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_trace(self, trace: str) -> list[dict[str, Any]]:
        return [s for s in list(self.spans) if s["trace_id"] == trace]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _any_value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class Stack:
    def __init__(self, gateway: GatewayProcess, gateway_metrics: str, controller: ControllerProc, envoy: Any, client: Client, certs: pki.CertPaths, otlp: OtlpReceiver) -> None:  # fmt: skip  # noqa: E501
        self.otlp = otlp
        self.gateway = gateway
        self.gateway_metrics = gateway_metrics
        self.controller = controller
        self.envoy = envoy
        self.client = client
        self.certs = certs

    @property
    def envoy_admin(self) -> str:
        host, port = self.envoy.admin_address
        return f"{host}:{port}"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, certs: pki.CertPaths, policy_file: Path, upstreams: Any
) -> Iterator[Stack]:
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy.envoy import ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess

    work = tmp_path_factory.mktemp("observability")
    sock = work / "run" / "processor.sock"
    gateway = GatewayProcess(policy_file, sock, "fast", work)
    metrics_addr = f"127.0.0.1:{free_port()}"
    otlp = OtlpReceiver()
    # traced: only requests whose traceparent says sampled (ratio 0 for the rest)
    gateway.cmd += [
        "--metrics",
        metrics_addr,
        "--log-format",
        "ecs",
        "--otlp-endpoint",
        otlp.url,
        "--trace-sample",
        "0",
    ]
    controller = ControllerProc(work / "controller")
    controller.cmd += ["--log-format", "ecs"]
    gateway.start(timeout=START_TIMEOUT_S)
    try:
        controller.start(timeout_s=START_TIMEOUT_S)
        files = render(
            load_policy(policy_file),
            certs=certs,
            out_dir=work / "envoy",
            processor=ProcessorAddress(uds=str(sock)),
            transport="grpc",
            listen_port=free_port(),
            admin_port=free_port(),
        )
        with EnvoyProcess(files, log_path=work / "envoy.log", concurrency=1) as envoy:
            app_cert, app_key = certs.clients["app-demo"]
            client = Client(envoy.listen_port, certs.ca_cert, app_cert, app_key)
            yield Stack(gateway, metrics_addr, controller, envoy, client, certs, otlp)
            client.close()
    finally:
        controller.stop()
        gateway.stop()
        otlp.close()


def test_every_name_the_rules_and_dashboard_use_is_exported(stack: Stack) -> None:
    """Scrape each running part; `EXPORTED` (what rules and dashboard may name) must all be there."""
    assert stack.client.request(token=mint(stack.certs, "obs-alice")).status == 200
    assert stack.client.request(token=None).status == 401  # a denial, counted by code
    gateway = names_in(get(f"http://{stack.gateway_metrics}/metrics").decode())
    controller = names_in(get(f"{stack.controller.api}/metrics").decode())
    status, body = stack.envoy.admin_get("/stats/prometheus")
    assert status == 200
    envoy = names_in(body.decode())

    from prometheus_client import CollectorRegistry, generate_latest

    from sidecar.metrics import SidecarMetrics

    sidecar_metrics = SidecarMetrics("tabular", CollectorRegistry())
    sidecar = names_in(generate_latest(sidecar_metrics.registry).decode())

    assert GATEWAY - gateway == set()
    assert CONTROLLER - controller == set()
    assert ENVOY - envoy == set()
    assert SIDECAR - sidecar == set()
    assert EXPORTED == GATEWAY | CONTROLLER | ENVOY | SIDECAR


def test_service_logs_and_audit_are_ecs(stack: Stack) -> None:
    """Started with --log-format ecs, every line the gateway and controller log and every audit line is
    an ECS document; the audit keeps subjects hashed."""
    assert stack.client.request(token=mint(stack.certs, "obs-carol")).status == 200
    assert stack.client.request(token=None).status == 401

    def audit_lines() -> list[dict[str, Any]]:
        return [json.loads(x) for x in stack.gateway.audit_path.read_text().splitlines()]

    docs = wait_for("two audit lines", lambda: (lambda d: d if len(d) >= 2 else None)(audit_lines()), 10)
    assert {d["event"]["outcome"] for d in docs} == {"success", "failure"}
    assert all(d["ecs.version"] and d["@timestamp"] and d["service"]["name"] == "cohortgate-gateway" for d in docs)
    assert "obs-carol" not in stack.gateway.audit_path.read_text()
    assert any(d.get("user", {}).get("id") for d in docs)
    for path, service in ((stack.gateway.log_path, "gateway"), (stack.controller.log_path, "controller")):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        assert lines, path
        for line in lines:
            doc = json.loads(line)  # every line is one JSON document
            assert doc["service"]["name"] == f"cohortgate-{service}", line
            assert {"@timestamp", "log.level", "message", "ecs.version"} <= doc.keys(), line


def test_a_traced_request_is_one_span_in_its_callers_trace(stack: Stack) -> None:
    """Through the real Envoy: the client's W3C traceparent reaches the processor, whose span (exported
    over OTLP/HTTP to the in-test collector) is the caller's child with the decision's facts; an
    unsampled traceparent produces no span."""
    import secrets

    unsampled, sampled = secrets.token_hex(16), secrets.token_hex(16)
    parent = secrets.token_hex(8)
    token = mint(stack.certs, "obs-dave")
    reply = stack.client.request(token=token, headers={"traceparent": f"00-{unsampled}-{parent}-00"})
    assert reply.status == 200
    reply = stack.client.request(token=token, headers={"traceparent": f"00-{sampled}-{parent}-01"})
    assert reply.status == 200
    denied = stack.client.request(token=None, headers={"traceparent": f"00-{sampled}-{parent}-01"})
    assert denied.status == 401
    spans = wait_for("two spans of the sampled trace", lambda: (lambda s: s if len(s) >= 2 else None)(stack.otlp.of_trace(sampled)), 30)  # fmt: skip  # noqa: E501
    time.sleep(1.5)  # one more export interval: nothing else may arrive for either trace
    spans = stack.otlp.of_trace(sampled)
    assert len(spans) == 2
    assert stack.otlp.of_trace(unsampled) == []
    allowed = next(s for s in spans if s["attributes"]["cohortgate.decision"] == "allow")
    deny = next(s for s in spans if s["attributes"]["cohortgate.decision"] == "deny")
    for span in spans:
        assert span["name"] == "cohortgate.decide"
        assert span["parent_span_id"] == parent
        assert span["service"] == "cohortgate-gateway"
        assert 0 < span["start"] <= span["end"]
        assert token not in json.dumps(span) and "obs-dave" not in json.dumps(span)
    assert allowed["attributes"]["cohortgate.route"] == "tabular"
    assert allowed["attributes"]["cohortgate.variant"] in {"control", "canary"}
    assert deny["attributes"]["cohortgate.denial_code"] == "unauthenticated"
    # the ECS audit lines of both requests name the trace
    audit = [json.loads(x) for x in stack.gateway.audit_path.read_text().splitlines()]
    assert sorted(d["event"]["outcome"] for d in audit if d.get("trace", {}).get("id") == sampled) == [
        "failure",
        "success",
    ]


def test_prometheus_scrapes_the_stack_and_raises_processor_alerts(stack: Stack, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        missing("prometheus is not installed (make system-deps installs Debian's prometheus package)")
    (tmp_path / "rules.yaml").write_text(alerts.render())
    scrape = json.loads(json.dumps(__import__("yaml").safe_load(alerts.scrape_config(
        gateway=[stack.gateway_metrics],
        controller=[stack.controller.api.removeprefix("http://")],
        sidecar=[],
        envoy=[stack.envoy_admin],
    ))))  # fmt: skip
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": ["rules.yaml"],
        **scrape,
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    log.close()

    def query(q: str) -> list[dict[str, Any]]:
        doc = json.loads(get(f"{api}/query?" + urllib.parse.urlencode({"query": q})))
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def tail() -> str:
        return (tmp_path / "prometheus.log").read_text()[-3000:]

    try:
        # all three targets up, and every rule loaded and evaluating without error
        wait_for("3 targets up", lambda: len(query("up == 1")) == 3, START_TIMEOUT_S)
        rules = json.loads(get(f"{api}/rules"))["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} == {r.alert for r in alerts.rules()}
        wait_for("rules evaluated", lambda: all(r.get("lastEvaluation", "").startswith("20") for r in json.loads(get(f"{api}/rules"))["data"]["groups"][0]["rules"]), 20)  # fmt: skip  # noqa: E501
        errors = [(r["name"], r.get("lastError")) for r in json.loads(get(f"{api}/rules"))["data"]["groups"][0]["rules"] if r["health"] != "ok"]  # fmt: skip  # noqa: E501
        assert errors == []
        assert query("ALERTS") == [], "an alert on a healthy stack"
        # the Grafana dashboard's own queries, as Grafana would send them, answer with data for the
        # panels this stack feeds (no sidecar and no access log to the controller here: those stay
        # empty); the weights panel (and the dashboard's route/variant lists) read a gauge that a
        # gateway without a state store did not export before
        for _ in range(20):
            assert stack.client.request(token=mint(stack.certs, "obs-grafana")).status == 200
        fed = {"Routing decisions by variant", "Effective weights", "Fail-closed and processor errors"}

        def preview() -> list[Any] | None:
            panels = fetch(f"http://127.0.0.1:{port}", grafana.dashboard(), end=time.time(), range_s=120, step_s=2)
            return panels if fed <= {p.title for p in panels if p.has_data} else None

        panels = wait_for("the dashboard's panels with data", preview, START_TIMEOUT_S)
        (tmp_path / "preview.html").write_text(page(panels))
        assert "No data" in (tmp_path / "preview.html").read_text()  # the sidecar panels
        # the processor dies: Envoy answers 503 (fail-closed) and both alerts go pending
        stack.gateway.kill()
        deadline = time.monotonic() + ALERT_TIMEOUT_S
        pending: set[str] = set()
        while time.monotonic() < deadline and not {"CohortgateProcessorDown", "CohortgateFailClosed"} <= pending:
            assert stack.client.request(token=mint(stack.certs, "obs-bob")).status == 503
            pending = {a["metric"]["alertname"] for a in query("ALERTS")}
            time.sleep(0.5)
        assert {"CohortgateProcessorDown", "CohortgateFailClosed"} <= pending, tail()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
