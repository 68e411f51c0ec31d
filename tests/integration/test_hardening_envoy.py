"""Findings of the outside review that Envoy's configuration fixes (issue 16.1, 16.3, 16.6, 16.7),
reproduced through the real Envoy and the real gateway, for every processor transport.

The upstreams here record every request whose headers arrive, read chunked bodies to the end and
record it again once its whole body arrived; an oversized body must reach neither record.
Envoy and the gateway refuse bodies over 64 KiB (the same ``--max-body`` for both).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import h2.connection
import h2.events
import pytest

from cohortgate.deploy import pki
from tests.integration.conftest import POLICY, TRANSPORT_ARGS, TRANSPORTS, UPSTREAMS, GatewayProcess, free_port, mint

pytestmark = pytest.mark.integration

LIMIT = 64 * 1024  # GatewayProcess runs the gateway with --max-body 64k
PATH = "/v2/models/tabular/infer"  # route `tabular`: control/canary in eu, shadow `challenger` at 100 %
KEEPS_AUTH_PATH = "/v2/models/keeps-auth/infer"
MIRROR_WAIT_S = 10.0  # mirrored copies arrive after the primary's answer; generous for a busy machine

KEEPS_AUTH_ROUTE = """
  - name: keeps-auth                    # a backend that checks the bearer token itself
    match: {{path_prefix: /v2/models/keeps-auth}}
    forward_authorization: true
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [predict]
    residency:
      source: {{claim: residency}}
    variants:
      - name: control
        weight: 100
        backends:
          - {{url: "{control-eu}", region: eu}}
    shadows:
      - name: challenger
        percent: 100
        backends:
          - {{url: "{challenger-eu}", region: eu}}
"""


# ------------------------------------------------------------------------------ upstreams


@dataclass
class Upstream:
    name: str
    server: ThreadingHTTPServer
    started: list[dict[str, Any]] = field(default_factory=list)  # every request whose headers arrived
    complete: list[dict[str, Any]] = field(default_factory=list)  # those whose whole body arrived

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def started_for(self, test_id: str) -> list[dict[str, Any]]:
        return [r for r in list(self.started) if r["headers"].get("x-test-id") == test_id]

    def complete_for(self, test_id: str) -> list[dict[str, Any]]:
        return [r for r in list(self.complete) if r["headers"].get("x-test-id") == test_id]


def _read_chunked(rfile: Any) -> bytes:
    """An HTTP/1.1 chunked body to its last chunk; EOFError if the connection ends first."""
    body = bytearray()
    while True:
        line = rfile.readline(1024)
        if not line:
            raise EOFError("connection closed inside the chunked body")
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        data = rfile.read(size)
        if len(data) < size:
            raise EOFError("connection closed inside a chunk")
        body += data
        rfile.read(2)


def _handler(upstream: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            record = {"headers": {k.lower(): v for k, v in self.headers.items()}}
            upstream.started.append(record)
            try:
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    body = _read_chunked(self.rfile)
                else:
                    length = int(self.headers.get("content-length") or 0)
                    body = self.rfile.read(length)
                    if len(body) < length:
                        raise EOFError("connection closed inside the body")
            except (OSError, EOFError, ValueError):
                self.close_connection = True
                return  # Envoy reset the request: the backend never had all of it
            upstream.complete.append({**record, "length": len(body)})
            out = json.dumps({"upstream": upstream.name}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _answer

    return Handler


# ------------------------------------------------------------------------------ the data plane


@dataclass
class Plane:
    transport: str
    envoy: Any
    gateway: GatewayProcess
    certs: pki.CertPaths
    upstreams: dict[str, Upstream]
    port: int
    files: Any

    def context(self, alpn: list[str]) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs.ca_cert))
        cert, key = self.certs.clients["app-demo"]
        ctx.load_cert_chain(str(cert), str(key))
        ctx.set_alpn_protocols(alpn)
        return ctx

    def seen(self, test_id: str) -> dict[str, list[dict[str, Any]]]:
        return {n: u.complete_for(test_id) for n, u in self.upstreams.items() if u.complete_for(test_id)}

    def wait_seen(self, test_id: str, names: set[str]) -> dict[str, list[dict[str, Any]]]:
        deadline = time.monotonic() + MIRROR_WAIT_S
        while time.monotonic() < deadline and not names <= set(self.seen(test_id)):
            time.sleep(0.02)
        return self.seen(test_id)


@pytest.fixture(scope="module")
def hardening_upstreams() -> Iterator[dict[str, Upstream]]:
    found: dict[str, Upstream] = {}
    for name in UPSTREAMS:
        server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
        server.daemon_threads = True
        upstream = Upstream(name, server)
        server.RequestHandlerClass = _handler(upstream)
        threading.Thread(target=server.serve_forever, name=f"hardening-{name}", daemon=True).start()
        found[name] = upstream
    yield found
    for upstream in found.values():
        upstream.server.shutdown()
        upstream.server.server_close()


@pytest.fixture(scope="module", params=TRANSPORTS)
def plane(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    certs: pki.CertPaths,
    hardening_upstreams: dict[str, Upstream],
) -> Iterator[Plane]:
    from cohortgate.core.policy import load_policy
    from cohortgate.deploy.envoy import ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess

    transport: str = request.param
    work = tmp_path_factory.mktemp(f"hardening-{transport}")
    urls = {name: u.url for name, u in hardening_upstreams.items()}
    policy_path = work / "policy.yaml"
    policy_path.write_text((POLICY + KEEPS_AUTH_ROUTE).format(jwks=certs.jwks, **urls))
    sock = work / "run" / "processor.sock"
    gateway = GatewayProcess(policy_path, sock, transport, work)
    gateway.start()
    files = render(
        load_policy(policy_path),
        certs=certs,
        out_dir=work / "envoy",
        processor=ProcessorAddress(uds=str(sock)),
        transport=TRANSPORT_ARGS[transport][2],
        listen_port=free_port(),
        admin_socket=work / "envoy" / "admin.sock",
        max_request_bytes=LIMIT,
    )
    try:
        with EnvoyProcess(files, log_path=work / "envoy.log", concurrency=1) as envoy:
            yield Plane(transport, envoy, gateway, certs, hardening_upstreams, envoy.listen_port, files)
    finally:
        gateway.stop()


def tid() -> str:
    return uuid.uuid4().hex


# ------------------------------------------------------------------------------ clients


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        assert self.headers.get("content-type") == "application/json", self
        return json.loads(self.body)["error"]


def h1_chunked(plane: Plane, path: str, token: str, test_id: str, size: int, chunk: int = 16 * 1024) -> Answer:
    """POST ``size`` bytes with Transfer-Encoding: chunked (no content-length) over HTTP/1.1."""
    raw = socket.create_connection(("127.0.0.1", plane.port), timeout=20)
    conn = plane.context(["http/1.1"]).wrap_socket(raw, server_hostname="localhost")
    head = (
        f"POST {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\n"
        f"x-test-id: {test_id}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    try:
        conn.sendall(head.encode())
        sent = 0
        while sent < size:
            n = min(chunk, size - sent)
            conn.sendall(f"{n:x}\r\n".encode() + b"x" * n + b"\r\n")
            sent += n
        conn.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        pass  # Envoy answered and closed before the whole body was sent: read its answer
    resp = http.client.HTTPResponse(conn, method="POST")  # type: ignore[arg-type]
    try:
        resp.begin()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def h2_without_length(plane: Plane, path: str, token: str, test_id: str, size: int) -> Answer:
    """POST ``size`` bytes over HTTP/2 in DATA frames, with no content-length header."""
    raw = socket.create_connection(("127.0.0.1", plane.port), timeout=20)
    sock = plane.context(["h2"]).wrap_socket(raw, server_hostname="localhost")
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (":method", "POST"), (":scheme", "https"), (":authority", "localhost"), (":path", path),
            ("authorization", f"Bearer {token}"), ("x-test-id", test_id), ("content-type", "application/json"),
        ],
    )  # fmt: skip
    sock.sendall(conn.data_to_send())
    remaining, status, headers, body, done = size, 0, {}, bytearray(), False
    try:
        while not done:
            while remaining and not status:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, remaining)
                if window <= 0:
                    break
                conn.send_data(sid, b"x" * window, end_stream=window == remaining)
                remaining -= window
            sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    status = int(headers[":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset) and event.stream_id == sid:
                    done = True
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return Answer(status, headers, bytes(body))


# ------------------------------------------------------------------------------ 16.1 body limit


@pytest.mark.parametrize("framing", ["http1-chunked", "http2-no-length"])
def test_bodies_over_the_limit_without_content_length_get_413_and_reach_no_backend(plane: Plane, framing: str) -> None:
    send = h1_chunked if framing == "http1-chunked" else h2_without_length
    token = mint(plane.certs, "big-body")
    test_id = tid()
    answer = send(plane, PATH, token, test_id, size=4 * LIMIT)
    assert answer.status == 413, answer
    assert answer.error()["code"] == "payload_too_large"
    time.sleep(0.5)  # a mirrored copy would land after the answer: give it the chance to
    assert plane.seen(test_id) == {}, "a backend received the whole oversized body"
    started = {n: len(u.started_for(test_id)) for n, u in plane.upstreams.items() if u.started_for(test_id)}
    assert started == {}, f"an oversized request without content-length was forwarded, then cut: {started}"

    # The same framing under the limit reaches the primary and the shadow, whole.
    small = tid()
    answer = send(plane, PATH, token, small, size=LIMIT // 2)
    assert answer.status == 200, answer
    seen = plane.wait_seen(small, {"challenger-eu"})
    assert "challenger-eu" in seen and len(seen) == 2, seen
    assert all(r["length"] == LIMIT // 2 for records in seen.values() for r in records)


# ------------------------------------------------------------------------------ 16.3 hung processor


def test_a_hung_processor_gets_the_documented_503_json(plane: Plane) -> None:
    """The processor stops answering (SIGSTOP): Envoy's message timeout fires and the client gets
    503 ``unavailable`` as JSON, not Envoy's empty 504; once it answers again, requests pass."""
    token = mint(plane.certs, "hung")
    client = http.client.HTTPSConnection("127.0.0.1", plane.port, context=plane.context(["http/1.1"]), timeout=20)
    assert plane.gateway.proc is not None
    os.kill(plane.gateway.proc.pid, signal.SIGSTOP)
    try:
        client.request("POST", PATH, body=b"{}", headers={"authorization": f"Bearer {token}"})
        resp = client.getresponse()
        answer = Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        os.kill(plane.gateway.proc.pid, signal.SIGCONT)
        client.close()
    assert answer.status == 503, answer
    assert answer.error()["code"] == "unavailable"
    assert answer.headers.get("x-request-id")

    deadline = time.monotonic() + 20  # the resumed gateway first works through what queued meanwhile
    while True:
        client = http.client.HTTPSConnection("127.0.0.1", plane.port, context=plane.context(["http/1.1"]), timeout=20)
        client.request("POST", PATH, body=b"{}", headers={"authorization": f"Bearer {token}"})
        status = client.getresponse().status
        client.close()
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200


# ------------------------------------------------------------------------------ 16.7 Authorization


def _post(plane: Plane, path: str, token: str, test_id: str) -> int:
    client = http.client.HTTPSConnection("127.0.0.1", plane.port, context=plane.context(["http/1.1"]), timeout=20)
    try:
        client.request("POST", path, body=b"{}", headers={"authorization": f"Bearer {token}", "x-test-id": test_id})
        return client.getresponse().status
    finally:
        client.close()


def test_backends_and_shadows_never_see_the_bearer_token_by_default(plane: Plane) -> None:
    test_id = tid()
    assert _post(plane, PATH, mint(plane.certs, "no-token-upstream"), test_id) == 200
    seen = plane.wait_seen(test_id, {"challenger-eu"})
    assert "challenger-eu" in seen and len(seen) == 2, seen  # the primary and its shadow
    for records in seen.values():
        assert all("authorization" not in r["headers"] for r in records), seen


def test_a_route_that_keeps_authorization_gives_it_to_its_variant_never_to_its_shadow(plane: Plane) -> None:
    token = mint(plane.certs, "keeps")
    test_id = tid()
    assert _post(plane, KEEPS_AUTH_PATH, token, test_id) == 200
    seen = plane.wait_seen(test_id, {"control-eu", "challenger-eu"})
    assert [r["headers"].get("authorization") for r in seen["control-eu"]] == [f"Bearer {token}"]
    assert [r["headers"].get("authorization") for r in seen["challenger-eu"]] == [None]


# ------------------------------------------------------------------------------ 16.6 admin socket


def test_admin_listens_on_a_0600_unix_socket_only(plane: Plane) -> None:
    path = plane.files.admin_socket
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert plane.envoy.admin_url == f"unix:{path}"
    assert "cg.tabular.control.0" in plane.envoy.clusters()  # admin answers over the socket
    _, body = plane.envoy.admin_get("/listeners?format=json")
    addresses = [json.dumps(item["local_address"]) for item in json.loads(body)["listener_statuses"]]
    assert len(addresses) == 1  # the mTLS listener; admin has no TCP port


def test_the_gateway_confirms_clusters_through_the_admin_socket(plane: Plane) -> None:
    """gateway.reload.EnvoyClusters (the two-phase policy apply) reads admin over the same socket."""
    import asyncio

    from cohortgate.deploy.envoy import written_version
    from gateway.reload import EnvoyClusters

    async def ask() -> tuple[set[str], str | None]:
        clusters = EnvoyClusters(plane.files.cds, plane.envoy.admin_url)
        try:
            await clusters.confirm({"cg.tabular.control.0", "cg.keeps-auth.control.0"}, timeout_s=10.0)
            return await clusters.active(), await clusters.loaded_version()
        finally:
            await clusters.close()

    active, version = asyncio.run(ask())
    assert {"cg.tabular.challenger.0", "cg.keeps-auth.challenger.0"} <= active
    assert version == written_version(plane.files.cds)
