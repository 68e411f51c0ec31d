"""Model provenance end to end (issue 24): which artifact a decision was routed to, and which one answered.

Real parts: Envoy (mTLS, routing, the gRPC access log), the gateway process (its audit file names the
*routed* digest, from the compiled policy), a real `cohortgate sidecar` (onnxruntime) that answers with the
*served* digest and swaps its model live when its ``--model-file`` names another one, and a real
`cohortgate controller` that receives Envoy's access log on ``--als`` and keeps the served digest per
variant (GET /status ``routes[].models``, ``model_served`` audit records, the mismatch counter).

The swap is driven the way an operator (or, later, `cohortgate up`) does it: the policy's backend names
the new model file, and the sidecar's ``--model-file`` is rewritten. The policy edit goes first, so for a
while the gateway routes to the new digest while the sidecar still serves the old one: exactly the
mismatch the controller must count, and stop counting once the sidecar follows. The two models differ in
what they compute (Identity, then Neg), so an answer also shows which one served it.
One transport (grpc): the audit digest is transport-free (tests/gateway/test_audit_digest.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import onnx
import pytest
from onnx import TensorProto, helper

from cohortgate.core.contract import HEADER_MODEL_DIGEST
from cohortgate.deploy import pki
from tests.integration.conftest import Client, GatewayProcess, edge, free_port, mint
from tests.integration.test_features_e2e import Child

pytestmark = pytest.mark.integration

WAIT_S = 90.0  # generous: a reload, a swap or the access log's flush on a busy 2-core CI box
T = TypeVar("T")

POLICY = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
  leeway_s: 5
routes:
  - name: tabular
    match: {{model: tabular, methods: [POST]}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [predict]
    cohorts:
      unit: {{claim: sub}}
      salt: provenance-e2e
    residency:
      default_region: eu
    variants:
      - {{name: control, weight: 100, backends: [{{url: "http://127.0.0.1:{port}", region: eu, model: {model}}}]}}
"""


def model(path: Path, op: str) -> str:
    """A one-node FP32 [n, 2] -> [n, 2] graph; returns the file's ``sha256:<hex>`` (what the sidecar says)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], path.stem, [x], [y])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def until(probe: Callable[[], T], ok: Callable[[T], bool], what: str) -> T:
    """Poll ``probe`` until ``ok`` holds for its value (at most WAIT_S); the last value otherwise fails."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S:g}s; last seen {value!r}")
        time.sleep(0.2)


def write_policy(path: Path, certs: pki.CertPaths, port: int, name: str) -> str:
    """Point the backend at ``models/<name>.onnx``; returns the new policy's digest prefix (the gateway logs it)."""
    text = POLICY.format(jwks=certs.jwks, port=port, model=f"models/{name}.onnx")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a watcher never reads half a policy
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Stack:
    work: Path
    client: Client
    certs: pki.CertPaths
    gateway: GatewayProcess
    sidecar: Child
    controller: Child
    policy_file: Path
    model_file: Path  # the sidecar's --model-file: the reference it serves
    port: int  # the sidecar's
    digests: dict[str, str]  # "v1" (Identity) / "v2" (Neg) -> sha256:<hex>

    def write_policy(self, name: str) -> str:
        return write_policy(self.policy_file, self.certs, self.port, name)

    def audit(self) -> list[dict[str, Any]]:
        """The gateway's allowed decisions for route tabular, oldest first."""
        if not self.gateway.audit_path.exists():
            return []
        lines = [json.loads(x) for x in self.gateway.audit_path.read_text().splitlines() if x.strip()]
        return [x for x in lines if x.get("route") == "tabular" and x.get("outcome") == "allow"]

    def models(self) -> dict[str, Any]:
        """GET /status ``routes.tabular.models.control``: the routed and served digest of its backend."""
        control: dict[str, Any] = json.loads(self.controller.get("/status"))["routes"]["tabular"]["models"]["control"]
        return control

    def served_records(self) -> list[dict[str, Any]]:
        records = json.loads(self.controller.get("/audit?route=tabular&limit=1000"))["records"]
        return [r for r in reversed(records) if r["action"] == "model_served"]  # oldest first

    def infer(self, n: int, sub: str) -> list[list[float]]:
        """``n`` requests through Envoy; each answer's output (row [1, -2])."""
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, -2.0]}]}
        out = []
        for i in range(n):
            reply = self.client.request(token=mint(self.certs, f"{sub}-{i}"), body=json.dumps(body).encode())
            assert reply.status == 200, reply.body
            out.append(reply.json()["outputs"][0]["data"])
        return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, certs: pki.CertPaths) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("provenance-e2e")
    (work / "models").mkdir()
    (work / "run").mkdir()
    digests = {"v1": model(work / "models" / "v1.onnx", "Identity"), "v2": model(work / "models" / "v2.onnx", "Neg")}
    assert digests["v1"] != digests["v2"]
    port, api_port = free_port(), free_port()
    policy_file = work / "policy.yaml"
    model_file = work / "model.ref"
    model_file.write_text(f"{work / 'models' / 'v1.onnx'}\n")
    als = work / "run" / "als.sock"
    token_file = work / "admin.token"
    cli = [sys.executable, "-m", "cohortgate.cli"]
    controller_argv = [
        *(*cli, "controller", "--policy", str(policy_file), "--als", f"uds:{als}"),
        *("--listen", f"127.0.0.1:{api_port}", "--token-file", str(token_file), "--dashboard", "off"),
        *("--state-file", str(work / "state.json"), "--outcomes-journal", str(work / "outcomes.jsonl")),
        *("--watch-interval", "0.2"),  # follows the policy edit promptly
    ]
    controller = Child(controller_argv, {}, f"http://127.0.0.1:{api_port}/healthz", work / "controller.log")
    sidecar_argv = [
        *(*cli, "sidecar", "--model-file", str(model_file), "--name", "tabular", "--port", str(port)),
        *("--variant", "control", "--route", "tabular", "--threads", "1", "--model-cache", str(work / "cache")),
    ]
    sidecar = Child(sidecar_argv, {}, f"http://127.0.0.1:{port}/v2/health/ready", work / "sidecar.log")
    write_policy(policy_file, certs, port, "v1")
    try:
        controller.start()
        controller.headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        sidecar.start()
        with edge(policy_file, certs, work, access_log=als) as e:
            yield Stack(work, e.client, certs, e.gateway, sidecar, controller, policy_file, model_file, port, digests)
    finally:
        sidecar.stop()
        controller.stop()


def test_the_audit_line_and_the_served_digest_name_the_model_and_follow_a_swap(stack: Stack) -> None:
    v1, v2 = stack.digests["v1"], stack.digests["v2"]

    # 1. v1 routed and served: the audit line names its digest; the controller sees it served, no mismatch
    assert stack.infer(3, "first") == [[1.0, -2.0]] * 3  # Identity
    lines = until(stack.audit, lambda a: len(a) >= 3, "three audit lines")
    assert [x["model_digest"] for x in lines] == [v1] * 3
    control = until(stack.models, lambda m: m["requests"] >= 3, "the access log's three entries")
    assert control["backends"] == [
        {"routed": v1, "served": v1, "since": control["backends"][0]["since"], "requests": 3, "mismatched": 0}
    ]
    assert control["mismatched"] == 0
    (first,) = until(stack.served_records, lambda r: len(r) >= 1, "the first model_served record")
    assert (first["served_before"], first["served"], first["routed"]) == (None, v1, v1)

    # 2. the policy names v2; the sidecar has not followed yet: routed v2, served v1, each request a mismatch
    offset = stack.gateway.log_path.stat().st_size
    digest = stack.write_policy("v2")
    until(lambda: stack.gateway.tail(offset), lambda t: f"-> {digest}" in t, "the gateway's reload")
    until(lambda: stack.models()["backends"][0]["routed"], lambda r: r == v2, "the controller's reload")
    assert stack.infer(2, "edited") == [[1.0, -2.0]] * 2  # still Identity
    lines = until(stack.audit, lambda a: len(a) >= 5, "five audit lines")
    assert [x["model_digest"] for x in lines[3:]] == [v2] * 2  # the gateway's word: what it routes to
    control = until(stack.models, lambda m: m["requests"] >= 5, "the access log's five entries")
    assert (control["backends"][0]["served"], control["mismatched"]) == (v1, 2)
    metrics = stack.controller.metrics()
    assert 'cohortgate_controller_model_digest_mismatches_total{route="tabular",variant="control"} 2.0' in metrics

    # 3. the sidecar swaps to v2 (its --model-file names it): served follows, the mismatches stop
    stack.model_file.write_text(f"{stack.work / 'models' / 'v2.onnx'}\n")

    def sidecar_digest() -> str:
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]})
        req = urllib.request.Request(
            f"http://127.0.0.1:{stack.port}/v2/models/tabular/infer",
            data=body.encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return str(resp.headers[HEADER_MODEL_DIGEST])

    until(sidecar_digest, lambda d: d == v2, "the sidecar's swap")  # asked directly: not in Envoy's access log
    assert stack.infer(4, "swapped") == [[-1.0, 2.0]] * 4  # Neg
    lines = until(stack.audit, lambda a: len(a) >= 9, "nine audit lines")
    assert [x["model_digest"] for x in lines[5:]] == [v2] * 4
    control = until(stack.models, lambda m: m["requests"] >= 9, "the access log's nine entries")
    assert control["backends"][0]["routed"] == control["backends"][0]["served"] == v2
    assert (control["requests"], control["mismatched"]) == (9, 2)  # the four after the swap matched

    # one model_served record per change, not per request: v1 first seen, then v2
    records = until(stack.served_records, lambda r: len(r) >= 2, "the second model_served record")
    assert [(r["served_before"], r["served"], r["routed"]) for r in records] == [(None, v1, v1), (v1, v2, v2)]
    assert all(r["variant"] == "control" and r["backend"] == 0 for r in records)
