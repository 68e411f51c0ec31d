"""One request through the real Envoy is one connected trace at an in-test OTLP/HTTP collector: Envoy's
server span (and its upstream span), the processor's ``cohortgate.decide`` and the sidecar's
``cohortgate.infer`` with queue wait, batch size and inference time; no token anywhere. A request whose
traceparent says "not sampled" produces no span at all.

Envoy traces every request here (``--trace-sample 1``) so the trace starts at Envoy; the gateway and the
sidecar sample nothing on their own (ratio 0) and follow the traceparent Envoy hands them.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from cohortgate.deploy import pki
from tests.integration.conftest import ROOT, Client, GatewayProcess, free_port, mint
from tests.integration.test_observability import OtlpReceiver, wait_for

pytestmark = pytest.mark.integration

#: a loaded 2-core CI machine: the sidecar loads onnxruntime, Envoy and the gateway start
START_TIMEOUT_S = 90.0
#: the SDKs and Envoy export every second or so
EXPORT_TIMEOUT_S = 30.0

POLICY = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
routes:
  - name: tabular
    match: {{model: tabular, methods: [POST]}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [predict]
    cohorts:
      unit: {{claim: sub}}
      salt: tracing-test
    residency:
      source: {{claim: residency}}
      on_missing_region: fallback_control
    variants:
      - name: control
        weight: 100
        backends:
          - {{url: "{sidecar}", region: eu}}
"""


class Stack:
    def __init__(self, client: Client, certs: pki.CertPaths, otlp: OtlpReceiver, gateway: GatewayProcess) -> None:
        self.client, self.certs, self.otlp, self.gateway = client, certs, otlp, gateway


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, certs: pki.CertPaths) -> Iterator[Stack]:
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy.envoy import ProcessorAddress, TraceCollector, render
    from cohortgate.deploy.envoyproc import EnvoyProcess
    from sidecar.demo_models import build_models

    work = tmp_path_factory.mktemp("tracing")
    models = work / "models"
    build_models(models)
    otlp = OtlpReceiver()
    port = free_port()
    sidecar_log = (work / "sidecar.log").open("wb")
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "cohortgate.cli", "sidecar", "--model", str(models / "tabular-control.onnx"),
         "--name", "tabular", "--variant", "control", "--port", str(port), "--threads", "1",
         "--otlp-endpoint", otlp.url, "--trace-sample", "0"],
        stdout=sidecar_log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    policy = work / "policy.yaml"
    policy.write_text(POLICY.format(jwks=certs.jwks, sidecar=f"http://127.0.0.1:{port}"))
    sock = work / "run" / "processor.sock"
    gateway = GatewayProcess(policy, sock, "fast", work)
    gateway.cmd += ["--otlp-endpoint", otlp.url, "--trace-sample", "0"]
    try:
        import urllib.request

        def sidecar_ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
                return r.status == 200

        wait_for("the sidecar ready", sidecar_ready, START_TIMEOUT_S)
        gateway.start(timeout=START_TIMEOUT_S)
        files = render(
            load_policy(policy),
            certs=certs,
            out_dir=work / "envoy",
            processor=ProcessorAddress(uds=str(sock)),
            transport="grpc",
            listen_port=free_port(),
            admin_port=free_port(),
            tracing=TraceCollector.parse(otlp.url, 1.0),
        )
        with EnvoyProcess(files, log_path=work / "envoy.log", concurrency=1) as envoy:
            app_cert, app_key = certs.clients["app-demo"]
            client = Client(envoy.listen_port, certs.ca_cert, app_cert, app_key)
            yield Stack(client, certs, otlp, gateway)
            client.close()
    finally:
        gateway.stop()
        sidecar.terminate()
        sidecar.wait(30)
        sidecar_log.close()
        otlp.close()


def _body() -> bytes:
    x = np.zeros((3, 30), dtype=np.float32)
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def _services(spans: list[dict[str, Any]]) -> set[str]:
    return {s["service"] for s in spans}


def _connected(spans: list[dict[str, Any]], outside: str) -> dict[str, dict[str, Any]]:
    """Every span's parent is another span of the trace, or ``outside`` (the caller's own span)."""
    by_id = {s["span_id"]: s for s in spans}
    for span in spans:
        assert span["parent_span_id"] in by_id or span["parent_span_id"] == outside, (span, spans)
    return by_id


def _no_secrets(spans: list[dict[str, Any]], token: str, subject: str) -> None:
    text = json.dumps(spans)
    assert token not in text and token.split(".")[1] not in text and subject not in text


def _check_infer(infer: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> None:
    assert by_id[infer["parent_span_id"]]["service"] == "cohortgate-envoy"  # Envoy's upstream span
    attrs = infer["attributes"]
    assert attrs["cohortgate.variant"] == "control" and attrs["cohortgate.rows"] == 3
    assert attrs["cohortgate.batch_rows"] >= 3 and attrs["cohortgate.batch_requests"] >= 1
    assert attrs["cohortgate.queue_wait_s"] >= 0 and attrs["cohortgate.inference_s"] > 0
    assert attrs["http.response.status_code"] == 200


def _whole(spans: list[dict[str, Any]], services: set[str], outside: str) -> list[dict[str, Any]] | None:
    """The trace once every service's spans are in and every parent is known (Envoy may export its
    ingress span a flush later than the spans that ended before it)."""
    ids = {s["span_id"] for s in spans} | {outside}
    return spans if services <= _services(spans) and all(s["parent_span_id"] in ids for s in spans) else None


def test_a_sampled_request_is_one_trace_of_envoy_processor_and_sidecar_spans(traced: Stack) -> None:
    """The caller's sampled traceparent: Envoy's server span is its child, the processor's span too
    (it reads the request's traceparent), and the sidecar's span hangs off Envoy's upstream span."""
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    token = mint(traced.certs, "trace-erin")
    reply = traced.client.request(token=token, body=_body(), headers={"traceparent": f"00-{trace}-{parent}-01"})
    assert reply.status == 200, reply.body
    wanted = {"cohortgate-envoy", "cohortgate-gateway", "cohortgate-sidecar"}
    spans = wait_for(
        "Envoy's, the processor's and the sidecar's spans in the caller's trace",
        lambda: _whole(traced.otlp.of_trace(trace), wanted, parent),
        EXPORT_TIMEOUT_S,
    )
    by_id = _connected(spans, parent)
    server = [s for s in spans if s["service"] == "cohortgate-envoy" and s["parent_span_id"] == parent]
    assert len(server) == 1  # Envoy's ingress span, the caller's child
    decide = next(s for s in spans if s["name"] == "cohortgate.decide")
    assert decide["attributes"]["cohortgate.decision"] == "allow"
    assert decide["attributes"]["cohortgate.route"] == "tabular"
    assert decide["attributes"]["cohortgate.variant"] == "control"
    _check_infer(next(s for s in spans if s["name"] == "cohortgate.infer"), by_id)
    _no_secrets(spans, token, "trace-erin")


def _complete(spans: list[dict[str, Any]], infer: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The trace once Envoy's spans are in: the sidecar's parent and a root."""
    ids = {s["span_id"] for s in spans}
    return spans if infer["parent_span_id"] in ids and any(not s["parent_span_id"] for s in spans) else None


def test_envoy_starts_a_trace_the_processor_and_sidecar_join(traced: Stack) -> None:
    """No traceparent from the client: Envoy (sampling 100 % here) starts the trace; the processor's
    span joins it through the ext_proc stream's gRPC metadata (where Envoy puts its own trace
    context), the sidecar's as the child of Envoy's upstream span; the trace has exactly one root."""
    token = mint(traced.certs, "trace-gina")
    before = {s["span_id"] for s in list(traced.otlp.spans)}
    reply = traced.client.request(token=token, body=_body())
    assert reply.status == 200, reply.body
    (infer,) = wait_for(
        "the sidecar's span",
        lambda: [s for s in list(traced.otlp.spans) if s["name"] == "cohortgate.infer" and s["span_id"] not in before],
        EXPORT_TIMEOUT_S,
    )
    spans = wait_for(
        "Envoy's spans in the sidecar's trace",
        lambda: _complete(traced.otlp.of_trace(infer["trace_id"]), infer),
        EXPORT_TIMEOUT_S,
    )
    by_id = _connected(spans, "")
    assert [s["service"] for s in spans if not s["parent_span_id"]] == ["cohortgate-envoy"]
    _check_infer(infer, by_id)
    decide = wait_for(
        "the processor's span in Envoy's trace",
        lambda: [s for s in traced.otlp.of_trace(infer["trace_id"]) if s["name"] == "cohortgate.decide"],
        EXPORT_TIMEOUT_S,
    )
    assert len(decide) == 1 and decide[0]["attributes"]["cohortgate.variant"] == "control"
    spans = traced.otlp.of_trace(infer["trace_id"])
    envoy_ids = {s["span_id"] for s in spans if s["service"] == "cohortgate-envoy"}
    assert decide[0]["parent_span_id"] in envoy_ids  # a child of Envoy's ext_proc call span
    _no_secrets(spans, token, "trace-gina")


def test_an_unsampled_traceparent_produces_no_span_anywhere(traced: Stack) -> None:
    unsampled = secrets.token_hex(16)
    token = mint(traced.certs, "trace-frank")
    reply = traced.client.request(
        token=token, body=_body(), headers={"traceparent": f"00-{unsampled}-{secrets.token_hex(8)}-00"}
    )
    assert reply.status == 200
    # a sampled request after it: once its spans are in, the exporters have flushed past the first
    sampled = secrets.token_hex(16)
    reply = traced.client.request(
        token=token, body=_body(), headers={"traceparent": f"00-{sampled}-{secrets.token_hex(8)}-01"}
    )
    assert reply.status == 200
    wait_for("the sampled request's sidecar span", lambda: [s for s in traced.otlp.of_trace(sampled) if s["name"] == "cohortgate.infer"], EXPORT_TIMEOUT_S)  # fmt: skip  # noqa: E501
    time.sleep(2.0)  # one more export interval of every exporter
    assert traced.otlp.of_trace(unsampled) == []
