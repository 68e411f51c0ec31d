"""`cohortgate up` under faults (issue 17): children killed under load come back while the rest serves,
a stop drains Envoy without resetting a request, and the controller never runs a policy the gateway
refused (issue 16.8).

The real stack runs as a subprocess (free ports, a temporary state dir); clients are plain HTTPS
threads with the app's certificate. Recovery times are printed (``-s`` shows them), never asserted
against a wall-clock bar: a busy 2-core CI machine decides those, not the code. The timeouts are
generous on purpose.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cohortgate.deploy import pki
from tests.integration.test_up import CLI, EXAMPLE, POLICY, ROOT, Up, alive, up_factory  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

CHAOS = os.environ.get("COHORTGATE_CHAOS") == "1"  # `make test-chaos`: the longer scenarios too
RECOVERY_TIMEOUT_S = 60.0  # generous: a loaded 2-core machine restarts a Python child in 2-5 s
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]})


@dataclass
class Answer:
    sent: float
    done: float
    status: int  # 0: no HTTP answer (see error)
    variant: str | None = None
    served_by: str | None = None
    code: str | None = None  # the JSON error code of a denial
    error: str = ""


@dataclass
class Client:
    """One keep-alive HTTPS client thread sending the same kind of request in a loop."""

    name: str
    run: dict[str, Any]
    path: str
    token: str | None
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    pause_s: float = 0.02

    def start(self) -> Client:
        self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self.thread.start()
        return self

    def _context(self) -> ssl.SSLContext:
        certs = self.run["certs"]
        ctx = ssl.create_default_context(cafile=certs["ca"])
        ctx.load_cert_chain(certs["clients"]["app-demo"]["cert"], certs["clients"]["app-demo"]["key"])
        return ctx

    def _loop(self) -> None:
        ctx = self._context()
        port = self.run["ports"]["envoy"]
        conn: http.client.HTTPSConnection | None = None
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        while not self.stop.is_set():
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=15)
            sent = time.monotonic()
            try:
                conn.request("POST", self.path, body=BODY, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                answer = Answer(sent, time.monotonic(), response.status, response.getheader("x-cohortgate-variant"),
                                response.getheader("x-cohortgate-served-by"))  # fmt: skip
                if response.status >= 400:
                    try:
                        answer.code = json.loads(raw)["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        answer.code = "not-json"
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                answer = Answer(sent, time.monotonic(), 0, error=f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = None
                time.sleep(0.05)
            self.answers.append(answer)
            time.sleep(self.pause_s)
        if conn is not None:
            conn.close()

    def between(self, start: float, end: float) -> list[Answer]:
        return [a for a in self.answers if start <= a.sent and a.done <= end]

    def first_ok_after(
        self, t: float, timeout: float = RECOVERY_TIMEOUT_S, ok: Callable[[Answer], bool] | None = None
    ) -> float:
        """When the first good answer to a request sent after ``t`` arrived (waits for it)."""
        ok = ok or (lambda a: a.status == 200)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for a in list(self.answers):
                if a.sent >= t and ok(a):
                    return a.done
            time.sleep(0.02)
        tail = [(a.status, a.code, a.error) for a in self.answers[-5:]]
        pytest.fail(f"{self.name}: no good answer within {timeout:.0f}s of the fault; last: {tail}")


def token(run: dict[str, Any], sub: str, residency: str, **claims: Any) -> str:
    paths = pki.load_cert_paths(run["certs"]["dir"])
    return pki.mint_token(paths, sub, residency=residency, scopes=["predict"], claims=claims, ttl_s=3600)


def child_pid(up: Up, name: str) -> int | None:
    return up.run()["children"][name]["pid"]


def wait_new_pid(up: Up, name: str, old: int) -> int:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while True:
        pid = child_pid(up, name)
        if pid and pid != old and alive(pid) and up.run()["children"][name]["state"] == "ready":
            return pid
        assert time.monotonic() < deadline and up.proc.poll() is None, up.output()
        time.sleep(0.05)


def all_ok(client: Client, start: float, end: float) -> None:
    """Every request ``client`` sent in [start, end] was served (and there were some).

    One exception, not the supervisor's: Envoy's processor deadline (an empty 504) when a restarting
    child's imports starve the gateway of CPU on a loaded 2-core machine (issue 18 sets that
    deadline); those stay a small share, and no answer says the backend or the processor was away."""
    during = client.between(start, end)
    bad = [(round(a.sent - start, 2), a.status, a.code, a.error) for a in during if a.status not in (200, 504)]
    assert during and not bad, (client.name, len(during), bad[:10])
    late = sum(1 for a in during if a.status == 504)
    assert late <= max(2, len(during) // 10), (client.name, f"{late} processor timeouts of {len(during)}")


def never_served_unauthenticated(*clients: Client) -> None:
    """Whatever was down, a request without a token was refused: 401, or fail-closed while the processor
    was away (503) or late (Envoy's processor deadline, 504). Never a 2xx or 3xx."""
    for client in clients:
        statuses = {(a.status, a.code) for a in client.answers if a.status}
        assert statuses <= {(401, "unauthenticated"), (503, "unavailable"), (504, "not-json")}, (client.name, statuses)
        assert (401, "unauthenticated") in statuses


def every_success_was_decided(*clients: Client) -> None:
    """Every 200 carries the variant the processor chose: nothing went past it."""
    for client in clients:
        bad = [a for a in client.answers if a.status == 200 and not a.variant]
        assert not bad, (client.name, bad[:3])


def test_killed_children_come_back_while_the_rest_keeps_serving(up_factory) -> None:  # noqa: F811
    up = up_factory(EXAMPLE)
    run = up.wait_run()
    clients = {
        "tabular-eu": Client("tabular-eu", run, "/v2/models/tabular/infer", token(run, "eve", "eu")),
        "tabular-ae": Client("tabular-ae", run, "/v2/models/tabular/infer", token(run, "aki", "ae")),
        "ae-scoring": Client("ae-scoring", run, "/v2/models/ae-scoring/infer", token(run, "ali", "ae", tier="gold")),
        "no-token": Client("no-token", run, "/v2/models/tabular/infer", None, pause_s=0.05),
    }
    for client in clients.values():
        client.start()
    try:
        for client in clients.values():
            if client.token:
                client.first_ok_after(0.0)  # every route answers before the faults
        # Steady state: the warm spares (one per kind of Python child) have done their imports.
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while up.run()["supervision"]["spares"] != {"sidecar": "warm", "controller": "warm", "gateway": "warm"}:
            assert time.monotonic() < deadline, up.run()["supervision"]
            time.sleep(0.1)
        measured: dict[str, float] = {}

        # 1. The gateway (the ext_proc processor): Envoy fails closed meanwhile, then service resumes.
        old = child_pid(up, "gateway")
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        measured["gateway"] = clients["tabular-eu"].first_ok_after(killed) - killed
        wait_new_pid(up, "gateway", old)

        # 2. One sidecar (tabular control in ae): the eu users and the other route never notice.
        name = "sidecar-tabular-control-ae"
        time.sleep(1.0)
        old = child_pid(up, name)
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        measured[name] = clients["tabular-ae"].first_ok_after(killed) - killed
        wait_new_pid(up, name, old)
        back = time.monotonic()
        for other in ("tabular-eu", "ae-scoring"):
            all_ok(clients[other], killed, back)

        # 3. The controller: the data plane keeps serving on the last weights; its API comes back.
        old = child_pid(up, "controller")
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        wait_new_pid(up, "controller", old)
        admin = Path(run["admin_token_file"]).read_text().strip()
        request = urllib.request.Request(
            f"{run['endpoints']['controller_api']}/status", headers={"authorization": f"Bearer {admin}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        measured["controller"] = time.monotonic() - killed
        back = time.monotonic()
        for other in ("tabular-eu", "tabular-ae", "ae-scoring"):
            all_ok(clients[other], killed, back)
        if CHAOS:
            # 4. Envoy itself: connections are refused meanwhile; the restarted one reads the same files.
            old = child_pid(up, "envoy")
            killed = time.monotonic()
            os.kill(old, signal.SIGKILL)
            measured["envoy"] = clients["tabular-eu"].first_ok_after(killed) - killed
            wait_new_pid(up, "envoy", old)
            # 5. The gateway a second time within the minute: its restart waits the first backoff (0.5 s).
            old = child_pid(up, "gateway")
            killed = time.monotonic()
            os.kill(old, signal.SIGKILL)
            measured["gateway (2nd kill, 0.5 s backoff)"] = clients["tabular-eu"].first_ok_after(killed) - killed
            wait_new_pid(up, "gateway", old)
    finally:
        for client in clients.values():
            client.stop.set()
        for client in clients.values():
            client.thread.join(20)
    for name, took in measured.items():
        print(f"chaos: kill -9 {name}: served again after {took:.2f}s")

    never_served_unauthenticated(clients["no-token"])
    every_success_was_decided(*clients.values())
    assert any(a.status == 503 for a in clients["tabular-eu"].answers)  # the gateway outage was seen, fail closed
    # run.json stays true: new pids, one restart each, all ready; `up` said what happened.
    final = up.run()
    restarts = {"gateway": 2 if CHAOS else 1, "sidecar-tabular-control-ae": 1, "controller": 1}
    if CHAOS:
        restarts["envoy"] = 1
    for name, count in restarts.items():
        child = final["children"][name]
        assert child["restarts"] == count and child["state"] == "ready" and alive(child["pid"]), (name, child)
        assert child["last_exit"] == "killed by SIGKILL"
    assert final["supervision"]["restarts"] == sum(restarts.values()) and final["supervision"]["failed"] == []
    output = up.output()
    assert "gateway: exited unexpectedly (killed by SIGKILL)" in output and "gateway: back, ready again" in output
    # `cohortgate status` shows the restarts (it finds the stack through run.json).
    status = subprocess.run(
        [*CLI, "status", "--state-dir", str(up.state)], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert status.returncode == 0, status.stderr
    assert f"{sum(restarts.values())} restarts" in status.stdout and "gateway restarted" in status.stdout, status.stdout


def test_a_stop_drains_envoy_and_resets_no_request(up_factory) -> None:  # noqa: F811
    up = up_factory(EXAMPLE)
    run = up.wait_run()
    clients = [
        Client(f"drain-{i}", run, "/v2/models/tabular/infer", token(run, f"user-{i}", "eu"), pause_s=0.0)
        for i in range(4)
    ]

    refused: list[str] = []
    resets: list[str] = []

    def loop(client: Client) -> None:
        ctx = client._context()
        port = run["ports"]["envoy"]
        headers = {"content-type": "application/json", "authorization": f"Bearer {client.token}"}
        conn = None
        while not client.stop.is_set():
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=15)
                try:
                    conn.connect()  # TCP + TLS: a failure here sent no request
                except OSError as exc:
                    refused.append(f"{client.name}: {type(exc).__name__}")
                    return
            sent = time.monotonic()
            try:
                conn.request("POST", client.path, body=BODY, headers=headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                resets.append(f"{client.name}: {type(exc).__name__}: {exc} ({time.monotonic() - sent:.3f}s)")
                return
            client.answers.append(
                Answer(sent, time.monotonic(), response.status, response.getheader("x-cohortgate-variant"))
            )
            if response.will_close:  # Envoy is draining: Connection: close
                conn.close()
                conn = None

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while not all(c.answers for c in clients):
        assert time.monotonic() < deadline, up.output()
        time.sleep(0.05)
    stopped = time.monotonic()
    up.proc.send_signal(signal.SIGTERM)
    assert up.wait_exit(60) == 0, up.output()
    for thread in threads:
        thread.join(20)
    assert not resets, f"requests reset during the drain: {resets}\n{up.output()}"
    during = [a for c in clients for a in c.answers if a.sent >= stopped]
    assert during, "no request was sent during the drain: the test proved nothing"
    assert all(a.status == 200 for a in during), [(a.status, a.variant) for a in during][:10]
    assert len(refused) == len(clients)  # each client ended on a closed listener, not a reset
    output = up.output()
    assert "draining envoy: every connection closed" in output, output
    print(f"chaos: stop (SIGTERM) under load: {len(during)} requests answered during the drain, none reset")


POLICY_OVERRIDE = "qa-beta: control"


def digests(run: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the controller's policy digest, the gateway's) as each reports it now."""
    admin = Path(run["admin_token_file"]).read_text().strip()
    controller = gateway = None
    try:
        request = urllib.request.Request(
            f"{run['endpoints']['controller_api']}/status", headers={"authorization": f"Bearer {admin}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            controller = json.loads(response.read())["controller"]["policy_digest"]
    except OSError:
        pass
    try:
        health = run["endpoints"]["gateway_metrics"].removesuffix("/metrics") + "/healthz"
        with urllib.request.urlopen(health, timeout=5) as response:
            gateway = json.loads(response.read())["policy"]
    except OSError:
        pass
    return controller, gateway


def test_the_controller_never_runs_a_policy_the_gateway_refused(up_factory, tmp_path: Path) -> None:  # noqa: F811
    jwks, models = ROOT / "certs" / "jwks.json", ROOT / "models"
    policy = tmp_path / "policy.yaml"
    good = POLICY.format(jwks=jwks, models=models, overrides="", extra="")
    policy.write_text(good)
    up = up_factory(policy)
    run = up.wait_run()
    serving = run["policy"]["digest"]
    assert digests(run) == (serving, serving[:12])

    samples: list[tuple[str | None, str | None]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(digests(run))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # An edit `up` accepts (it parses) but the gateway refuses: its JWKS does not load.
        bad_jwks = tmp_path / "bad-jwks.json"
        bad_jwks.write_text("not json")
        policy.write_text(POLICY.format(jwks=bad_jwks, models=models, overrides="", extra=""))
        deadline = time.monotonic() + 60
        while "the gateway refused the edit" not in up.output():
            assert time.monotonic() < deadline and up.proc.poll() is None, up.output()
            time.sleep(0.1)
        refused = {line for line in up.output().splitlines() if "refused the edit" in line}
        assert refused
        time.sleep(2.0)  # the controller polls its file every second: give it the chance to go wrong
        effective = Path(run["policy"]["effective"]).read_text()
        assert str(bad_jwks) not in effective  # the gateway's file is back on the serving bytes
        assert str(bad_jwks) not in Path(run["policy"]["controller"]).read_text()

        # The operator reverts the file: nothing to apply, both still on the serving policy.
        policy.write_text(good)
        deadline = time.monotonic() + 30
        while "changed, the effective policy did not" not in up.output():
            assert time.monotonic() < deadline, up.output()
            time.sleep(0.1)
        time.sleep(2.0)
        assert digests(run) == (serving, serving[:12])

        # A good edit afterwards reaches both.
        policy.write_text(POLICY.format(jwks=jwks, models=models, overrides=POLICY_OVERRIDE, extra=""))
        deadline = time.monotonic() + 60
        while True:
            controller, gateway = digests(run)
            if controller and controller != serving and gateway and controller.startswith(gateway):
                break
            assert time.monotonic() < deadline, (controller, gateway, up.output())
            time.sleep(0.2)
    finally:
        stop.set()
        sampler.join(10)
    new = up.run()["policy"]["digest"]
    assert new == controller != serving
    # Throughout: the controller only ever named a policy the gateway served (or serves next).
    gateway_served = {g for _, g in samples if g}
    assert gateway_served <= {serving[:12], new[:12]}, gateway_served
    controller_ran = {c for c, _ in samples if c}
    assert controller_ran <= {serving, new}, controller_ran


@pytest.mark.skipif(not CHAOS, reason="make test-chaos (the unit tests cover the rule)")
def test_a_crash_loop_is_reported_and_left_down_while_the_rest_serves(up_factory, tmp_path: Path) -> None:  # noqa: F811
    """A sidecar that dies more often than the limit: `up` stops restarting it, says so, and keeps the
    rest of the stack up."""
    up = up_factory(EXAMPLE, "--max-restarts", "2")
    run = up.wait_run()
    name = "sidecar-ae-scoring-control-ae"
    for _ in range(3):  # kill it three times, each time once it is back
        pid = child_pid(up, name)
        if pid is None:
            pytest.fail(f"{name} has no pid: {up.run()['children'][name]}\n{up.output()}")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while True:
            child = up.run()["children"][name]
            if child["state"] == "failed" or (child["state"] == "ready" and child["pid"] != pid):
                break
            assert time.monotonic() < deadline, up.output()
            time.sleep(0.05)
    child = up.run()["children"][name]
    assert child["state"] == "failed" and child["pid"] is None and child["restarts"] == 2, child
    assert up.run()["supervision"]["failed"] == [name]
    output = up.output()
    assert f"{name}: exited 3 times" in output and "crash loop: not restarting it" in output
    # The rest serves: the tabular route answers, `up` still runs.
    client = Client("tabular-eu", run, "/v2/models/tabular/infer", token(run, "eve", "eu")).start()
    try:
        client.first_ok_after(time.monotonic())
    finally:
        client.stop.set()
        client.thread.join(20)
    assert up.proc.poll() is None
    print(f"chaos: crash loop of {name}: left down after 2 restarts, the rest serves")
