"""Issue 16.2: a JWKS fetch follows no redirect, reads a bounded body within one deadline, and names
only hosts the policy allows.

Against real local servers: an HTTPS endpoint with project-minted certificates (as in
test_auth.py) and a plain-HTTP "attacker" that would hand out its own key set. Before the fix the
fetcher followed https -> http and installed the attacker's keys.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from cohortgate.core.policy import PolicyError, parse_policy
from cohortgate.deploy import pki
from gateway.jwks import MAX_JWKS_BYTES, JwksError, JwksUrl, KeySet, source_from_spec

TIMEOUT_S = 1.0  # the fetch deadline under test; the servers below stall for far longer
STALL_S = 60.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("certs"), clients=[])


def attacker_jwks() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return json.dumps({"keys": [pki.public_jwk(key)]}).encode()


@dataclass
class Servers:
    https: str  # https://localhost:PORT
    http: str  # http://127.0.0.1:PORT, the attacker
    client_ctx: ssl.SSLContext
    hits: dict[str, int] = field(default_factory=dict)

    def source(self, path: str, timeout: float = TIMEOUT_S) -> JwksUrl:
        return JwksUrl(f"{self.https}{path}", timeout=timeout, ssl_context=self.client_ctx)


async def _start(app: web.Application, ssl_context: ssl.SSLContext | None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
async def servers(certs: pki.CertPaths) -> AsyncIterator[Servers]:
    hits: dict[str, int] = {}
    bad_keys = attacker_jwks()

    def counted(name: str, handler):  # type: ignore[no-untyped-def]
        async def wrapped(request: web.Request) -> web.StreamResponse:
            hits[name] = hits.get(name, 0) + 1
            return await handler(request)

        return wrapped

    async def attacker(_request: web.Request) -> web.Response:
        return web.Response(body=bad_keys, content_type="application/json")

    http_app = web.Application()
    http_app.router.add_get("/jwks.json", counted("attacker", attacker))
    http_runner, http_port = await _start(http_app, None)
    http = f"http://127.0.0.1:{http_port}"

    async def good(_request: web.Request) -> web.Response:
        return web.Response(body=certs.jwks.read_bytes(), content_type="application/json")

    def redirect(target: str, status: int = 302):  # type: ignore[no-untyped-def]
        async def handler(_request: web.Request) -> web.Response:
            return web.Response(status=status, headers={"Location": target})

        return handler

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})  # chunked: no length
        await resp.prepare(request)
        await resp.write(b'{"keys": [], "pad": "')
        for _ in range(2 * MAX_JWKS_BYTES // 65536 + 2):
            await resp.write(b"x" * 65536)
        await resp.write(b'"}')
        return resp

    async def big_declared(_request: web.Request) -> web.Response:
        return web.Response(body=b" " * (MAX_JWKS_BYTES + 10), content_type="application/json")

    async def hang(_request: web.Request) -> web.Response:
        await asyncio.sleep(STALL_S)
        return web.Response(body=b"{}")

    async def drip(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for _ in range(int(STALL_S / 0.1)):  # a byte every 0.1 s: each read is quick, the whole is not
            await resp.write(b" ")
            await asyncio.sleep(0.1)
        return resp

    https_app = web.Application()
    for path, handler in {
        "/jwks.json": good,
        "/to-http": redirect(f"{http}/jwks.json"),
        "/to-http-301": redirect(f"{http}/jwks.json", 301),
        "/to-http-307": redirect(f"{http}/jwks.json", 307),
        "/to-https": redirect("/jwks.json"),
        "/big": big,
        "/big-declared": big_declared,
        "/hang": hang,
        "/drip": drip,
    }.items():
        https_app.router.add_get(path, counted(path, handler))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.envoy_cert, certs.envoy_key)
    https_runner, https_port = await _start(https_app, server_ctx)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    yield Servers(f"https://localhost:{https_port}", http, client_ctx, hits)
    await https_runner.cleanup()
    await http_runner.cleanup()


def good_kids(certs: pki.CertPaths) -> frozenset[str]:
    return frozenset(k["kid"] for k in json.loads(certs.jwks.read_text())["keys"])


async def test_the_endpoint_itself_is_fetched_both_ways(servers: Servers, certs: pki.CertPaths) -> None:
    """The control: the same server and client context work when nothing is wrong."""
    keys = KeySet(servers.source("/jwks.json"), load=False)
    assert await keys.refresh_async(force=True) and keys.kids == good_kids(certs)
    assert (await asyncio.to_thread(KeySet, servers.source("/jwks.json"))).kids == good_kids(certs)


@pytest.mark.parametrize("path", ["/to-http", "/to-http-301", "/to-http-307"])
async def test_a_redirect_to_http_is_refused_and_its_keys_never_installed(
    servers: Servers, certs: pki.CertPaths, path: str
) -> None:
    keys = KeySet(servers.source("/jwks.json"), load=False)
    assert await keys.refresh_async(force=True)
    keys.source = servers.source(path)
    assert not await keys.refresh_async(force=True)  # the background (aiohttp) path
    assert keys.kids == good_kids(certs) and keys.refresh_failures == 1
    with pytest.raises(JwksError) as info:
        await asyncio.to_thread(servers.source(path).fetch)  # the start-up (urllib) path
    message = str(info.value)
    assert f"to {servers.http}" in message and "redirects are not followed" in message
    assert servers.hits.get("attacker", 0) == 0 and servers.hits[path] == 2


async def test_a_same_scheme_redirect_is_not_followed_either(servers: Servers) -> None:
    with pytest.raises(JwksError, match=r"redirect \(HTTP 302 to a relative URL\)"):
        await servers.source("/to-https").fetch_async()
    with pytest.raises(JwksError, match="redirects are not followed"):
        await asyncio.to_thread(servers.source("/to-https").fetch)
    assert servers.hits["/to-https"] == 2 and "/jwks.json" not in servers.hits


@pytest.mark.parametrize("path", ["/big", "/big-declared"])
async def test_a_body_over_the_size_cap_is_refused(servers: Servers, path: str) -> None:
    with pytest.raises(JwksError, match=f"larger than {MAX_JWKS_BYTES} bytes"):
        await servers.source(path).fetch_async()
    with pytest.raises(JwksError, match=f"larger than {MAX_JWKS_BYTES} bytes"):
        await asyncio.to_thread(servers.source(path).fetch)


@pytest.mark.parametrize("path", ["/hang", "/drip"])
async def test_a_stalled_or_dripping_server_fails_the_fetch_at_its_deadline(servers: Servers, path: str) -> None:
    """One deadline for the whole fetch: a byte every 0.1 s never trips a per-read timeout."""
    with pytest.raises(JwksError, match="TimeoutError"):
        await servers.source(path).fetch_async()
    with pytest.raises(JwksError, match=f"timed out|within {TIMEOUT_S:g} s"):
        await asyncio.to_thread(servers.source(path).fetch)


def test_only_https_or_a_file() -> None:
    for spec in ("http://idp.example/jwks.json", "ftp://idp.example/jwks.json", "HTTPS://idp.example/j"):
        with pytest.raises(ValueError, match="https"):
            source_from_spec(spec)


def test_allowed_hosts_pin_the_url() -> None:
    with pytest.raises(ValueError, match=r"host 'evil\.example'.*not an allowed JWKS host \(idp\.example\)"):
        source_from_spec("https://evil.example/jwks.json", allowed_hosts=["idp.example"])
    assert isinstance(source_from_spec("https://IdP.example./jwks.json", allowed_hosts=["idp.example"]), JwksUrl)
    assert source_from_spec("jwks.json", "/etc", allowed_hosts=["idp.example"]).fetch  # a file is always fine


POLICY = """version: 1
jwt:
  issuer: i
  audience: a
  jwks: JWKS
  jwks_hosts: [idp.example, keys.idp.example]
routes:
  - name: r
    match: {model: m}
    residency: {default_region: eu}
    variants:
      - {name: control, weight: 100, backends: [{url: "http://127.0.0.1:1", region: eu}]}
"""


def test_a_policy_naming_a_jwks_host_it_does_not_list_is_refused_with_its_position(tmp_path: Path) -> None:
    ok = parse_policy(POLICY.replace("JWKS", "https://keys.idp.example/jwks.json"), "policy.yaml")
    assert ok.jwt.jwks_hosts == ("idp.example", "keys.idp.example")
    with pytest.raises(PolicyError) as info:
        parse_policy(POLICY.replace("JWKS", "https://evil.example/jwks.json"), "policy.yaml")
    assert list(info.value.problems) == [
        "policy.yaml:5:9: jwt.jwks names host 'evil.example', which is not in jwt.jwks_hosts "
        "['idp.example', 'keys.idp.example']: keys are fetched only from the hosts the policy lists"
    ]
    with pytest.raises(PolicyError) as info:
        parse_policy(POLICY.replace("JWKS", "http://idp.example/jwks.json"), "policy.yaml")
    assert list(info.value.problems) == [
        "policy.yaml:5:9: jwt.jwks 'http://idp.example/jwks.json': keys come from a file path or an https:// URL only"
    ]
    assert parse_policy(POLICY.replace("JWKS", "jwks.json"), "policy.yaml", tmp_path).jwt.jwks.endswith("jwks.json")


async def test_a_reload_naming_another_jwks_host_is_refused_and_the_old_policy_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the gateway's own Reloader: one JSON failure line with FILE:LINE:COL naming the host."""
    import logging

    from cohortgate.core.policy import load_policy
    from gateway.reload import Reloader
    from gateway.service import PolicyHolder

    example = (Path(__file__).resolve().parents[2] / "policies" / "example.yaml").read_text()
    jwks_line = "  jwks: ../certs/jwks.json       # a file (relative to this policy file) or an https:// URL\n"
    assert jwks_line in example
    live = tmp_path / "live.yaml"
    live.write_text(example.replace(jwks_line, f"  jwks: {tmp_path / 'jwks.json'}\n  jwks_hosts: [idp.example]\n"))
    holder = PolicyHolder(load_policy(live), live)
    good = holder.policy
    reloader = Reloader(holder, watch_s=0)
    live.write_text(example.replace(jwks_line, "  jwks: https://evil.example/jwks.json\n  jwks_hosts: [idp.example]\n"))
    with caplog.at_level(logging.ERROR):
        assert await reloader.reload("file changed") is False
    assert holder.policy is good
    (record,) = [r for r in caplog.records if "policy_reload_failed" in r.getMessage()]
    (problem,) = json.loads(record.getMessage())["problems"]
    assert problem.startswith(f"{live}:10:9: jwt.jwks names host 'evil.example', which is not in jwt.jwks_hosts")
