"""Two edges (gateway + Envoy pairs) against one Redis and one controller: they agree.

Scale-out rests on this: decisions are local, so two gateways must put every user in the same
variant (sticky assignment is a keyed hash, not shared state), and the controller's weight changes
and rollbacks, shared through Redis, must reach both within a second.

Each gateway runs ``cohortgate gateway --redis URL --metrics HOST:PORT``: it applies the state store's
weights, and edge ``a`` also shows its decisions on ``/metrics``.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cohortgate.deploy import pki
from tests.integration.conftest import TRANSPORT_ARGS, Client, GatewayProcess, Upstream, free_port, mint

pytestmark = pytest.mark.integration

USERS = [f"user-{i}" for i in range(120)]
PROPAGATION_S = 1.0  # the state store's promise: every gateway applies a change within 1 s


@dataclass
class Edge:
    name: str
    gateway: GatewayProcess
    envoy: object
    client: Client
    metrics_port: int

    def variant_of(self, certs: pki.CertPaths, sub: str) -> tuple[str, str]:
        reply = self.client.request(token=mint(certs, sub, residency="eu"))
        assert reply.status == 200, (self.name, sub, reply.status, reply.body[:200])
        return reply.headers["x-cohortgate-variant"], reply.headers["x-upstream"]


class Controller:
    """``cohortgate controller --redis`` as a child process, with its loopback JSON API."""

    def __init__(self, policy: Path, redis_url: str, work: Path) -> None:
        self.port = free_port()
        self.token_file = work / "admin.token"
        self.log_path = work / "controller.log"
        self.cmd = [
            "python", "-m", "cohortgate.cli", "controller",
            "--policy", str(policy),
            "--redis", redis_url,
            "--listen", f"127.0.0.1:{self.port}",
            "--token-file", str(self.token_file),
            "--state-file", str(work / "controller-state.json"),
            "--interval", "0.2s",
        ]  # fmt: skip
        self.proc = None

    def start(self, timeout: float = 120.0) -> None:  # generous: a loaded 2-core CI box (CPU hogs beside)
        import os
        import subprocess
        import sys

        from tests.integration.conftest import ROOT

        self.cmd[0] = sys.executable
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if self._get("/healthz").get("leader"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"controller not leading after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
            return json.loads(r.read())

    def action(self, verb: str, **body: str) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/actions/{verb}",
            data=json.dumps(body).encode(),
            headers={"authorization": f"Bearer {self.token_file.read_text().strip()}",
                     "content-type": "application/json"},
            method="POST",
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except Exception:
                self.proc.kill()


@pytest.fixture(scope="module")
def two_edges(
    tmp_path_factory: pytest.TempPathFactory,
    certs: pki.CertPaths,
    upstreams: dict[str, Upstream],
    policy_file: Path,
) -> Iterator[tuple[list[Edge], Controller]]:
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy.envoy import ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess
    from tests.controller.conftest import RedisServer

    work = tmp_path_factory.mktemp("two-edges")
    redis = RedisServer(work / "redis").start()
    controller = None
    edges: list[Edge] = []
    stack = []
    try:
        controller = Controller(policy_file, redis.url, work)
        controller.start()
        app_cert, app_key = certs.clients["app-demo"]
        for name in ("a", "b"):
            edge_dir = work / name
            edge_dir.mkdir()
            sock = edge_dir / "run" / "processor.sock"
            gateway = GatewayProcess(policy_file, sock, "grpc", edge_dir)
            metrics_port = free_port()
            gateway.cmd += ["--redis", redis.url, "--metrics", f"127.0.0.1:{metrics_port}"]
            gateway.start()
            stack.append(gateway)
            files = render(
                load_policy(policy_file),
                certs=certs,
                out_dir=edge_dir / "envoy",
                processor=ProcessorAddress(uds=str(sock)),
                transport=TRANSPORT_ARGS["grpc"][2],  # type: ignore[arg-type]
                listen_port=free_port(),
                admin_port=free_port(),
            )
            envoy = EnvoyProcess(files, log_path=edge_dir / "envoy.log", concurrency=1)
            envoy.__enter__()
            stack.append(envoy)
            client = Client(envoy.listen_port, certs.ca_cert, app_cert, app_key)
            edges.append(Edge(name, gateway, envoy, client, metrics_port))
        yield edges, controller
    finally:
        for edge in edges:
            edge.client.close()
        for item in reversed(stack):
            if isinstance(item, GatewayProcess):
                item.stop()
            else:
                item.__exit__(None, None, None)
        if controller is not None:
            controller.stop()
        redis.stop()


def _assignments(edge: Edge, certs: pki.CertPaths) -> dict[str, tuple[str, str]]:
    return {sub: edge.variant_of(certs, sub) for sub in USERS}


def _wait_until(edges: list[Edge], certs: pki.CertPaths, expect, timeout: float) -> float:
    """Seconds until ``expect(variant, upstream)`` holds for every user on every edge."""
    start = time.monotonic()
    while True:
        if all(expect(*edge.variant_of(certs, sub)) for edge in edges for sub in USERS[:40]):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not every edge applied the change within {timeout}s")
        time.sleep(0.05)


def test_sticky_assignment_agrees_across_edges(two_edges, certs):
    edges, _ = two_edges
    a, b = (_assignments(e, certs) for e in edges)
    assert a == b
    variants = {v for v, _ in a.values()}
    assert variants == {"control", "canary"}, "both variants must appear for the comparison to mean anything"
    # And each edge is sticky on its own: the same user again, the same variant and upstream.
    for sub in USERS[:20]:
        assert edges[0].variant_of(certs, sub) == a[sub]


def test_metrics_and_health_endpoints(two_edges, certs):
    edges, _ = two_edges
    edge = edges[0]
    denied = edge.client.request(token=mint(certs, "user-x", scopes=["other"]))
    assert denied.status == 403
    assert edge.variant_of(certs, "user-1")
    base = f"http://127.0.0.1:{edge.metrics_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
        health = json.loads(r.read())
    assert health["ok"] and health["state_store"] == "connected" and len(health["policy"]) == 12
    with urllib.request.urlopen(f"{base}/metrics", timeout=2) as r:
        text = r.read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}
    assert samples['cohortgate_decisions_total{code="none",outcome="allowed"}'] >= 1
    assert samples['cohortgate_decisions_total{code="forbidden",outcome="denied"}'] >= 1
    assert samples['cohortgate_variant_weight{route="tabular",variant="canary"}'] == 10
    variant = edge.variant_of(certs, "user-1")[0]
    assert samples[f'cohortgate_routed_requests_total{{route="tabular",variant="{variant}"}}'] >= 1


def test_weight_change_reaches_both_edges(two_edges, certs):
    edges, controller = two_edges
    controller.action("promote", route="tabular", variant="canary")  # no rollout: canary to 100 %
    took = _wait_until(edges, certs, lambda v, up: v == "canary" and up == "canary-eu", timeout=3.0)
    assert took <= PROPAGATION_S + 0.5
    a, b = (_assignments(e, certs) for e in edges)
    assert a == b and {v for v, _ in a.values()} == {"canary"}


def test_rollback_reaches_both_edges(two_edges, certs):
    edges, controller = two_edges
    controller.action("rollback", route="tabular", variant="canary")
    took = _wait_until(edges, certs, lambda v, up: v == "control" and up == "control-eu", timeout=3.0)
    assert took <= PROPAGATION_S + 0.5
    a, b = (_assignments(e, certs) for e in edges)
    assert a == b and {v for v, _ in a.values()} == {"control"}
    # Resuming brings the canary's users back, identically on both edges.
    controller.action("resume", route="tabular")
    deadline = time.monotonic() + 3.0
    while True:
        a, b = (_assignments(e, certs) for e in edges)
        if a == b and {v for v, _ in a.values()} == {"control", "canary"}:
            break
        assert time.monotonic() < deadline, "the resumed split did not reach both edges"
        time.sleep(0.1)
