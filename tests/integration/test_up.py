"""`cohortgate up` end to end: the real stack as a subprocess, called like a client app, then stopped.

Runs on free ports with a temporary ``--state-dir``; models and certificates go where the example
policy says (the repository's git-ignored ``models/`` and ``certs/``), built on first use.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cohortgate.deploy import pki
from tests.controller.conftest import RedisServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies" / "example.yaml"
CLI = [sys.executable, "-m", "cohortgate.cli"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Up:
    """``cohortgate up`` as a child process, its output in a file."""

    def __init__(self, tmp: Path, policy: Path, *extra: str) -> None:
        self.state = tmp / "state"
        tmp.mkdir(parents=True, exist_ok=True)
        self.out = tmp / "up.out"
        argv = [*CLI, "up", "--policy", str(policy), "--state-dir", str(self.state), "--free-ports", *extra]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_run(self, timeout: float = 180.0) -> dict[str, Any]:
        """The run file, once `up` has written it (every child is ready) and printed its banner.

        Generous: on a loaded 2-core machine the stack takes 25-60 s to start (it is ~10 s when idle)."""
        path = self.state / "run.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"`cohortgate up` exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(FileNotFoundError, ValueError):
                run = json.loads(path.read_text())
                if "Ctrl-C stops everything" in self.output():
                    return run
            time.sleep(0.05)
        pytest.fail(f"no run.json after {timeout}s:\n{self.output()}")

    def run(self) -> dict[str, Any]:
        return json.loads((self.state / "run.json").read_text())

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`cohortgate up` still running after {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def up_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Up] = []

    def start(policy: Path = EXAMPLE, *extra: str) -> Up:
        up = Up(tmp_path / f"up{len(started)}", policy, *extra)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


def call(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "call", *args, "--state-dir", str(state)], capture_output=True, text=True, timeout=30, cwd=ROOT
    )


def https(run: dict[str, Any], token: str | None, path: str = "/v2/models/tabular/infer") -> tuple[int, dict, Any]:
    """A plain HTTPS client with the app's certificate, as any application would call."""
    certs = run["certs"]
    ctx = ssl.create_default_context(cafile=certs["ca"])
    ctx.load_cert_chain(certs["clients"]["app-demo"]["cert"], certs["clients"]["app-demo"]["key"])
    conn = http.client.HTTPSConnection("127.0.0.1", run["ports"]["envoy"], context=ctx, timeout=10)
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}
    try:
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
    finally:
        conn.close()


def test_up_serves_the_example_policy_and_stops_every_child(up_factory) -> None:
    up = up_factory()
    run = up.wait_run()
    children = run["children"]
    kinds = sorted(c["kind"] for c in children.values())
    assert kinds == ["controller", "envoy", "gateway"] + ["sidecar"] * 8  # tabular 4, ae-scoring 1, shop 3
    assert all(alive(c["pid"]) for c in children.values())
    assert all(Path(c["log"]).is_file() for c in children.values())
    # The effective policy points Envoy at the ports the sidecars really bound.
    effective = Path(run["policy"]["effective"]).read_text()
    for child in children.values():
        if child["kind"] == "sidecar":
            assert f"http://127.0.0.1:{child['port']}" in effective
    output = up.output()
    assert "curl -i --cert" in output and f"https://127.0.0.1:{run['ports']['envoy']}/v2/models/tabular/infer" in output
    # The curl mints its own token: no bearer token is printed (it would outlive the terminal).
    assert "$(cohortgate token --certs" in output and "eyJ" not in output
    assert all(c["restarts"] == 0 and c["state"] == "ready" for c in children.values())
    # The dashboard and the gateway's metrics are where run.json and the table say.
    dashboard, metrics = run["endpoints"]["dashboard"], run["endpoints"]["gateway_metrics"]
    assert dashboard == f"http://127.0.0.1:{run['ports']['dashboard']}/" and dashboard in output
    assert metrics == f"http://127.0.0.1:{run['ports']['gateway_metrics']}/metrics" and metrics in output
    with urllib.request.urlopen(dashboard, timeout=5) as response:
        assert response.status == 200 and "text/html" in response.headers["content-type"]

    # `cohortgate call`, as a user would run it; a QA user pinned to the canary proves the routing.
    for sub, variants in (("alice", {"control", "canary"}), ("qa-canary", {"canary"})):
        done = call(up.state, "tabular", "--sub", sub, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        answer = json.loads(done.stdout)
        assert answer["status"] == 200 and answer["variant"] in variants
        assert answer["served_by"] == answer["variant"]  # the sidecar of that variant really answered
        assert answer["body"]["outputs"][0]["shape"] == [1]

    # A plain HTTPS client with a token of its own.
    paths = pki.load_cert_paths(run["certs"]["dir"])
    token = pki.mint_token(paths, "bob", residency="eu", scopes=["predict"])
    status, headers, body = https(run, token)
    assert status == 200, body
    assert headers["x-cohortgate-variant"] in {"control", "canary"}
    assert headers["x-cohortgate-served-by"] == headers["x-cohortgate-variant"]
    assert {o["name"] for o in body["outputs"]} == {"label", "probabilities"}

    # No token: 401 with a JSON error, from `call` and from the plain client.
    status, _, body = https(run, None)
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    denied = call(up.state, "tabular", "--no-token")
    assert denied.returncode == 1 and '"unauthenticated"' in denied.stdout

    # A short burst of demo traffic goes through too.
    traffic = subprocess.run(
        [*CLI, "traffic", "--users", "50", "--rps", "40", "--duration", "1.5s", "--state-dir", str(up.state)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert traffic.returncode == 0, traffic.stdout + traffic.stderr
    # every answer a 200 (how many of the 60 planned a loaded machine sends in 1.5 s is not the point)
    summary = re.search(r"^\s*status\s+(.*)$", traffic.stdout.split("total", 1)[-1], re.M)
    assert summary is not None and re.fullmatch(r"200:\d+", summary.group(1).strip()), traffic.stdout

    # The gateway counted what it decided: the two requests without a token among them.
    with urllib.request.urlopen(metrics, timeout=5) as response:
        exposition = response.read().decode()
    assert 'cohortgate_decisions_total{code="unauthenticated",outcome="denied"} 2.0' in exposition, exposition
    assert re.search(r'cohortgate_decisions_total\{code="none",outcome="allowed"\} (6[3-9]|[7-9]\d)\.0', exposition)
    assert f'cohortgate_policy_info{{digest="{run["policy"]["digest"][:12]}"}} 1.0' in exposition

    up.proc.send_signal(signal.SIGTERM)
    assert up.wait_exit() == 0, up.output()
    gone = {name: c["pid"] for name, c in children.items() if alive(c["pid"])}
    assert not gone, f"children still running: {gone}\n{up.output()}"
    assert not (up.state / "run.json").exists()
    assert "stopped envoy" in up.output()


POLICY = """\
version: 1
jwt: {{issuer: https://auth.cohortgate.local, audience: cohortgate, algorithms: [ES256], jwks: {jwks}}}
routes:
  - name: tabular
    match: {{model: tabular}}
    auth: {{scopes: [predict]}}
    cohorts:
      unit: {{claim: sub}}
      overrides: {{{overrides}}}
    residency: {{source: {{claim: residency}}, on_missing_region: fallback_control}}
    variants:
      - name: control
        weight: 100
        backends: [{{url: "http://127.0.0.1:18101", region: eu, model: {models}/tabular-control.onnx}}]
{extra}"""

BETA = """\
      - name: beta
        weight: 0
        backends: [{{url: "http://127.0.0.1:18106", region: eu, model: {models}/tabular-challenger.onnx}}]
"""


def test_policy_edits_apply_live_and_a_dying_sidecar_is_restarted(up_factory, tmp_path: Path) -> None:
    jwks, models = ROOT / "certs" / "jwks.json", ROOT / "models"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(jwks=jwks, models=models, overrides="", extra=""))
    up = up_factory(policy)
    run = up.wait_run()
    assert [c["kind"] for c in run["children"].values()].count("sidecar") == 1

    # A new variant with its own model: `up` starts its sidecar, Envoy learns the cluster, the gateway
    # switches; a QA user pinned to it is served by it.
    policy.write_text(
        POLICY.format(jwks=jwks, models=models, overrides="qa-beta: beta", extra=BETA.format(models=models))
    )
    deadline = time.monotonic() + 60  # generous: a busy 2-core machine
    # run.json names the new policy once the gateway serves it (its sidecar is listed from its start).
    while (
        "sidecar-tabular-beta-eu" not in up.run()["children"] or up.run()["policy"]["digest"] == run["policy"]["digest"]
    ):
        assert time.monotonic() < deadline, up.output()
        assert up.proc.poll() is None, up.output()
        time.sleep(0.1)
    done = call(up.state, "tabular", "--sub", "qa-beta", "--json")
    assert done.returncode == 0, done.stdout + done.stderr + up.output()
    assert json.loads(done.stdout)["served_by"] == "beta"

    # Dropping the variant again: once the gateway has switched (and a grace), its sidecar stops.
    beta = up.run()["children"]["sidecar-tabular-beta-eu"]
    policy.write_text(POLICY.format(jwks=jwks, models=models, overrides="", extra=""))
    deadline = time.monotonic() + 60
    while alive(beta["pid"]) or "sidecar-tabular-beta-eu" in up.run()["children"]:
        assert time.monotonic() < deadline, up.output()
        time.sleep(0.1)
    assert "1 started, 0 stopped" in up.output() and "0 started, 1 stopped" in up.output()
    assert call(up.state, "tabular", "--sub", "qa-beta").returncode == 0

    # A broken edit is refused and the stack keeps serving.
    policy.write_text("routes: [\n")
    time.sleep(1.5)
    assert "edit refused" in up.output()
    assert call(up.state, "tabular", "--sub", "alice").returncode == 0

    # One sidecar dies: `up` names it and restarts it on the same port; run.json shows the new pid.
    run = up.run()
    victim = run["children"]["sidecar-tabular-control-eu"]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60  # generous: a busy 2-core machine
    while True:
        child = up.run()["children"]["sidecar-tabular-control-eu"]
        if child["state"] == "ready" and child["pid"] != victim["pid"]:
            break
        assert time.monotonic() < deadline and up.proc.poll() is None, up.output()
        time.sleep(0.1)
    assert alive(child["pid"]) and child["restarts"] == 1 and child["port"] == victim["port"]
    assert "sidecar-tabular-control-eu: exited unexpectedly (killed by SIGKILL)" in up.output()
    assert call(up.state, "tabular", "--sub", "alice").returncode == 0


def test_a_missing_policy_is_the_only_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "up", "--policy", str(tmp_path / "missing.yaml"), "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.splitlines() == [
        f"cohortgate up: cannot read the policy {tmp_path / 'missing.yaml'}: no such file"
    ]
    assert not (tmp_path / "state").exists()  # nothing prepared for a stack that cannot start


def test_every_port_up_picks_has_a_flag(up_factory, tmp_path: Path) -> None:
    from cohortgate.local.probes import any_free_port

    jwks, models = ROOT / "certs" / "jwks.json", ROOT / "models"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(jwks=jwks, models=models, overrides="", extra=""))
    ports = {}
    while len(set(ports.values())) < 4:
        ports = {k: any_free_port() for k in ("port", "controller-port", "dashboard-port", "gateway-metrics-port")}
    flags = [arg for k, v in ports.items() for arg in (f"--{k}", str(v))]
    up = up_factory(policy, *flags)
    run = up.wait_run()
    assert run["ports"]["envoy"] == ports["port"]
    # Envoy's admin is a Unix socket only this user can use (it can drain and quit Envoy): no port at all.
    admin = Path(run["endpoints"]["envoy_admin"].removeprefix("unix:"))
    assert run["endpoints"]["envoy_admin"].startswith("unix:") and "envoy_admin" not in run["ports"]
    assert stat.S_ISSOCK(admin.stat().st_mode) and stat.S_IMODE(admin.stat().st_mode) == 0o600
    assert run["ports"]["controller"] == ports["controller-port"]
    assert run["ports"]["dashboard"] == ports["dashboard-port"]
    assert run["ports"]["gateway_metrics"] == ports["gateway-metrics-port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['dashboard-port']}/", timeout=5) as response:
        assert response.status == 200


@pytest.fixture(params=["embedded", "redis"])
def redis_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """None (the embedded default), or a real redis-server's URL; requested before `up_factory`, so
    it outlives the stack."""
    if request.param == "embedded":
        yield None
        return
    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.stop()


def test_traffic_on_a_faulty_canary_leads_to_an_automatic_rollback(redis_url: str | None, up_factory) -> None:
    up = up_factory(EXAMPLE, "--canary-fault-rate", "0.5", *(["--redis", redis_url] if redis_url else []))
    run = up.wait_run()
    assert run["redis"] == redis_url
    assert run["children"]["sidecar-tabular-canary-eu"]["fault_rate"] == 0.5
    # EU users only (the canary serves EU), fast enough that the canary sees ~20 requests a second.
    # The duration is an hour, so finishing inside the (generous, busy-CI) timeout means the run
    # stopped at the rollback: --until-rollback, not the clock, ended it.
    traffic = subprocess.run(
        [*CLI, "traffic", "--users", "400", "--rps", "200", "--residency-mix", "eu=1", "--duration", "1h",
         "--until-rollback", "--state-dir", str(up.state)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert traffic.returncode == 0, traffic.stdout + traffic.stderr + up.output()
    assert "ROLLBACK rollback tabular/canary" in traffic.stdout, traffic.stdout
    assert "rollbacks 1" in traffic.stdout and "500:" in traffic.stdout, traffic.stdout

    # The controller says so, `up` printed the decision, and the gateway follows: a QA user pinned
    # to the canary is back on control (a rolled-back variant takes no overrides).
    token = Path(run["admin_token_file"]).read_text().strip()
    request = urllib.request.Request(
        f"{run['endpoints']['controller_api']}/status", headers={"authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert "rolled_back" in response.read().decode()
    deadline = time.monotonic() + 5
    while True:
        done = call(up.state, "tabular", "--sub", "qa-canary", "--json")
        if done.returncode == 0 and json.loads(done.stdout)["variant"] == "control":
            break
        assert time.monotonic() < deadline, done.stdout + done.stderr
        time.sleep(0.2)
    while "controller: rollback tabular/canary" not in up.output():  # `up` looks at the audit every second
        assert time.monotonic() < deadline + 3, up.output()
        time.sleep(0.1)


def test_the_demo_rolls_the_faulty_canary_back_and_ctrl_c_stops_it_all(up_factory) -> None:
    up = up_factory(EXAMPLE, "--demo", "--canary-fault-after", "1")  # the demo waits 20 s; a test need not
    run = up.wait_run()
    assert run["children"]["sidecar-tabular-canary-eu"]["fault_rate"] == 0.3  # the demo's default knob
    assert "--fault-after" in run["children"]["sidecar-tabular-canary-eu"]["argv"]
    deadline = time.monotonic() + 30
    while "controller: rollback tabular/canary" not in up.output():
        assert time.monotonic() < deadline and up.proc.poll() is None, up.output()
        time.sleep(0.2)
    run = up.run()
    assert run["children"]["traffic"]["kind"] == "traffic"
    up.proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert up.wait_exit() == 0, up.output()
    output = up.output()
    assert "stopped traffic" in output and "rollbacks 1" in output and "rollback tabular/canary" in output
    assert "Watch the controller roll the canary back" in output and run["endpoints"]["dashboard"] in output
    assert "fails 30% of its requests from 1 s after its first request on" in output
    status = next(line for line in output.splitlines() if line.strip().startswith("status"))
    assert all(f"{code}:" in status for code in (401, 403, 451)), status  # the demo's misbehaving clients
    gone = {name: c["pid"] for name, c in run["children"].items() if alive(c["pid"])}
    assert not gone, f"children still running: {gone}\n{output}"
