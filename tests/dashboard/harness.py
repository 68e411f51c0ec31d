"""A real `cohortgate controller` process fed with synthetic traffic through its real ALS receiver.

`ControllerProc` starts ``python -m cohortgate.cli controller`` with the access-log service on a Unix
socket, the JSON API and the dashboard on free loopback ports. `Feeder` plays Envoy: it streams
``HTTPAccessLogEntry`` messages over gRPC to that socket (requests with route/variant/region/unit
headers as the processor sets them, and denials without them), picks each unit's variant from the
weights the controller writes to its state file (as a gateway following it would), and posts
sidecar-style shadow reports to ``/reports``. No Envoy: it is faster, and Envoy's side of the access
log is covered by the controller and data-plane suites.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from cohortgate.store.state import read_states

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def policy_text(min_samples: int = 100, steps: str = "[10, 25, 50, 100]", interval_s: int = 600) -> str:
    return f"""version: 1
jwt: {{issuer: https://auth.cohortgate.local, audience: cohortgate, jwks: jwks.json}}
routes:
  - name: tabular
    match: {{model: tabular}}
    cohorts: {{unit: {{claim: sub}}, salt: dashboard-tests}}
    residency: {{source: {{claim: residency}}, on_missing_region: fallback_control}}
    variants:
      - name: control
        weight: 90
        backends: [{{url: 'http://127.0.0.1:18301', region: eu}}, {{url: 'http://127.0.0.1:18303', region: us}}]
      - name: canary
        weight: 10
        backends: [{{url: 'http://127.0.0.1:18302', region: eu}}, {{url: 'http://127.0.0.1:18304', region: us}}]
    shadows:
      - name: challenger
        percent: 100
        backends: [{{url: 'http://127.0.0.1:18309', region: eu}}]
    guardrails: {{max_error_rate: 0.05, max_p99_ms: 400, min_samples: {min_samples}}}
    rollout: {{variant: canary, steps: {steps}, interval_s: {interval_s}}}
"""


class ControllerProc:
    """One controller child process; ``stop`` sends SIGTERM and waits."""

    def __init__(self, work: Path, *, allow_actions: bool = False, interval: str = "0.25s") -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.policy = work / "policy.yaml"
        self.policy.write_text(policy_text())
        self.api_port = free_port()
        self.dash_port = free_port()
        self.als = work / "als.sock"
        self.token_file = work / "admin.token"
        self.state_file = work / "state.json"
        self.log_path = work / "controller.log"
        self.cmd = [
            sys.executable, "-m", "cohortgate.cli", "controller",
            "--policy", str(self.policy),
            "--als", f"uds:{self.als}",
            "--listen", f"127.0.0.1:{self.api_port}",
            "--dashboard", f"127.0.0.1:{self.dash_port}",
            "--token-file", str(self.token_file),
            "--state-file", str(self.state_file),
            "--interval", interval,
        ] + (["--allow-actions"] if allow_actions else [])  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}/"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def start(self, timeout_s: float = 120.0) -> ControllerProc:  # a loaded 2-core CI box: imports alone took 17 s
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.work, env=env)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "api/state", timeout=1) as r:
                    if r.status == 200 and self.als.exists():
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"controller did not come up:\n{self.log_path.read_text()[-3000:]}")

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "api/state", timeout=5) as r:
            return json.loads(r.read())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``cohortgate ARGS --api ... --token-file ...`` as an operator would type it."""
        cmd = [sys.executable, "-m", "cohortgate.cli", *args, "--api", self.api, "--token-file", str(self.token_file)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=self.work, env=env)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def _bucket(unit: str) -> int:
    return int.from_bytes(hashlib.sha256(unit.encode()).digest()[:4], "big") % 100


class Feeder(threading.Thread):
    """Envoy's access log and the sidecars' reports, synthesised at ``rate`` requests/s (seeded)."""

    def __init__(
        self,
        ctrl: ControllerProc,
        rate: float = 250.0,
        canary_errors: float = 0.0,
        canary_slowdown: float = 1.0,
        denial_share: float = 0.05,
        seed: int = 7,
    ) -> None:
        super().__init__(daemon=True, name="als-feeder")
        self.ctrl = ctrl
        self.rate = rate
        self.canary_errors = canary_errors
        self.canary_slowdown = canary_slowdown
        self.denial_share = denial_share
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None
        self.units = [hashlib.sha256(f"user-{i}".encode()).hexdigest()[:16] for i in range(600)]
        self._weights = {"control": 90, "canary": 10}
        self._weights_at = 0.0

    def weights(self) -> dict[str, int]:
        """What a gateway following the controller's state file would apply."""
        if time.monotonic() - self._weights_at > 0.2:
            self._weights_at = time.monotonic()
            states, _safe_mode = read_states(self.ctrl.state_file)  # the checksummed file, as a store reads it
            st = states.get("tabular")
            if st is not None:
                self._weights = {n: 0 if n in st.disabled else int(w) for n, w in st.weights.items()}
        return self._weights

    def _entry(self, rid: str, reports: list[dict[str, Any]]) -> Any:
        from envoy.data.accesslog.v3 import accesslog_pb2

        rng = self.rng
        e = accesslog_pb2.HTTPAccessLogEntry()
        c = e.common_properties
        c.start_time.FromNanoseconds(time.time_ns())
        e.request.request_id = rid
        if rng.random() < self.denial_share:  # refused by the processor: no route/variant headers
            c.duration.FromMilliseconds(1)
            e.response.response_code.value = rng.choices([401, 403, 451], [6, 3, 1])[0]
            return e
        unit = rng.choice(self.units)
        canary_w = self.weights().get("canary", 0)
        variant = "canary" if _bucket(unit) < canary_w else "control"
        region = "us" if _bucket(unit + "r") < 15 else "eu"
        slow = self.canary_slowdown if variant == "canary" else 1.0
        latency = rng.lognormvariate(3.0, 0.35) * slow
        failed = variant == "canary" and rng.random() < self.canary_errors
        c.time_to_first_upstream_tx_byte.FromMicroseconds(500)
        c.time_to_last_upstream_rx_byte.FromMicroseconds(500 + int(latency * 1000))
        c.upstream_cluster = f"cg.tabular.{variant}.0"
        e.request.request_headers.update(
            {
                "x-cohortgate-route": "tabular",
                "x-cohortgate-variant": variant,
                "x-cohortgate-unit": unit,
                "x-cohortgate-region": region,
            }
        )
        e.response.response_code.value = 500 if failed else 200
        if rng.random() < 0.3:  # the sidecars' own reports on the primary and its shadow copy
            digest = f"{rng.randrange(3)}"
            shadow_digest = digest if rng.random() < 0.92 else "x"
            reports.append({"route": "tabular", "variant": variant, "request_id": rid, "status": 200,
                            "latency_ms": latency, "digest": digest})  # fmt: skip
            reports.append({"route": "tabular", "variant": "challenger", "request_id": rid, "status": 200,
                            "latency_ms": latency + rng.gauss(4.0, 1.5), "digest": shadow_digest})  # fmt: skip
        return e

    def _messages(self) -> Any:
        from envoy.service.accesslog.v3 import als_pb2

        first = True
        tick = 0.1
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            msg = als_pb2.StreamAccessLogsMessage()
            if first:
                msg.identifier.log_name = "cohortgate"
                first = False
            reports: list[dict[str, Any]] = []
            n = int(self.rate * tick)
            for _ in range(n):
                self.sent += 1
                msg.http_logs.log_entry.append(self._entry(f"rid-{self.sent}", reports))
            yield msg
            if reports:
                self._post_reports(reports)
            self.stop_event.wait(max(0.0, tick - (time.monotonic() - t0)))

    def _post_reports(self, reports: list[dict[str, Any]]) -> None:
        req = urllib.request.Request(
            f"{self.ctrl.api}/reports", data=json.dumps(reports).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with contextlib.suppress(OSError):
            urllib.request.urlopen(req, timeout=2).close()

    def run(self) -> None:
        import grpc
        from envoy.service.accesslog.v3 import als_pb2_grpc

        try:
            with grpc.insecure_channel(f"unix:{self.ctrl.als}") as channel:
                als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(self._messages())
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
