"""OIP gRPC clients through the gateway, end to end, with the stock ``tritonclient.grpc``.

Real parts: Envoy (mTLS with client certificates from the test PKI, HTTP/2 downstream), the gateway
process (grpc transport), two sidecars serving OIP v2 gRPC on their ``--grpc-port`` (control and a
100 % shadow, both ``protocol: grpc`` backends: Envoy speaks HTTP/2 to them), onnxruntime. The route
is matched by the request authority (``match.host``), KServe's way: a gRPC client's model name is in
the protobuf body. Denials reach the client as gRPC statuses with the processor's sentence; Envoy's own
error answers (a backend that cannot be reached) as gRPC statuses with the local-reply mapper's sentence.
Envoy's access log streams to the controller's real ALS receiver (its own event loop in a thread), and a
sidecar with ``--fault-rate`` shows a gRPC failure inside HTTP 200 counted by the controller's windows.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from cohortgate.controller.als import serve_als
from cohortgate.controller.loop import Controller
from cohortgate.controller.windows import is_error
from cohortgate.core.policy import Policy
from cohortgate.deploy import pki
from cohortgate.store.events import Event, InProcessSink
from cohortgate.store.state import InProcessState
from sidecar.server import SidecarConfig
from tests.integration.conftest import TRANSPORT_ARGS, GatewayProcess, free_port, mint
from tests.sidecar.sidecar_helpers import ThreadedSidecar, sidecar_in_thread

pytestmark = pytest.mark.integration

HOST = "tabular.models.example.com"

POLICY = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
  leeway_s: 5
routes:
  - name: tabular-grpc
    match: {{host: {host}}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [predict]
    cohorts:
      unit: {{claim: sub}}
    residency:
      source: {{claim: residency}}
      on_missing_region: deny
    variants:
      - {{name: control, weight: 100, backends: [{{url: "http://127.0.0.1:{control}", region: eu, protocol: grpc}}]}}
    shadows:
      - {{name: challenger, percent: 100, backends: [{{url: "http://127.0.0.1:{shadow}", region: eu, protocol: grpc}}]}}
  - name: down-grpc
    match: {{host: down.models.example.com}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
    residency:
      default_region: eu
    variants:
      - {{name: control, weight: 100, backends: [{{url: "http://127.0.0.1:{down}", region: eu, protocol: grpc}}]}}
  - name: flaky-grpc
    match: {{host: flaky.models.example.com}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
    residency:
      default_region: eu
    variants:
      - {{name: control, weight: 100, backends: [{{url: "http://127.0.0.1:{flaky}", region: eu, protocol: grpc}}]}}
"""

FLAKY_RATE = 0.5  # the flaky sidecar's --fault-rate: every second inference fails (sidecar/faults.py)


class AccessLog:
    """The controller's ALS receiver (`serve_als`) on a Unix socket, served from its own event loop in a
    thread (the plane is synchronous); what it emits is collected by route for the tests."""

    def __init__(self, sock: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sink = InProcessSink()
        self.run(self.sink.start())
        self.server, self.receiver = self.run(serve_als(self.sink, f"uds:{sock}"))
        self.events: list[Event] = []

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def of(self, route: str, n: int, timeout_s: float = 60.0) -> list[Event]:
        """The route's events once ``n`` arrived (Envoy flushes every 200 ms; generous for a loaded CI box)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.events.extend(self.run(self.sink.read(10_000, 0.2)))
            found = [e for e in self.events if e.route == route]
            if len(found) >= n or time.monotonic() > deadline:
                return found

    def close(self) -> None:
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@dataclass
class Plane:
    port: int
    certs: pki.CertPaths
    control: ThreadedSidecar
    shadow: ThreadedSidecar
    models: Path
    policy: Policy
    als: AccessLog

    def client(self, who: str = "app-demo", authority: str = HOST) -> triton.InferenceServerClient:
        cert, key = self.certs.clients[who]
        return triton.InferenceServerClient(
            f"127.0.0.1:{self.port}",
            ssl=True,
            root_certificates=str(self.certs.ca_cert),
            private_key=str(key),
            certificate_chain=str(cert),
            channel_args=[
                ("grpc.default_authority", authority),  # what the route matches on
                ("grpc.ssl_target_name_override", "localhost"),  # what Envoy's certificate names
            ],
        )


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, certs: pki.CertPaths) -> Iterator[Plane]:
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy.envoy import AccessLogTarget, ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess
    from sidecar.demo_models import build_models

    work = tmp_path_factory.mktemp("grpc-e2e")
    build_models(work / "models", include_mlp=False)
    # nothing listens on "down"; "flaky" fails every second inference
    ports = {"control": free_port(), "shadow": free_port(), "down": free_port(), "flaky": free_port()}

    def sidecar(variant: str, grpc_port: int, fault_rate: float = 0.0) -> SidecarConfig:
        return SidecarConfig(
            model_path=str(work / "models" / "tabular-control.onnx"),
            name="tabular",
            port=free_port(),
            grpc_port=grpc_port,
            variant=variant,
            intra_op_threads=1,
            fault_rate=fault_rate,
        )

    policy_file = work / "policy.yaml"
    policy_file.write_text(POLICY.format(jwks=certs.jwks, host=HOST, **ports))
    sock = work / "run" / "processor.sock"
    gateway = GatewayProcess(policy_file, sock, "grpc", work)
    (work / "run").mkdir(exist_ok=True)
    als = AccessLog(work / "run" / "als.sock")
    with (
        sidecar_in_thread(sidecar("control", ports["control"])) as control,
        sidecar_in_thread(sidecar("challenger", ports["shadow"])) as shadow,
        sidecar_in_thread(sidecar("control", ports["flaky"], FLAKY_RATE)),
    ):
        try:
            gateway.start(timeout=60)  # generous: a loaded 2-core CI machine
            files = render(
                load_policy(policy_file),
                certs=certs,
                out_dir=work / "envoy",
                processor=ProcessorAddress(uds=str(sock)),
                transport=TRANSPORT_ARGS["grpc"][2],  # type: ignore[arg-type]
                listen_port=free_port(),
                admin_port=free_port(),
                access_log=AccessLogTarget(uds=str(work / "run" / "als.sock")),
            )
            with EnvoyProcess(files, log_path=work / "envoy.log", concurrency=1) as envoy:
                yield Plane(envoy.listen_port, certs, control, shadow, work / "models", load_policy(policy_file), als)
        finally:
            gateway.stop()
            als.close()


def rows(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(10, 5, (n, 30)).astype(np.float32)


def infer(client: triton.InferenceServerClient, x: np.ndarray, token: str | None) -> triton.InferResult:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    headers = {"authorization": f"Bearer {token}"} if token is not None else None
    return client.infer("tabular", [tensor], headers=headers, client_timeout=60)


def served_requests(sidecar: ThreadedSidecar) -> float:
    page = urllib.request.urlopen(sidecar.url + "/metrics", timeout=10).read().decode()
    lines = [ln for ln in page.splitlines() if ln.startswith("cohortgate_sidecar_request_seconds_count")]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_an_allowed_model_infer_gets_the_models_answer_and_is_mirrored(plane: Plane) -> None:
    client = plane.client()
    x = rows(5)
    before = served_requests(plane.shadow)
    result = infer(client, x, mint(plane.certs, "user-1"))
    session = ort.InferenceSession(str(plane.models / "tabular-control.onnx"), providers=["CPUExecutionProvider"])
    label, proba = session.run(None, {"input": x})
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_allclose(result.as_numpy("probabilities"), proba, rtol=1e-6)
    # the shadow got its copy (mirrors are fire-and-forget: wait for it, generously)
    deadline = time.monotonic() + 30
    while served_requests(plane.shadow) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served_requests(plane.shadow) == before + 1
    assert client.is_server_ready(headers={"authorization": f"Bearer {mint(plane.certs, 'user-1')}"})
    client.close()


DENIALS = [
    # (name, client identity, authority, token kwargs or None for no token, gRPC status, phrase)
    ("no token", "app-demo", HOST, None, "StatusCode.UNAUTHENTICATED", "no Authorization header"),
    ("identity not allowed", "qa", HOST, {}, "StatusCode.PERMISSION_DENIED", "may not call route"),
    ("missing scope", "app-demo", HOST, {"scopes": []}, "StatusCode.PERMISSION_DENIED", "scope"),
    ("unknown host", "app-demo", "images.models.example.com", {}, "StatusCode.NOT_FOUND", "No route matches"),
    ("outside residency", "app-demo", HOST, {"residency": "us"}, "StatusCode.FAILED_PRECONDITION", "region"),
]


@pytest.mark.parametrize(
    ("who", "authority", "claims", "status", "phrase"), [d[1:] for d in DENIALS], ids=[d[0] for d in DENIALS]
)
def test_each_denial_is_its_grpc_status_with_the_processors_sentence(
    plane: Plane, who: str, authority: str, claims: dict | None, status: str, phrase: str
) -> None:
    client = plane.client(who, authority)
    token = mint(plane.certs, "user-2", **claims) if claims is not None else None
    before = served_requests(plane.control)
    with pytest.raises(InferenceServerException) as info:
        infer(client, rows(1), token)
    assert info.value.status() == status
    assert phrase in info.value.message(), info.value.message()
    assert not info.value.message().startswith("{")  # a sentence, not a JSON body
    assert served_requests(plane.control) == before  # nothing reached the model
    client.close()


def test_a_backend_that_cannot_be_reached_is_unavailable(plane: Plane) -> None:
    client = plane.client(authority="down.models.example.com")
    with pytest.raises(InferenceServerException) as info:
        infer(client, rows(1), mint(plane.certs, "user-3"))
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    # Envoy's gRPC local-reply mapper (deploy/envoy/replies.py): the sentence, not the REST caller's JSON body
    assert info.value.message() == "The model backend for this route cannot be reached right now; try again later."
    client.close()
    # and the controller counts it as an error (Envoy answered the gRPC caller with HTTP 200 + grpc-status 14)
    [event] = plane.als.of("down-grpc", 1)
    assert event.variant == "control" and is_error(event.status), event


def test_a_failing_grpc_backends_errors_reach_the_controllers_error_count(plane: Plane) -> None:
    """A sidecar's INTERNAL is HTTP 200 with a grpc-status trailer: the controller's window counts it."""
    client = plane.client(authority="flaky.models.example.com")
    token = mint(plane.certs, "user-4")
    statuses = []
    for _ in range(10):
        try:
            infer(client, rows(1), token)
            statuses.append("OK")
        except InferenceServerException as exc:
            statuses.append(exc.status())
    client.close()
    assert statuses == ["OK", "StatusCode.INTERNAL"] * 5  # the knob fails every second request, exactly
    events = plane.als.of("flaky-grpc", 10)
    assert len(events) == 10

    async def window() -> dict[str, Any]:
        controller = Controller(plane.policy, InProcessState(), InProcessSink())
        await controller.start()
        controller.ingest(events)
        counted: dict[str, Any] = controller.status()["routes"]["flaky-grpc"]["variants"]["control"]["window"]
        return counted

    counted = plane.als.run(window())
    assert (counted["requests"], counted["errors"]) == (10, 5)  # was 0 errors: every entry logged as 200
