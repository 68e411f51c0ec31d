"""Online features end to end (issue 22): a client's request through real Envoy (mTLS), the gateway process
(JWT verified, the entity taken from the claim the policy names) and a real `cohortgate sidecar` process
(onnxruntime) started with the argv `cohortgate up`'s plan and recipe give it (``--features-policy``,
``--features-route``), joining from a real redis-server that holds the bytes Feast itself wrote
(``tests/sidecar/fixtures/feast_redis.json``, re-stamped to now). Its reports go to a real
`cohortgate controller`, which counts the fallbacks per variant in its sliding window.

The primary is an Identity graph over 7 columns, the fallback one over 2, so an answer shows exactly what the
model was given: the client's two columns and the entity's joined ones, or the client's own on a fallback.
One transport (grpc): the entity header is set by the transport-free processor (tests/gateway/test_feature_entity.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cohortgate.core.contract import HEADER_ENTITY, HEADER_FEATURES
from cohortgate.deploy import pki
from cohortgate.local.plan import sidecar_specs
from cohortgate.local.recipes import Layout, sidecar_recipe
from tests.integration.conftest import ROOT, Client, edge, free_port, mint
from tests.sidecar.test_feature_join import JOINED_1001, VIEWS, identity
from tests.sidecar.test_feature_join import store as store  # the redis-server fixture, reused
from tests.sidecar.test_features import FIXTURE

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 90.0  # generous: a busy 2-core CI box starting onnxruntime and a store connection
REPORT_TIMEOUT_S = 60.0  # a report's way to the controller: the sidecar's flush, then the controller's ingest
CONTROLLER_WINDOW_S = 600.0  # the fallback rate's window: long enough that a slow box sees its reports in it

POLICY = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
  leeway_s: 5
response_headers: true
routes:
  - name: shop
    match: {{model: shop, methods: [GET, POST]}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [predict]
    cohorts:
      unit: {{claim: sub}}
      salt: features-e2e
    residency:
      default_region: eu
    variants:
      - name: personal
        weight: 100
        backends: [{{url: "http://127.0.0.1:{port}", region: eu, model: models/personal.onnx}}]
    features:
      store: {store}
      project: {project}
      join_key: {join_key}
      entity: {{claim: sub}}
      entity_type: int64
      views: [{views}]
      budget_ms: 10000          # generous: a busy CI box must not turn a read into over_budget
      max_age_s: 3600
      fallback: {{model: models/global.onnx}}
"""


def up_layout(work: Path, controller_port: int) -> Layout:
    """What `up` would pass its sidecars: reports to the controller's /reports, with its token file."""
    ports = {"controller": controller_port, "dashboard": 0, "gateway_metrics": 0, "envoy": 0}
    return Layout(work, work, ports, "", "", work / "policy.json", work / "policy.json", python=sys.executable)


class Child:
    """A ``cohortgate`` child process, ready when ``ready_url`` answers 200 (``headers`` sent)."""

    def __init__(self, argv: list[str], env: Mapping[str, str], ready_url: str, log_path: Path) -> None:
        self.argv, self.env, self.ready_url, self.log_path = argv, env, ready_url, log_path
        self.headers: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        with open(self.log_path, "ab") as log:
            env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.argv[3]} exited {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(urllib.request.Request(self.ready_url, headers=self.headers), timeout=5):
                    return self
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.argv[3]} not ready after {READY_TIMEOUT_S}s:\n{self.log_path.read_text()[-4000:]}")

    def get(self, path: str) -> bytes:
        base = self.ready_url.split("/", 3)
        req = urllib.request.Request(f"{base[0]}//{base[2]}{path}", headers=self.headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()

    def metrics(self) -> str:
        return self.get("/metrics").decode()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Stack:
    client: Client
    sidecar: Child
    controller: Child  # a real `cohortgate controller`, fed by the sidecar's reports
    certs: pki.CertPaths


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, certs: pki.CertPaths, store: str) -> Iterator[Stack]:
    from cohortgate.core.policy import load_policy

    work = tmp_path_factory.mktemp("features-e2e")
    (work / "models").mkdir()
    identity(work / "models" / "personal.onnx", 7)  # the policy names both relative to its own file
    identity(work / "models" / "global.onnx", 2)
    port = free_port()
    policy_file = work / "policy.yaml"
    policy_file.write_text(
        POLICY.format(
            jwks=certs.jwks,
            port=port,
            store=store,
            project=FIXTURE["project"],
            join_key=FIXTURE["join_key"],
            views=", ".join(VIEWS),
        )
    )
    policy = load_policy(policy_file)
    layout = up_layout(work, free_port())
    controller = Child(
        [
            *layout.cli(
                "controller", "--policy", str(policy_file), "--listen", layout.controller_api[len("http://") :]
            ),
            *("--token-file", str(layout.token_file), "--state-file", str(layout.state_file), "--dashboard", "off"),
            *("--window", f"{CONTROLLER_WINDOW_S:g}s"),
        ],
        {},
        f"{layout.controller_api}/healthz",
        work / "controller.log",
    )
    # The sidecar runs exactly as `cohortgate up` would start it: its plan and recipe give the features flags.
    (spec,) = sidecar_specs(policy)
    recipe = sidecar_recipe(spec, port, layout)
    assert "--features-policy" in recipe.argv and "--features-route" in recipe.argv
    sidecar = Child(list(recipe.argv), recipe.env, f"{recipe.endpoint}/v2/health/ready", work / "sidecar.log")
    try:
        controller.start()  # first: it writes the admin token file the sidecar's reports carry
        controller.headers = {"Authorization": f"Bearer {layout.token_file.read_text().strip()}"}
        sidecar.start()
        with edge(policy_file, certs, work) as e:
            yield Stack(e.client, sidecar, controller, certs)
    finally:
        sidecar.stop()
        controller.stop()


def infer(client: Client, token: str, rows: list[list[float]], headers: dict[str, str] | None = None) -> Any:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(rows), 2], "data": rows}]}
    return client.request("/v2/models/shop/infer", token=token, body=json.dumps(body).encode(), headers=headers)


def output(reply: Any) -> list[float]:
    assert reply.status == 200, reply.body
    return reply.json()["outputs"][0]["data"]


def approx(values: list[float]) -> Any:
    return pytest.approx(values, rel=1e-6)


def fallbacks(sidecar: Child, reason: str) -> float:
    line = f'cohortgate_sidecar_feature_fallbacks_total{{model="shop",reason="{reason}"}} '
    (value,) = [x[len(line) :] for x in sidecar.metrics().splitlines() if x.startswith(line)]
    return float(value)


def test_the_entity_comes_from_the_verified_claim_and_its_features_are_joined(stack: Stack) -> None:
    reply = infer(stack.client, mint(stack.certs, "1001"), [[1.0, 2.0], [3.0, 4.0]])
    assert reply.headers[HEADER_FEATURES] == "joined"
    assert reply.headers["x-cohortgate-variant"] == "personal"
    # what Feast's own get_online_features answered for user 1001, appended to every row
    assert output(reply) == approx([1.0, 2.0, *JOINED_1001, 3.0, 4.0, *JOINED_1001])


def controller_features(stack: Stack, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The controller's per-variant fallback counts of route shop, once ``until`` holds (polled)."""
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    while True:
        personal = json.loads(stack.controller.get("/status"))["routes"]["shop"]["features"]["personal"]
        if until(personal) or time.monotonic() > deadline:
            return personal
        time.sleep(0.2)


def test_an_entity_missing_in_the_store_gets_the_fallback_and_is_counted(stack: Stack) -> None:
    before = fallbacks(stack.sidecar, "missing")
    reply = infer(stack.client, mint(stack.certs, "9999"), [[5.0, 6.0]])  # no row for user 9999
    assert reply.headers[HEADER_FEATURES] == "fallback:missing"
    assert output(reply) == approx([5.0, 6.0])  # the global model's answer on the client's own columns
    assert fallbacks(stack.sidecar, "missing") == before + 1
    # the reason rides in the sidecar's report: the controller counts it for the variant, in its window
    personal = controller_features(stack, lambda p: p["reasons"].get("missing", 0) >= 1)
    assert personal["reasons"].get("missing", 0) >= 1 and personal["window_s"] == CONTROLLER_WINDOW_S
    assert personal["fallbacks"] <= personal["reports"] and 0 < personal["rate"] <= 1


def test_a_client_sent_entity_header_cannot_choose_whose_features_are_joined(stack: Stack) -> None:
    client, certs = stack.client, stack.certs
    # user 9999 (no row) asks for 1001's features: the gateway strips the header and sets the claim's id
    before = fallbacks(stack.sidecar, "missing")
    reply = infer(client, mint(certs, "9999"), [[5.0, 6.0]], headers={HEADER_ENTITY: "1001"})
    assert (reply.headers[HEADER_FEATURES], output(reply)) == ("fallback:missing", approx([5.0, 6.0]))
    assert fallbacks(stack.sidecar, "missing") == before + 1
    # user 1001 naming another entity still gets its own features
    reply = infer(client, mint(certs, "1001"), [[1.0, 2.0]], headers={HEADER_ENTITY: "1004"})
    assert (reply.headers[HEADER_FEATURES], output(reply)) == ("joined", approx([1.0, 2.0, *JOINED_1001]))


def test_model_metadata_through_the_gateway_says_what_a_client_sends(stack: Stack) -> None:
    reply = stack.client.request("/v2/models/shop", token=mint(stack.certs, "1001"), method="GET")
    assert reply.status == 200, reply.body
    meta = reply.json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]  # not the primary's [-1, 7]
    assert meta["parameters"]["features"]["joined_columns"] == len(JOINED_1001)
