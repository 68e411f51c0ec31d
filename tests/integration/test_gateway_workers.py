"""`cohortgate gateway --workers 2` behind the real Envoy (two ext_proc endpoints, concurrency 2).

Both workers take requests, a user's variant does not depend on the worker, a policy edit reaches
both, the parent's /metrics is the sum of the workers', a killed worker is restarted while every
answer stays right (the decided upstream, or the fail-closed 503), and SIGTERM drains everything.
Timeouts are generous: this runs beside CPU hogs on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cohortgate.deploy import pki
from tests.integration.conftest import Client, GatewayProcess, Upstream, free_port, mint

pytestmark = pytest.mark.integration

WAIT_S = 60.0  # generous: a worker restart imports the gateway on a loaded 2-core machine
USERS = [f"worker-user-{i}" for i in range(40)]


def until(check: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f} s")
        time.sleep(0.1)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def worker_metric(sock: str, outcome: str = "allowed") -> float:
    """One worker's own ``cohortgate_decisions_total{outcome}``, read on its private socket."""
    import http.client
    import socket

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(10)
            self.sock.connect(sock)

    conn = _Conn("worker")
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return total(text, outcome)


def total(text: str, outcome: str = "allowed") -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "cohortgate_decisions"
        for s in f.samples
        if s.name == "cohortgate_decisions_total" and s.labels.get("outcome") == outcome
    )


@dataclass
class Plane:
    gateway: GatewayProcess
    policy: Path
    sock: Path
    metrics: str
    app: Client
    certs: pki.CertPaths
    tokens: dict[str, str]

    def health(self) -> dict[str, Any]:
        return json.loads(get(self.metrics + "/healthz")[1])

    def worker_socket(self, i: int) -> str:
        return f"{self.sock}.w{i}.metrics"


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory, certs: pki.CertPaths, upstreams: dict[str, Upstream], policy_file: Path
) -> Iterator[Plane]:
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy.envoy import ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess

    work = tmp_path_factory.mktemp("workers")
    policy = work / "policy.yaml"
    policy.write_text(policy_file.read_text())
    sock = work / "run" / "processor.sock"
    port = free_port()
    gateway = GatewayProcess(policy, sock, "fast", work)
    gateway.cmd += ["--workers", "2", "--metrics", f"127.0.0.1:{port}"]
    gateway.start(timeout=180.0)
    files = render(
        load_policy(policy),
        certs=certs,
        out_dir=work / "envoy",
        processor=ProcessorAddress(uds=str(sock), workers=2),
        transport="grpc",
        listen_port=free_port(),
        admin_port=free_port(),
    )
    envoy = EnvoyProcess(files, log_path=work / "envoy.log", concurrency=2)
    try:
        with envoy:
            app_cert, app_key = certs.clients["app-demo"]
            app = Client(envoy.listen_port, certs.ca_cert, app_cert, app_key)
            tokens = {u: mint(certs, u) for u in USERS}
            yield Plane(gateway, policy, sock, f"http://127.0.0.1:{port}", app, certs, tokens)
            app.close()
    finally:
        gateway.stop()


def upstream_of(plane: Plane, user: str) -> tuple[int, str]:
    reply = plane.app.request(token=plane.tokens[user])
    if reply.status != 200:
        assert reply.status == 503 and reply.json()["error"]["code"] == "unavailable", reply  # fail-closed
        return 503, ""
    return 200, reply.json()["upstream"]


def test_both_workers_answer_and_a_user_keeps_one_variant(plane: Plane) -> None:
    before = [worker_metric(plane.worker_socket(i)) for i in range(2)]
    first = {u: upstream_of(plane, u)[1] for u in USERS}
    assert set(first.values()) <= {"control-eu", "canary-eu"} and all(first.values())
    for _ in range(3):  # sticky whichever worker decides: one unit salt for both
        assert {u: upstream_of(plane, u)[1] for u in USERS} == first
    after = [worker_metric(plane.worker_socket(i)) for i in range(2)]
    gained = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(gained) == 4 * len(USERS)
    assert min(gained) >= 0.1 * sum(gained), gained  # Envoy balances streams over both worker sockets
    summed = total(get(plane.metrics + "/metrics")[1])
    assert summed == sum(after)  # nothing else is sending: the parent's figure is the workers' sum
    # one audit file per worker (audit.jsonl -> audit.w0.jsonl, audit.w1.jsonl), whole JSON lines
    files = [plane.gateway.audit_path.with_name(f"audit.w{i}.jsonl") for i in range(2)]
    until(lambda: sum(len(f.read_bytes().splitlines()) for f in files) == sum(after), what="every audit line")
    for f, n in zip(files, after, strict=True):
        lines = [json.loads(line) for line in f.read_bytes().splitlines()]
        assert len(lines) == n and {line["outcome"] for line in lines} == {"allow"}


def test_a_policy_edit_reaches_both_workers(plane: Plane) -> None:
    text = plane.policy.read_text()
    plane.policy.write_text(text.replace("weight: 90\n", "weight: 0\n").replace("weight: 10\n", "weight: 100\n"))
    digest = __import__("hashlib").sha256(plane.policy.read_bytes()).hexdigest()[:12]
    until(lambda: all(w.get("policy") == digest for w in plane.health()["workers"]), what="both workers on the edit")
    assert plane.health()["policy"] == digest
    served = {upstream_of(plane, u)[1] for u in USERS for _ in range(2)}
    assert served == {"canary-eu"}


def test_a_killed_worker_is_restarted_and_no_answer_is_wrong(plane: Plane) -> None:
    victim = plane.health()["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for user in USERS[:10]:
            status, upstream = upstream_of(plane, user)
            statuses.append(status)
            assert status == 503 or upstream == "canary-eu"  # the edit's answer, from whichever worker
        workers = plane.health()["workers"]
        if workers[0]["ok"] and workers[0]["pid"] != victim["pid"]:
            break
    workers = plane.health()["workers"]
    assert workers[0]["ok"] and workers[0]["pid"] != victim["pid"] and workers[0]["restarts"] == 1
    assert statuses.count(200) > statuses.count(503)  # Envoy ejects the dead socket: the other one answers
    assert "cohortgate_gateway_worker_restarts_total 1.0" in get(plane.metrics + "/metrics")[1]
    before = worker_metric(plane.worker_socket(0))
    until(
        lambda: [upstream_of(plane, u) for u in USERS] and worker_metric(plane.worker_socket(0)) > before,
        what="the restarted worker taking requests",
    )


def test_sigterm_drains_every_worker(plane: Plane) -> None:
    pids = [w["pid"] for w in plane.health()["workers"]]
    proc = plane.gateway.proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT_S) == 0
    for pid in pids:
        until(lambda pid=pid: not Path(f"/proc/{pid}").exists() or "Z" in _state(pid), what=f"worker {pid} gone")
    assert not any(Path(f"{plane.sock}.w{i}").exists() for i in range(2))
    assert not any(Path(plane.worker_socket(i)).exists() for i in range(2))
    assert not plane.policy.with_name(".policy.yaml.serving").exists()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "Z"
