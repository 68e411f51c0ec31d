"""The rollback loop end to end: real Envoy -> ext_proc gateway -> upstreams, Envoy's gRPC access log
-> controller -> state store -> the gateway's policy, and back to the traffic.

Everything but Envoy runs in the test's event loop (the gateway, the ALS receiver, the controller);
clients run in threads. The canary upstream has an error knob (`sidecar.faults.FaultInjector`,
deterministic: exactly floor(n * rate) of its first n requests fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cohortgate.controller.loop import Controller
from cohortgate.core.rollout import Phase
from cohortgate.deploy import pki
from cohortgate.store.state import InProcessState
from sidecar.faults import FaultInjector
from tests.integration.conftest import Client, controlled_edge, mint

pytestmark = pytest.mark.integration

POLICY = """
version: 1
jwt: {{issuer: https://auth.cohortgate.local, audience: cohortgate, algorithms: [ES256], jwks: {jwks}}}
routes:
  - name: tabular
    match: {{model: tabular, methods: [POST]}}
    auth: {{identities: ["spiffe://cohortgate.local/app-*"], scopes: [predict]}}
    cohorts: {{unit: {{claim: sub}}, salt: rollback-e2e}}
    residency: {{source: {{claim: residency}}, on_missing_region: fallback_control}}
    variants:
      - {{name: control, weight: 90, backends: [{{url: "{control}", region: eu}}]}}
      - {{name: canary, weight: 10, backends: [{{url: "{canary}", region: eu}}]}}
    guardrails: {{max_error_rate: 0.05, min_samples: {min_samples}}}
    rollout: {{variant: canary, steps: [10, 50, 100], interval_s: {interval_s}}}
"""


@dataclass
class KnobUpstream:
    name: str
    fault: FaultInjector = field(default_factory=lambda: FaultInjector(0.0))
    served: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> KnobUpstream:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with upstream.lock:
                    upstream.served += 1
                    fail = upstream.fault.fail_next()
                    upstream.failed += fail
                status = 503 if fail else 200
                body = json.dumps({"upstream": upstream.name, "failed": fail}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class Loop:
    """Envoy + in-process gateway + ALS receiver + controller, wired like `cohortgate up` would."""

    controller: Controller
    store: InProcessState
    control: KnobUpstream
    canary: KnobUpstream
    certs: pki.CertPaths
    port: int
    tokens: dict[str, str]

    def client(self) -> Client:
        cert, key = self.certs.clients["app-demo"]
        return Client(self.port, self.certs.ca_cert, cert, key)

    def phase(self) -> Phase:
        return self.controller.states["tabular"].variants["canary"].phase


@contextlib.asynccontextmanager
async def running_loop(
    tmp_path: Path, certs: pki.CertPaths, canary_fault: float, min_samples: int, interval_s: float
) -> AsyncIterator[Loop]:
    control, canary = KnobUpstream("control").start(), KnobUpstream("canary").start()
    canary.fault = FaultInjector(canary_fault)
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(
        POLICY.format(
            jwks=certs.jwks, control=control.url, canary=canary.url, min_samples=min_samples, interval_s=interval_s
        )
    )
    users = [f"user-{i}" for i in range(300)]
    tokens = {u: mint(certs, u, residency="eu") for u in users}
    try:
        async with controlled_edge(policy_path, certs, tmp_path, salt=b"rollback-e2e-unit-salt-0123456789") as e:
            yield Loop(e.controller, e.store, control, canary, certs, e.port, tokens)
    finally:
        control.stop()
        canary.stop()


def drive(loop: Loop, done: Any, max_s: float, workers: int = 4) -> dict[str, list[str]]:
    """Send requests round-robin over the users from ``workers`` threads until ``done()``.

    Returns, per upstream, the users it served.
    """
    served: dict[str, list[str]] = {"control": [], "canary": []}
    users = list(loop.tokens)
    deadline = time.monotonic() + max_s
    lock = threading.Lock()

    def worker(offset: int) -> None:
        client = loop.client()
        i = offset
        try:
            while not done() and time.monotonic() < deadline:
                user = users[i % len(users)]
                i += workers
                reply = client.request(token=loop.tokens[user])
                if reply.status in (200, 503) and reply.body.startswith(b"{"):
                    name = reply.json().get("upstream")
                    if name in served:
                        with lock:
                            served[name].append(user)
        finally:
            client.close()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))
    return served


async def test_a_canary_failing_30_percent_is_rolled_back_through_envoy_within_300_requests(tmp_path, certs):
    async with running_loop(tmp_path, certs, canary_fault=0.30, min_samples=200, interval_s=30) as loop:
        started = time.monotonic()
        served = await asyncio.to_thread(drive, loop, lambda: loop.phase() is Phase.ROLLED_BACK, 60.0)
        print(
            f"rolled back after {time.monotonic() - started:.2f} s; the canary served {loop.canary.served} "
            f"requests ({loop.canary.failed} failed), control {loop.control.served}"
        )
        assert loop.phase() is Phase.ROLLED_BACK, f"not rolled back; canary served {loop.canary.served}"
        assert 0 < loop.canary.served <= 300
        assert loop.canary.failed >= 1
        record = (await loop.store.audit("tabular"))[0]
        assert record["action"] == "rollback" and record["weights_after"] == {"control": 100, "canary": 0}
        assert record["evidence"]["window"]["requests"] > 0  # the evidence came through Envoy's access log

        # afterwards none of its users reach it: they are back on control
        canary_users = sorted(set(served["canary"]))
        assert canary_users
        before = loop.canary.served
        client = loop.client()
        try:
            for user in canary_users:
                reply = await asyncio.to_thread(client.request, token=loop.tokens[user])
                assert reply.status == 200 and reply.json()["upstream"] == "control", (user, reply)
        finally:
            client.close()
        assert loop.canary.served == before


async def test_a_healthy_canary_is_promoted_through_every_step_through_envoy(tmp_path, certs):
    async with running_loop(tmp_path, certs, canary_fault=0.0, min_samples=30, interval_s=1) as loop:
        await asyncio.to_thread(drive, loop, lambda: loop.phase() is Phase.PROMOTED, 90.0)
        assert loop.phase() is Phase.PROMOTED
        promotions = [r["weights_after"]["canary"] for r in reversed(await loop.store.audit("tabular"))]
        assert promotions == [50, 100]
        before = loop.control.served
        served = await asyncio.to_thread(drive, loop, lambda: False, 1.0, 2)
        assert served["canary"] and not served["control"] and loop.control.served == before
