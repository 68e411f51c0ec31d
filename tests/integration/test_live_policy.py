"""Policy edits under steady load, through a real Envoy, a real gateway and real upstreams.

One bounded run (~150 req/s for ~13 s, 200 users) while `cohortgate policy apply` replaces the
live file four times: (a) a new variant on a new backend (a new Envoy cluster), (b) new weights,
(c) a shadow removed (its clusters leave Envoy after the grace), (d) a malformed file. Then a SIGHUP
with the file unchanged. Every response must be a 200 (no 5xx, no 503 ``NC``); the new backend gets
traffic within 2 s; users only ever move into the growing variant; the malformed file is refused
and the previous policy keeps serving; the SIGHUP changes nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cohortgate.deploy import pki
from tests.integration.conftest import POLICY, ROOT, Client, GatewayProcess, Upstream, _handler, free_port, mint

pytestmark = pytest.mark.integration

USERS = [f"user-{i}" for i in range(200)]
RATE = 150  # requests per second, all threads together
WAIT_S = 30.0  # generous bound for "this eventually happens" on a busy 2-core CI machine
THREADS = 6
TEST_ID = "live-policy"

FRESH = """      - name: fresh
        weight: {weight}
        backends:
          - {{url: "{url}", region: eu}}
"""


@dataclass(frozen=True)
class Sample:
    t: float
    user: str
    status: int
    variant: str
    upstream: str


def _policy(upstreams: dict[str, Upstream], jwks: Path, fresh_url: str, step: str) -> str:
    """The conftest policy, then: a = +fresh 10 %, b = fresh 20 %, c = b without the shadow."""
    text = POLICY.format(jwks=jwks, **{name: u.url for name, u in upstreams.items()})
    if step == "0":
        return text
    fresh_weight, control_weight = (10, 80) if step == "a" else (20, 70)
    canary_block = text[text.index("      - name: canary") : text.index("    shadows:")]
    text = text.replace(canary_block, canary_block + FRESH.format(weight=fresh_weight, url=fresh_url))
    text = text.replace("        weight: 90\n", f"        weight: {control_weight}\n", 1)
    if step == "c":
        shadows = text[text.index("    shadows:") : text.index("  - name: ae-scoring")]
        text = text.replace(shadows, "")
    return text


def _apply(source: Path, live: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cohortgate.cli", "policy", "apply", str(source), "--to", str(live)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


class Load:
    """``RATE`` requests per second from ``THREADS`` threads over ``USERS``; every answer recorded."""

    def __init__(self, port: int, certs: pki.CertPaths) -> None:
        cert, key = certs.clients["app-demo"]
        self.client = Client(port, certs.ca_cert, cert, key)
        self.tokens = {u: mint(certs, u, residency="eu") for u in USERS}
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(THREADS)]

    def _run(self, index: int) -> None:
        period = THREADS / RATE
        users = USERS[index::THREADS]
        n = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            user = users[n % len(users)]
            n += 1
            try:
                reply = self.client.request(token=self.tokens[user], headers={"x-test-id": TEST_ID})
                self.samples.append(
                    Sample(
                        time.monotonic(),
                        user,
                        reply.status,
                        reply.headers.get("x-cohortgate-variant", ""),
                        reply.headers.get("x-upstream", ""),
                    )
                )
            except Exception as exc:  # a transport failure counts as a failed request
                self.errors.append(f"{user}: {type(exc).__name__}: {exc}")
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def first(self, after: float, upstream: str) -> float | None:
        return next((s.t for s in list(self.samples) if s.t >= after and s.upstream == upstream), None)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s: {what}"
        time.sleep(0.02)


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if not line.startswith("#") and line.rsplit(" ", 1)[0] == name:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_policy_edits_under_load_lose_no_request(
    tmp_path: Path, certs: pki.CertPaths, upstreams: dict[str, Upstream]
) -> None:
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy.envoy import ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess

    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.daemon_threads = True
    fresh = Upstream("fresh-eu", "eu", server)
    server.RequestHandlerClass = _handler(fresh)
    threading.Thread(target=server.serve_forever, name="upstream-fresh", daemon=True).start()

    policies = {step: tmp_path / f"policy-{step}.yaml" for step in "0abc"}
    for step, path in policies.items():
        path.write_text(_policy(upstreams, certs.jwks, fresh.url, step))
    malformed = tmp_path / "policy-bad.yaml"
    malformed.write_text(policies["c"].read_text().replace("weight: 70", "weight: 75"))  # sums to 105
    live = tmp_path / "live.yaml"
    live.write_bytes(policies["0"].read_bytes())

    sock = tmp_path / "run" / "processor.sock"
    admin_port, metrics_port = free_port(), free_port()
    files = render(
        load_policy(live),
        certs=certs,
        out_dir=tmp_path / "envoy",
        processor=ProcessorAddress(uds=str(sock)),
        listen_port=free_port(),
        admin_port=admin_port,
    )
    gateway = GatewayProcess(live, sock, "grpc", tmp_path)
    gateway.cmd += [
        "--envoy-cds", str(files.cds),
        "--envoy-admin", f"http://127.0.0.1:{admin_port}",
        "--watch-interval", "0.2",
        "--reload-grace", "1",
        "--metrics", f"127.0.0.1:{metrics_port}",
    ]  # fmt: skip
    gateway.start()
    envoy = EnvoyProcess(files, log_path=tmp_path / "envoy.log", concurrency=2)
    try:
        with envoy:
            challenger = upstreams["challenger-eu"]
            with Load(envoy.listen_port, certs) as load:
                _wait(lambda: len(load.samples) > 150, WAIT_S, "steady load")
                started = time.monotonic()

                # (a) a new variant on a new backend: a new cluster, confirmed before it is named
                assert _apply(policies["a"], live).returncode == 0
                applied_a = time.monotonic()
                # The promise is order (named only once Envoy has the cluster, so no request fails on
                # it), checked below by "no request failed"; how soon is bench/'s business.
                _wait(lambda: load.first(applied_a, "fresh-eu") is not None, WAIT_S, "traffic on the new backend")
                assert "cg.tabular.fresh.0" in envoy.clusters()
                time.sleep(1.0)

                # (b) new weights: fresh grows from 10 to 20 %, control shrinks
                assert _apply(policies["b"], live).returncode == 0
                time.sleep(1.5)

                # (c) the shadow goes: mirrors stop, and its clusters leave Envoy after the grace
                assert _apply(policies["c"], live).returncode == 0
                applied_c = time.monotonic()
                _wait(lambda: "cg.tabular.challenger.0" not in envoy.clusters(), WAIT_S, "shadow clusters removed")
                mirrors_after = len(challenger.seen(TEST_ID))
                time.sleep(1.0)
                assert len(challenger.seen(TEST_ID)) == mirrors_after, "mirrors went on after the shadow left"

                # (d) malformed: `policy apply` refuses it; written behind its back, the gateway does
                failures = _metric(metrics_port, 'cohortgate_policy_reloads_total{result="failed"}')
                refused = _apply(malformed, live)
                assert refused.returncode == 1 and "policy-bad.yaml:" in refused.stderr
                assert live.read_bytes() == policies["c"].read_bytes()
                offset = gateway.log_path.stat().st_size
                tmp = live.with_name(".edit.yaml")
                tmp.write_bytes(malformed.read_bytes())
                os.replace(tmp, live)
                _wait(
                    lambda: _metric(metrics_port, 'cohortgate_policy_reloads_total{result="failed"}') > failures,
                    WAIT_S,
                    "the malformed file refused",
                )
                lines = [ln for ln in gateway.tail(offset).splitlines() if "policy_reload_failed" in ln]
                assert len(lines) == 1
                doc = json.loads(lines[0][lines[0].index("{") :])
                assert doc["reason"] == "invalid" and doc["problems"][0].startswith(f"{live}:")
                malformed_at = time.monotonic()
                time.sleep(1.0)

                # SIGHUP with the file back as it was serving: nothing changes
                tmp.write_bytes(policies["c"].read_bytes())
                os.replace(tmp, live)
                time.sleep(0.5)
                reloads = _metric(metrics_port, 'cohortgate_policy_reloads_total{result="ok"}')
                offset = gateway.log_path.stat().st_size
                assert gateway.proc is not None
                gateway.proc.send_signal(signal.SIGHUP)
                time.sleep(0.8)
                assert _metric(metrics_port, 'cohortgate_policy_reloads_total{result="ok"}') == reloads == 3
                assert "policy reloaded" not in gateway.tail(offset)
                end = time.monotonic()
    finally:
        gateway.stop()
        server.shutdown()
        server.server_close()

    samples = load.samples
    assert not load.errors, load.errors[:5]
    bad = [s for s in samples if s.status != 200]
    assert not bad, f"{len(bad)} of {len(samples)} requests failed, e.g. {bad[:5]}"
    # The load ran through every step (a count per step, not a rate: a busy CI machine may be slow).
    steps = [started, applied_a, applied_c, malformed_at, end]
    per_step = [sum(1 for s in samples if a <= s.t < b) for a, b in itertools.pairwise(steps)]
    assert all(n >= 20 for n in per_step), f"requests per step {per_step}: the load stalled"
    # Users move only as the monotone ramp allows: into the growing variant, never out of it.
    history: dict[str, list[str]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.t):
        if not history[s.user] or history[s.user][-1] != s.variant:
            history[s.user].append(s.variant)
    moves = {(a, b) for h in history.values() for a, b in itertools.pairwise(h)}
    assert moves == {("control", "fresh")}, moves
    moved = sum(1 for h in history.values() if h[-1] == "fresh")
    assert 0.10 * len(USERS) <= moved <= 0.32 * len(USERS), moved
    # After the refused file the previous policy kept serving: still the b/c split, still fresh.
    late = [s for s in samples if s.t > malformed_at]
    assert late and {s.variant for s in late} == {"control", "canary", "fresh"}
    assert applied_c < malformed_at
