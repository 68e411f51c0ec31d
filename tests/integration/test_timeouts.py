"""Timeouts through the real Envoy: a backend too slow for the route is a 504 ``backend_timeout``; a
processor slower than usual but inside its message timeout still gets the request served.

The processor is the real `Processor` behind the production gRPC or HTTP server (`start_grpc`,
`start_http`), run in a thread of this process so a test can slow one request down on purpose
(header ``x-test-processor-delay``). The upstream holds a request (header ``x-test-hold``) until the
test ends, so "slower than the route timeout" never depends on how busy the machine is.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from cohortgate.core.policy import Policy, parse_policy
from cohortgate.deploy import pki
from tests.integration.conftest import Client, free_port, mint

pytestmark = pytest.mark.integration

DELAY_HEADER = "x-test-processor-delay"
HOLD_HEADER = "x-test-hold"
#: Generous bound for "this eventually happens" on a busy 2-core CI machine.
EVENTUALLY_S = 30.0
#: Renderer default the 504 test shortens in its own copy of the bootstrap (see `short_route_timeout`).
SHIPPED_ROUTE_TIMEOUT = "30s"

POLICY = """
version: 1
jwt:
  issuer: https://auth.cohortgate.local
  audience: cohortgate
  algorithms: [ES256]
  jwks: {jwks}
response_headers: true
routes:
  - name: tabular
    match: {{model: tabular, methods: [POST]}}
    auth:
      identities: ["spiffe://cohortgate.local/app-*"]
      scopes: [predict]
    cohorts:
      unit: {{claim: sub}}
      salt: timeouts-test
    residency:
      source: {{claim: residency}}
    variants:
      - name: control
        weight: 100
        backends:
          - {{url: "{upstream}", region: eu}}
"""


# ------------------------------------------------------------------------------ parts


class HoldingUpstream:
    """Answers at once, or, with ``x-test-hold``, only once the test releases it (or after a minute)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.received: list[dict[str, str]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                upstream.received.append(headers)
                if HOLD_HEADER in headers:
                    upstream.release.wait(60)
                out = b'{"upstream": "held"}' if HOLD_HEADER in headers else b'{"upstream": "control"}'
                try:
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except OSError:
                    pass  # Envoy gave up on a held request and closed the connection

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="holding-upstream", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _delay_of(req: Any) -> float:
    for h in req.request_headers.headers.headers:
        if h.key == DELAY_HEADER:
            return float(h.raw_value or h.value)
    return 0.0


class InThreadProcessor:
    """The real engine on the production server for ``transport``, in its own event-loop thread.

    A request carrying ``x-test-processor-delay: S`` is answered S seconds late (the engine's answer,
    unchanged); ``calls`` counts the requests it answered.
    """

    def __init__(self, policy: Policy, sock: Path, transport: str) -> None:
        from gateway.extproc import Processor, ProcessorSettings
        from gateway.service import PolicyHolder, build_verifier

        self.engine = Processor(
            PolicyHolder(policy), build_verifier(policy.jwt), ProcessorSettings(unit_salt=b"timeouts-salt")
        )
        self.sock, self.transport = sock, transport
        self.calls = 0
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="processor", daemon=True)

    def _slow_proto(self) -> Any:
        inner = self.engine.new_processor()
        outer = self

        class Slow:
            def handle(self, req: Any) -> Any:
                time.sleep(_delay_of(req))  # blocks this processor's loop: one request at a time here
                outer.calls += 1
                return inner.handle(req)

        return Slow()

    def _slow_json(self, body: bytes) -> bytes:
        doc = orjson.loads(body)
        for h in ((doc.get("request_headers") or {}).get("headers") or {}).get("headers") or ():
            if h.get("key") == DELAY_HEADER:
                time.sleep(float(base64.b64decode(h["raw_value"])))
        self.calls += 1
        return self.engine.handle_json(body)

    def __enter__(self) -> InThreadProcessor:
        from gateway.transport_grpc import start_grpc
        from gateway.transport_http import start_http

        self._thread.start()
        start: Callable[[], Any]
        if self.transport == "grpc":
            start = lambda: start_grpc(self._slow_proto, uds=str(self.sock))  # noqa: E731
        else:
            start = lambda: start_http(self._slow_json, uds=str(self.sock))  # noqa: E731

        async def begin() -> Any:
            return await start()

        self._server = asyncio.run_coroutine_threadsafe(begin(), self._loop).result(EVENTUALLY_S)
        return self

    def __exit__(self, *exc: object) -> None:
        async def end() -> None:
            if self.transport == "grpc":
                await self._server.stop(None)
            else:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(end(), self._loop).result(EVENTUALLY_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(EVENTUALLY_S)


def short_route_timeout(bootstrap: Path, timeout: str) -> None:
    """Rewrite the rendered route's timeout in this test's own bootstrap copy.

    The renderer has no knob for it (its 30 s is a product constant), and a 30 s wait per test is
    too long for the suite; everything else in the file is exactly what `render` wrote. Fails loudly
    if the route or its shipped value moved.
    """
    doc = yaml.safe_load(bootstrap.read_text())
    [listener] = doc["static_resources"]["listeners"]
    [hcm] = [f for chain in listener["filter_chains"] for f in chain["filters"]]
    [vhost] = hcm["typed_config"]["route_config"]["virtual_hosts"]
    # the routes that forward to a backend and mirror to shadows (with and without content-length; the
    # outcomes route goes to the controller)
    routes = [r for r in vhost["routes"] if "request_mirror_policies" in r.get("route", {})]
    assert len(routes) == 2, vhost["routes"]
    for route in routes:
        assert route["route"]["timeout"] == SHIPPED_ROUTE_TIMEOUT, route["route"]
        route["route"]["timeout"] = timeout
    bootstrap.write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.fixture
def upstream() -> Iterator[HoldingUpstream]:
    up = HoldingUpstream()
    yield up
    up.close()


def stack(
    tmp_path: Path,
    certs: pki.CertPaths,
    upstream: HoldingUpstream,
    transport: str,
    *,
    message_timeout: dt.timedelta | None = None,
    route_timeout: str | None = None,
) -> tuple[Any, InThreadProcessor]:
    """Envoy from `render` (plus the optional route-timeout rewrite) and the processor behind it."""
    from cohortgate.deploy.envoy import ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess

    policy = parse_policy(POLICY.format(jwks=certs.jwks, upstream=upstream.url))
    sock = tmp_path / "processor.sock"
    extra: dict[str, Any] = {} if message_timeout is None else {"message_timeout": message_timeout}
    files = render(
        policy,
        certs=certs,
        out_dir=tmp_path / "envoy",
        processor=ProcessorAddress(uds=str(sock)),
        transport=transport,
        listen_port=free_port(),
        admin_port=free_port(),
        **extra,
    )
    if route_timeout is not None:
        short_route_timeout(files.bootstrap, route_timeout)
    return EnvoyProcess(files, log_path=tmp_path / "envoy.log", concurrency=1), InThreadProcessor(
        policy, sock, transport
    )


def app_client(port: int, certs: pki.CertPaths) -> Client:
    cert, key = certs.clients["app-demo"]
    return Client(port, certs.ca_cert, cert, key)


def error_code(body: bytes) -> str:
    doc = json.loads(body)
    assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message"}, doc
    return doc["error"]["code"]


# ------------------------------------------------------------------------------ tests


def test_a_backend_slower_than_the_route_timeout_is_504_backend_timeout(
    tmp_path: Path, certs: pki.CertPaths, upstream: HoldingUpstream
) -> None:
    envoy, processor = stack(tmp_path, certs, upstream, "grpc", route_timeout="1s")
    with processor, envoy:
        client = app_client(envoy.listen_port, certs)
        token = mint(certs, "alice")
        fast = client.request(token=token)
        assert fast.status == 200 and fast.json() == {"upstream": "control"}, fast
        held = client.request(token=token, headers={HOLD_HEADER: "1"})
        client.close()
        # The backend got the request (so this is its timeout, not the processor's) and never answered.
        assert [HOLD_HEADER in h for h in upstream.received] == [False, True]
        assert not upstream.release.is_set()
        upstream.release.set()  # let the held handler finish, so Envoy stops without draining it
        assert held.status == 504, held
        assert held.headers["content-type"] == "application/json"
        assert error_code(held.body) == "backend_timeout"
        assert processor.calls == 2


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_slow_but_alive_processor_is_waited_for_and_the_request_served(
    tmp_path: Path, certs: pki.CertPaths, upstream: HoldingUpstream, transport: str
) -> None:
    """2 s is hundreds of times the processor's usual answer and twice the default message timeout;
    rendered with a 10 s message timeout (``--processor-timeout``) the request is served, routed
    by the slow answer, and the next fast one is unaffected."""
    envoy, processor = stack(tmp_path, certs, upstream, transport, message_timeout=dt.timedelta(seconds=10))
    with processor, envoy:
        client = app_client(envoy.listen_port, certs)
        token = mint(certs, "alice")
        slow = client.request(token=token, headers={DELAY_HEADER: "2"})
        assert slow.status == 200, slow
        assert slow.json() == {"upstream": "control"}
        assert slow.headers["x-cohortgate-variant"] == "control"
        assert upstream.received[-1]["x-cohortgate-cluster"] == "cg.tabular.control.0"
        fast = client.request(token=token)
        client.close()
        assert fast.status == 200 and fast.json() == {"upstream": "control"}
        assert processor.calls == 2 and len(upstream.received) == 2
