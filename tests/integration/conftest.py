"""Real parts for the data-plane tests: certificates, upstreams, the gateway process and Envoy.

Everything listens on 127.0.0.1 (or a Unix socket in a temp dir). The `dataplane` fixture is
parametrised over `TRANSPORTS`, one Envoy + gateway pair per transport and module; adding a
transport is one entry there (``COHORTGATE_TEST_TRANSPORTS=grpc,fast`` picks a list explicitly).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cohortgate.deploy import pki

ROOT = Path(__file__).resolve().parents[2]

#: transport name -> (gateway --transport, --grpc-server, envoyconf transport)
TRANSPORT_ARGS = {
    "grpc": ("grpc", "grpcio", "grpc"),
    "http": ("http", "grpcio", "http"),
    "fast": ("grpc", "fast", "grpc"),
}
TRANSPORTS = (
    os.environ.get("COHORTGATE_TEST_TRANSPORTS", "").split(",")
    if os.environ.get("COHORTGATE_TEST_TRANSPORTS")
    else ["grpc", "http", "fast"]
)

#: upstream name -> region. `challenger-*` are shadows; `scoring-ae` serves the ae-only route.
UPSTREAMS = {
    "control-eu": "eu",
    "control-ae": "ae",
    "canary-eu": "eu",
    "challenger-eu": "eu",
    "challenger-ae": "ae",
    "scoring-ae": "ae",
}

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
  - name: tabular
    match: {{model: tabular, methods: [GET, POST]}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [predict]
    cohorts:
      unit: {{claim: sub}}
      salt: dataplane-test
    residency:
      source: {{claim: residency}}
      on_missing_region: fallback_control
    variants:
      - name: control
        weight: 90
        backends:
          - {{url: "{control-eu}", region: eu}}
          - {{url: "{control-ae}", region: ae}}
      - name: canary
        weight: 10
        backends:
          - {{url: "{canary-eu}", region: eu}}
    shadows:
      - name: challenger
        percent: 100
        backends:
          - {{url: "{challenger-eu}", region: eu}}
          - {{url: "{challenger-ae}", region: ae}}
  - name: ae-scoring
    match: {{path_prefix: /v2/models/ae-scoring}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [predict]
    cohorts:
      unit: {{claim: sub}}
    residency:
      source: {{claim: residency}}
      allowed_regions: [ae]
      on_missing_region: deny
    variants:
      - name: control
        weight: 100
        backends:
          - {{url: "{scoring-ae}", region: ae}}
  - name: offline                       # a backend nobody listens on (port 9, discard)
    match: {{path_prefix: /v2/models/offline}}
    variants:
      - name: control
        weight: 100
        backends:
          - {{url: "http://127.0.0.1:9", region: eu}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ upstreams


@dataclass
class Upstream:
    """A tiny HTTP/1.1 server that answers with its own name and records every request it gets."""

    name: str
    region: str
    server: ThreadingHTTPServer
    received: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def seen(self, test_id: str) -> list[dict[str, Any]]:
        return [r for r in list(self.received) if r["headers"].get("x-test-id") == test_id]


def _handler(upstream: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()  # answer in one segment, not held back by Nagle until Envoy's delayed ACK
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            upstream.received.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
            )
            out = json.dumps({"upstream": upstream.name, "region": upstream.region}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.send_header("x-upstream", upstream.name)
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _answer

    return Handler


@pytest.fixture(scope="session")
def upstreams() -> Iterator[dict[str, Upstream]]:
    found: dict[str, Upstream] = {}
    for name, region in UPSTREAMS.items():
        server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
        server.daemon_threads = True
        upstream = Upstream(name, region, server)
        server.RequestHandlerClass = _handler(upstream)
        threading.Thread(target=server.serve_forever, name=f"upstream-{name}", daemon=True).start()
        found[name] = upstream
    yield found
    for upstream in found.values():
        upstream.server.shutdown()
        upstream.server.server_close()


# ------------------------------------------------------------------------------ certificates


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("pki") / "certs", clients=("app-demo", "qa"))


@pytest.fixture(scope="session")
def foreign(certs: pki.CertPaths) -> pki.ForeignClient:
    return pki.mint_foreign_client(certs.dir, "app-demo")


@pytest.fixture(scope="session")
def policy_file(tmp_path_factory: pytest.TempPathFactory, certs: pki.CertPaths, upstreams: dict[str, Upstream]) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY.format(jwks=certs.jwks, **{name: u.url for name, u in upstreams.items()}))
    return path


def mint(certs: pki.CertPaths, sub: str, residency: str | None = "eu", **kwargs: Any) -> str:
    kwargs.setdefault("scopes", ["predict"])
    return pki.mint_token(certs, sub, residency=residency, **kwargs)


# ------------------------------------------------------------------------------ the client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """HTTPS with a client certificate; one keep-alive connection per thread."""

    def __init__(self, port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> None:
        self.port = port
        self.ctx = ssl.create_default_context(cafile=str(ca))
        if cert is not None:
            self.ctx.load_cert_chain(str(cert), str(key))
        self._local = threading.local()

    def connection(self) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection("localhost", self.port, context=self.ctx, timeout=10)
            self._local.conn = conn
        return conn

    def request(
        self,
        path: str = "/v2/models/tabular/infer",
        *,
        token: str | None = None,
        method: str = "POST",
        headers: dict[str, str] | None = None,
        body: bytes = b'{"inputs": []}',
    ) -> Reply:
        all_headers = {"content-type": "application/json", **(headers or {})}
        if token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        for attempt in range(2):
            conn = self.connection()
            try:
                conn.request(method, path, body=body if method == "POST" else None, headers=all_headers)
                resp = conn.getresponse()
                data = resp.read()
                return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


# ------------------------------------------------------------------------------ gateway + Envoy


class GatewayProcess:
    """``cohortgate gateway`` as a child process; ready when it logs "gateway ready"."""

    def __init__(self, policy: Path, socket_path: Path, transport: str, workdir: Path) -> None:
        flag, server, _ = TRANSPORT_ARGS[transport]
        self.cmd = [
            sys.executable, "-m", "cohortgate.cli", "gateway",
            "--policy", str(policy),
            "--transport", flag,
            "--grpc-server", server,
            "--listen", f"uds:{socket_path}",
            "--audit-log", str(workdir / "audit.jsonl"),
            "--max-body", "64k",
        ]  # fmt: skip
        self.log_path = workdir / "gateway.log"
        self.audit_path = workdir / "audit.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        env = {**os.environ, "COHORTGATE_UNIT_SALT": "integration-salt", "PYTHONPATH": str(ROOT)}
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.tail(offset)}")
            if b"gateway ready" in self.log_path.read_bytes()[offset:]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready after {timeout}s:\n{self.tail(offset)}")

    def tail(self, offset: int = 0) -> str:
        return self.log_path.read_bytes()[offset:][-4000:].decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


GATEWAY_START_S = 60.0  # generous: a loaded 2-core CI machine imports and starts the gateway slowly


@dataclass
class Edge:
    """A `cohortgate gateway` child and the Envoy in front of it, and a client with app-demo's certificate."""

    gateway: GatewayProcess
    envoy: Any
    client: Client


@contextlib.contextmanager
def edge(
    policy_file: Path,
    certs: pki.CertPaths,
    work: Path,
    *,
    transport: str = "grpc",
    gateway_args: Sequence[str] = (),
    access_log: Path | None = None,
) -> Iterator[Edge]:
    """The gateway (its socket and logs under ``work``) for ``policy_file``, then Envoy rendered from the
    same policy, as `cohortgate up` wires them; ``access_log`` is the controller's ALS socket, if any."""
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy.envoy import AccessLogTarget, ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess

    sock = work / "run" / "processor.sock"
    gateway = GatewayProcess(policy_file, sock, transport, work)
    gateway.cmd += list(gateway_args)
    try:
        gateway.start(timeout=GATEWAY_START_S)
        files = render(
            load_policy(policy_file),
            certs=certs,
            out_dir=work / "envoy",
            processor=ProcessorAddress(uds=str(sock)),
            transport=TRANSPORT_ARGS[transport][2],  # type: ignore[arg-type]
            listen_port=free_port(),
            admin_port=free_port(),
            access_log=AccessLogTarget(uds=str(access_log)) if access_log is not None else None,
        )
        with EnvoyProcess(files, log_path=work / "envoy.log", concurrency=1) as envoy:
            cert, key = certs.clients["app-demo"]
            client = Client(envoy.listen_port, certs.ca_cert, cert, key)
            try:
                yield Edge(gateway, envoy, client)
            finally:
                client.close()
    finally:
        gateway.stop()


class ControllerThread:
    """A real `Controller` (in-process events; its state in memory, or in ``state_file`` for a gateway
    child to follow) and its API on 127.0.0.1:``port``, served from a thread of their own; ``skew``
    moves the controller's clock ahead (a test steps past an interval instead of waiting for it)."""

    def __init__(
        self, policy: Any, port: int, admin: str, *, state_file: Path | None = None, outcomes: Any = None
    ) -> None:
        self.policy, self.port, self.admin = policy, port, admin
        self.state_file, self.outcomes = state_file, outcomes
        self.skew = 0.0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="controller-api", daemon=True)

    def _run(self) -> None:
        from aiohttp import web

        from cohortgate.controller.api import make_app
        from cohortgate.controller.loop import Controller
        from cohortgate.store.events import InProcessSink
        from cohortgate.store.state import InProcessState

        async def start() -> None:
            sink = InProcessSink()
            await sink.start()
            store = InProcessState(cache_path=self.state_file)
            clock = lambda: time.time() + self.skew  # noqa: E731
            self.controller = Controller(self.policy, store, sink, clock=clock, outcomes=self.outcomes)
            await self.controller.start()
            self.runner = web.AppRunner(make_app(self.controller, self.admin, sink))
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(start())
        self.ready.set()
        self.loop.run_forever()

    def start(self) -> ControllerThread:
        self.thread.start()
        assert self.ready.wait(30), "the controller API did not start in 30 s"
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def call(self, coro: Any, timeout_s: float = 60.0) -> Any:
        """Run ``coro`` on the controller's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def get(self, path: str) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Bearer {self.admin}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())


@dataclass
class ControlledEdge:
    """The closed loop in this event loop (controller, its access-log receiver, the gateway following
    its weights) and Envoy in front of it as a child, with a client holding app-demo's certificate."""

    controller: Any
    store: Any
    sink: Any
    gateway: Any
    receiver: Any
    port: int
    client: Client


@contextlib.asynccontextmanager
async def controlled_edge(
    policy_path: Path,
    certs: pki.CertPaths,
    work: Path,
    *,
    salt: bytes,
    als_options: Callable[[Any], dict[str, Any]] = lambda controller: {},
) -> AsyncIterator[ControlledEdge]:
    """The controller (a look every 0.25 s; in-process events and state), the gateway (in process,
    following the controller's weights) and the ALS receiver Envoy streams its access log to;
    ``als_options(controller)`` are `serve_als`'s keyword arguments."""
    from cohortgate.controller.als import serve_als
    from cohortgate.controller.loop import Controller, ControllerConfig
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy.envoy import AccessLogTarget, ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess
    from cohortgate.store.events import InProcessSink
    from cohortgate.store.state import InProcessState, follow
    from gateway.service import Gateway, GatewayConfig, ListenAddress

    policy = load_policy(policy_path)
    run = work / "run"
    run.mkdir()
    sock, als_sock = run / "processor.sock", run / "als.sock"
    sink = InProcessSink()
    await sink.start()
    store = InProcessState()
    controller = Controller(policy, store, sink, config=ControllerConfig(interval_s=0.25))
    await controller.start()
    config = GatewayConfig(
        policy_path=str(policy_path), listen=ListenAddress(uds=str(sock)), audit_log=None, unit_salt=salt
    )
    gateway = Gateway(config, policy=policy)
    follow(gateway.holder, store)
    await gateway.start()
    als_server, receiver = await serve_als(sink, f"uds:{als_sock}", **als_options(controller))
    files = render(
        policy,
        certs=certs,
        out_dir=work / "envoy",
        processor=ProcessorAddress(uds=str(sock)),
        listen_port=free_port(),
        admin_port=free_port(),
        access_log=AccessLogTarget(uds=str(als_sock)),
    )
    envoy = EnvoyProcess(files, log_path=work / "envoy.log", concurrency=1)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    cert, key = certs.clients["app-demo"]
    client = Client(files.listen_port, certs.ca_cert, cert, key)
    try:
        await asyncio.to_thread(envoy.__enter__)
        yield ControlledEdge(controller, store, sink, gateway, receiver, files.listen_port, client)
    finally:
        client.close()
        stop.set()
        await task
        await asyncio.to_thread(envoy.__exit__, None, None, None)
        await als_server.stop(0)
        await gateway.close()


@dataclass
class DataPlane:
    transport: str
    envoy: Any
    gateway: GatewayProcess
    certs: pki.CertPaths
    upstreams: dict[str, Upstream]
    port: int
    app: Client
    qa: Client

    def client(self, cert: Path | None = None, key: Path | None = None) -> Client:
        return Client(self.port, self.certs.ca_cert, cert, key)

    def wait_mirrors(self, names: list[str], test_id: str, count: int = 1, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(self.upstreams[n].seen(test_id)) >= count for n in names):
                return
            time.sleep(0.02)


@pytest.fixture(scope="module", params=TRANSPORTS)
def dataplane(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    certs: pki.CertPaths,
    upstreams: dict[str, Upstream],
    policy_file: Path,
) -> Iterator[DataPlane]:
    transport: str = request.param
    work = tmp_path_factory.mktemp(f"dataplane-{transport}")
    with edge(policy_file, certs, work, transport=transport) as e:
        qa_cert, qa_key = certs.clients["qa"]
        qa = Client(e.envoy.listen_port, certs.ca_cert, qa_cert, qa_key)
        try:
            yield DataPlane(transport, e.envoy, e.gateway, certs, upstreams, e.envoy.listen_port, e.client, qa)
        finally:
            qa.close()
