"""The request path end to end: real Envoy, the gateway process, real mTLS, tiny upstreams.

Every test runs once per transport (`conftest.TRANSPORTS`). Requests carry an ``x-test-id`` so a
test can ask each upstream exactly which of its requests it received, mirrored copies included.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

from cohortgate.deploy import pki
from tests.integration.conftest import POLICY, UPSTREAMS, Client, DataPlane, free_port, mint
from tests.integration.tlsprobe import BAD_CERTIFICATE, CERTIFICATE_REQUIRED, HANDSHAKE_FAILURE, UNKNOWN_CA, tls_alert

pytestmark = pytest.mark.integration

EU = {name for name, region in UPSTREAMS.items() if region == "eu"}
AE = {name for name, region in UPSTREAMS.items() if region == "ae"}


def tid() -> str:
    return uuid.uuid4().hex


def seen_by(plane: DataPlane, test_id: str) -> dict[str, int]:
    return {name: len(u.seen(test_id)) for name, u in plane.upstreams.items() if u.seen(test_id)}


# ------------------------------------------------------------------------------ allowed


def test_allowed_request_reaches_the_decided_upstream(dataplane: DataPlane) -> None:
    test_id = tid()
    reply = dataplane.app.request(token=mint(dataplane.certs, "alice"), headers={"x-test-id": test_id})
    assert reply.status == 200, reply
    upstream = reply.json()["upstream"]
    assert upstream in {"control-eu", "canary-eu"}
    assert reply.headers["x-cohortgate-route"] == "tabular"
    assert reply.headers["x-cohortgate-variant"] == upstream.split("-")[0]
    assert reply.headers["x-request-id"]
    got = dataplane.upstreams[upstream].seen(test_id)[0]["headers"]
    assert got["x-cohortgate-region"] == "eu"
    assert len(got["x-cohortgate-unit"]) == 16 and "alice" not in got["x-cohortgate-unit"]
    assert got["x-request-id"] == reply.headers["x-request-id"]


def test_same_user_hits_the_same_upstream_50_times(dataplane: DataPlane) -> None:
    token = mint(dataplane.certs, "sticky-sam")
    served = {dataplane.app.request(token=token).json()["upstream"] for _ in range(50)}
    assert len(served) == 1


@pytest.fixture(scope="session")
def split_tokens(certs: pki.CertPaths) -> list[str]:
    return [mint(certs, f"user-{i:04d}") for i in range(2000)]


def test_ninety_ten_split_over_2000_users(dataplane: DataPlane, split_tokens: list[str]) -> None:
    client = dataplane.client(*dataplane.certs.clients["app-demo"])

    def call(token: str) -> str:
        reply = client.request(token=token)
        assert reply.status == 200, reply
        return reply.headers["x-cohortgate-variant"]

    with ThreadPoolExecutor(16) as pool:
        variants = list(pool.map(call, split_tokens))
    canary = variants.count("canary") / len(variants)
    assert abs(canary - 0.10) <= 0.03, canary
    assert variants.count("control") + variants.count("canary") == 2000


# ------------------------------------------------------------------------------ denials


def _expired(certs: pki.CertPaths) -> str:
    return mint(certs, "late", now=time.time() - 3600, ttl_s=60)


DENIALS = [
    # (name, client, token factory, path, extra headers, body size, status, code)
    ("no token", "app", lambda c: None, None, 401, "unauthenticated"),
    ("expired token", "app", _expired, None, 401, "unauthenticated"),
    ("wrong audience", "app", lambda c: mint(c, "x", audience="someone-else"), None, 401, "unauthenticated"),
    ("identity not allowed", "qa", lambda c: mint(c, "x"), None, 403, "forbidden"),
    ("scope missing", "app", lambda c: mint(c, "x", scopes=[]), None, 403, "forbidden"),
    ("no route", "app", lambda c: mint(c, "x"), "/v2/models/unknown/infer", 404, "no_route"),
    ("region not served", "app", lambda c: mint(c, "x", residency="us"), None, 451, "residency_unavailable"),
    (
        "ae-only route from eu",
        "app",
        lambda c: mint(c, "x", residency="eu"),
        "/v2/models/ae-scoring/infer",
        451,
        "residency_unavailable",
    ),
]


@pytest.mark.parametrize(
    ("who", "token", "path", "status", "code"), [d[1:] for d in DENIALS], ids=[d[0] for d in DENIALS]
)
def test_denials_through_envoy(
    dataplane: DataPlane, who: str, token: Any, path: str | None, status: int, code: str
) -> None:
    test_id = tid()
    client = dataplane.app if who == "app" else dataplane.qa
    reply = client.request(
        path or "/v2/models/tabular/infer", token=token(dataplane.certs), headers={"x-test-id": test_id}
    )
    _assert_denied(reply, status, code)
    assert seen_by(dataplane, test_id) == {}


def _assert_denied(reply: Any, status: int, code: str) -> None:
    assert reply.status == status, reply
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code and isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert reply.headers["x-request-id"]
    if status == 401:
        assert reply.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    else:
        assert "www-authenticate" not in reply.headers
    assert b"Traceback" not in reply.body


def test_body_over_the_limit_is_413(dataplane: DataPlane) -> None:
    test_id = tid()
    reply = dataplane.app.request(
        token=mint(dataplane.certs, "big"), headers={"x-test-id": test_id}, body=b"x" * (64 * 1024 + 1)
    )
    _assert_denied(reply, 413, "payload_too_large")
    assert seen_by(dataplane, test_id) == {}


def test_tls_requires_a_client_certificate_from_our_ca(dataplane: DataPlane, foreign: pki.ForeignClient) -> None:
    """Envoy answers the handshake with an alert (a listener that is there, refusing), while the same
    port serves a client with our certificate."""
    assert dataplane.app.request(token=mint(dataplane.certs, "x")).status == 200
    bare = dataplane.client().ctx
    assert tls_alert(dataplane.port, bare).reason in {CERTIFICATE_REQUIRED, HANDSHAKE_FAILURE}
    alien = dataplane.client(foreign.cert, foreign.key).ctx
    assert tls_alert(dataplane.port, alien).reason in {UNKNOWN_CA, BAD_CERTIFICATE}


# ------------------------------------------------------------------------------ spoofing


def test_spoofed_routing_headers_change_nothing(dataplane: DataPlane) -> None:
    test_id = tid()
    spoof = {
        "x-test-id": test_id,
        "x-cohortgate-cluster": "cg.ae-scoring.control.0",  # scoring-ae
        "x-cohortgate-shadow-0": "cg.tabular.control.1",  # control-ae
        "x-cohortgate-shadow-1": "cg.tabular.control.1",
        "x-cohortgate-shadow-3": "cg.ae-scoring.control.0",
        "x-cohortgate-region": "ae",
        "x-forwarded-client-cert": "By=spiffe://cohortgate.local/admin;URI=spiffe://cohortgate.local/admin",
    }
    reply = dataplane.app.request(token=mint(dataplane.certs, "mallory"), headers=spoof)
    assert reply.status == 200 and reply.json()["upstream"] in {"control-eu", "canary-eu"}
    dataplane.wait_mirrors(["challenger-eu"], test_id)
    time.sleep(0.2)  # a wrong mirror would have arrived by now too
    seen = seen_by(dataplane, test_id)
    assert set(seen) <= {"control-eu", "canary-eu", "challenger-eu"} and seen.get("challenger-eu") == 1
    primary = dataplane.upstreams[reply.json()["upstream"]].seen(test_id)[0]["headers"]
    assert primary["x-cohortgate-region"] == "eu"
    assert "x-cohortgate-shadow-1" not in primary and "x-cohortgate-shadow-3" not in primary
    assert "spiffe://cohortgate.local/admin" not in primary.get("x-forwarded-client-cert", "")


def test_spoofed_xfcc_does_not_change_the_identity(dataplane: DataPlane) -> None:
    test_id = tid()
    xfcc = "By=spiffe://cohortgate.local/gateway;URI=spiffe://cohortgate.local/app-demo"
    reply = dataplane.qa.request(
        token=mint(dataplane.certs, "q"), headers={"x-test-id": test_id, "x-forwarded-client-cert": xfcc}
    )
    _assert_denied(reply, 403, "forbidden")
    assert seen_by(dataplane, test_id) == {}
    reply = dataplane.app.request(
        "/v2/models/unknown", token=mint(dataplane.certs, "q"), headers={"x-cohortgate-cluster": "cg.tabular.control.0"}
    )
    _assert_denied(reply, 404, "no_route")


# ------------------------------------------------------------------------------ shadows and residency


def test_shadows_get_mirrored_copies_the_client_never_sees(dataplane: DataPlane) -> None:
    test_id = tid()
    reply = dataplane.app.request(token=mint(dataplane.certs, "shadowed"), headers={"x-test-id": test_id})
    assert reply.status == 200
    assert reply.json()["upstream"] != "challenger-eu" and reply.headers["x-upstream"] != "challenger-eu"
    dataplane.wait_mirrors(["challenger-eu"], test_id)
    copies = dataplane.upstreams["challenger-eu"].seen(test_id)
    assert len(copies) == 1
    primary = dataplane.upstreams[reply.json()["upstream"]].seen(test_id)[0]
    assert copies[0]["body"] == primary["body"] == b'{"inputs": []}'
    assert copies[0]["path"] == primary["path"] == "/v2/models/tabular/infer"


def test_residency_ae_never_reaches_a_non_ae_upstream(dataplane: DataPlane) -> None:
    test_id = tid()
    served = set()
    for i in range(30):
        token = mint(dataplane.certs, f"ae-user-{i}", residency="ae")
        for path in ("/v2/models/tabular/infer", "/v2/models/ae-scoring/infer"):
            reply = dataplane.app.request(path, token=token, headers={"x-test-id": test_id})
            assert reply.status == 200, reply
            served.add(reply.json()["upstream"])
    assert served == {"control-ae", "scoring-ae"}
    dataplane.wait_mirrors(["challenger-ae"], test_id, count=30)
    time.sleep(0.2)
    seen = seen_by(dataplane, test_id)
    assert set(seen) <= AE, seen
    assert seen == {"control-ae": 30, "scoring-ae": 30, "challenger-ae": 30}


# ------------------------------------------------------------------------------ failure


def test_a_backend_that_cannot_be_reached_is_a_json_503(dataplane: DataPlane) -> None:
    reply = dataplane.app.request(token=mint(dataplane.certs, "bob"), path="/v2/models/offline/infer")
    assert reply.status == 503, reply
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"]["code"] == "backend_unavailable"
    assert "cannot be reached" in reply.json()["error"]["message"]


def test_killing_the_gateway_fails_closed(dataplane: DataPlane) -> None:
    token = mint(dataplane.certs, "during-outage")
    assert dataplane.app.request(token=token).status == 200
    dataplane.gateway.kill()
    try:
        test_id = tid()
        for _ in range(3):
            reply = dataplane.app.request(token=token, headers={"x-test-id": test_id})
            assert reply.status == 503, reply
            assert reply.json()["error"]["code"] == "unavailable", reply  # Envoy's answer, in our shape
        assert seen_by(dataplane, test_id) == {}
    finally:
        dataplane.gateway.start()
    deadline = time.monotonic() + 5
    while (status := dataplane.app.request(token=token).status) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 200


def test_audit_trail_has_decisions_but_no_secrets(dataplane: DataPlane) -> None:
    token = mint(dataplane.certs, "audited-alice")
    assert dataplane.app.request(token=token).status == 200
    assert dataplane.qa.request(token=token).status == 403
    deadline = time.monotonic() + 3
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        text = dataplane.gateway.audit_path.read_bytes()
        lines = [orjson.loads(line) for line in text.splitlines()]
        if any(line["identity"] == "spiffe://cohortgate.local/qa" for line in lines):
            break
        time.sleep(0.1)
    assert token.encode() not in text and b"audited-alice" not in text
    qa = [line for line in lines if line["identity"] == "spiffe://cohortgate.local/qa"]
    assert qa and qa[-1]["outcome"] == "deny" and qa[-1]["reason"] == "forbidden" and qa[-1]["status"] == 403
    assert any(line["outcome"] == "allow" and line["route"] == "tabular" for line in lines)


# ------------------------------------------------------------------------------ the http_service JSON shape


def test_envoy_http_service_posts_the_json_shape_we_parse(
    tmp_path: Path, certs: pki.CertPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pin Envoy 1.40's http_service wire format: chunked JSON POST, proto names, raw_value base64.

    The processor is the production ``start_http`` server; only its ``data_received`` is wrapped to
    keep the raw bytes Envoy sent."""
    from cohortgate.core.policy import parse_policy
    from cohortgate.deploy.envoy import HTTP_SERVICE_PATH, ProcessorAddress, render
    from cohortgate.deploy.envoyproc import EnvoyProcess
    from gateway.transport_http import ExtProcHttpProtocol, start_http

    posted: list[bytes] = []
    heads: list[bytes] = []

    received = ExtProcHttpProtocol.data_received

    def capture(self: ExtProcHttpProtocol, data: bytes) -> None:
        heads.append(bytes(data))
        received(self, data)

    monkeypatch.setattr(ExtProcHttpProtocol, "data_received", capture)

    def handle(body: bytes) -> bytes:
        posted.append(body)
        return orjson.dumps({"immediate_response": {"status": {"code": 418}, "body": "dGVhcG90"}})

    policy = parse_policy(POLICY.format(jwks=certs.jwks, **{n: "http://127.0.0.1:1" for n in UPSTREAMS}))
    sock = str(tmp_path / "capture.sock")

    async def run() -> tuple[int, bytes]:
        server = await start_http(handle, uds=sock)
        files = render(
            policy,
            certs=certs,
            out_dir=tmp_path / "envoy",
            processor=ProcessorAddress(uds=sock),
            transport="http",
            listen_port=free_port(),
            admin_port=free_port(),
        )
        envoy = EnvoyProcess(files, log_path=tmp_path / "envoy.log")
        try:
            await asyncio.to_thread(envoy.__enter__)
            client = Client(envoy.listen_port, certs.ca_cert, *certs.clients["app-demo"])
            reply = await asyncio.to_thread(
                client.request, "/v2/models/tabular/infer?x=1", token="abc", headers={"x-cohortgate-cluster": "z"}
            )
            client.close()
            return reply.status, reply.body
        finally:
            envoy.stop()
            server.close()

    status, body = asyncio.run(run())
    assert (status, body) == (418, b"teapot")
    head = heads[0].split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"post " + HTTP_SERVICE_PATH.encode() + b" http/1.1")
    doc = json.loads(posted[0])
    headers = {h["key"]: h for h in doc["request_headers"]["headers"]["headers"]}
    assert set(headers[":path"]) == {"key", "raw_value"}  # raw_value only, base64
    assert headers[":path"]["raw_value"] == "L3YyL21vZGVscy90YWJ1bGFyL2luZmVyP3g9MQ=="  # /v2/models/tabular/infer?x=1
    assert "x-cohortgate-cluster" in headers
    attrs = doc["attributes"]["envoy.filters.http.ext_proc"]
    assert attrs["connection.uri_san_peer_certificate"] == "spiffe://cohortgate.local/app-demo"
    assert attrs["connection.mtls"] is True
