"""The two transports and the assembled service, over real sockets (no Envoy: see tests/integration)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format

from cohortgate.cli import build_parser
from cohortgate.deploy import pki
from gateway.extproc import HEADER_CLUSTER, Processor
from gateway.service import Gateway, GatewayConfig, ListenAddress
from gateway.transport_http import ExtProcHttpProtocol, start_http
from tests.gateway.test_extproc import POLICY, envoy_json, infer, request

# ------------------------------------------------------------------------------ the HTTP/1.1 parser


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True


def _conn() -> tuple[ExtProcHttpProtocol, FakeTransport]:
    proto = ExtProcHttpProtocol(lambda body: b'{"echo":' + str(len(body)).encode() + b"}")
    transport = FakeTransport()
    proto.connection_made(transport)
    return proto, transport


def _post(body: bytes, *extra: bytes) -> bytes:
    head = b"POST /ext_proc HTTP/1.1\r\nhost: cohortgate_processor\r\ncontent-length: %d\r\n" % len(body)
    return head + b"".join(extra) + b"\r\n" + body


def _responses(out: bytes) -> list[tuple[int, bytes]]:
    found = []
    while out:
        head, _, rest = out.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        length = int(
            next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1]
        )
        found.append((status, rest[:length]))
        out = rest[length:]
    return found


def test_http_parser_keepalive_pipelining_and_splits() -> None:
    proto, transport = _conn()
    stream = _post(b"x" * 10) + _post(b"y" * 300) + b"GET /healthz HTTP/1.1\r\n\r\n"
    for i in range(0, len(stream), 7):  # arbitrary segment boundaries
        proto.data_received(stream[i : i + 7])
    assert _responses(bytes(transport.out)) == [(200, b'{"echo":10}'), (200, b'{"echo":300}'), (200, b"ok\n")]
    assert not transport.closed


def test_http_parser_chunked_body() -> None:
    proto, transport = _conn()
    proto.data_received(
        b"POST /ext_proc HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    )
    assert _responses(bytes(transport.out)) == [(200, b'{"echo":11}')]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ncontent-length: nope\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nbad header line\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n", 413),
        (b"PUT / HTTP/1.1\r\n\r\n", 405),
        (b"POST / HTTP/1.1\r\nx: " + b"a" * 70_000, 431),
    ],
)
def test_http_parser_refuses_bad_requests_and_closes(raw: bytes, status: int) -> None:
    proto, transport = _conn()
    proto.data_received(raw)
    assert int(bytes(transport.out).split(b" ")[1]) == status
    assert transport.closed


def test_http_connection_close_is_honoured() -> None:
    proto, transport = _conn()
    proto.data_received(_post(b"{}", b"connection: close\r\n"))
    assert _responses(bytes(transport.out)) == [(200, b'{"echo":2}')] and transport.closed


# ------------------------------------------------------------------------------ real sockets


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.CertPaths:
    return pki.init_certs(tmp_path_factory.mktemp("transports") / "certs", clients=())


@pytest.fixture
def policy_file(tmp_path: Path, certs: pki.CertPaths) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(jwks=certs.jwks, response_headers="true"))
    return path


def _config(tmp_path: Path, policy_file: Path, transport: str, **kwargs: Any) -> GatewayConfig:
    return GatewayConfig(
        policy_path=str(policy_file),
        listen=ListenAddress(uds=str(tmp_path / "run" / "extproc.sock")),
        transport=transport,  # type: ignore[arg-type]
        audit_log=str(tmp_path / "audit.jsonl"),
        unit_salt=b"salt",
        **kwargs,
    )


def _token(certs: pki.CertPaths) -> str:
    return "Bearer " + pki.mint_token(certs, "user-1", residency="eu", scopes=["predict"])


async def _grpc_call(target: str, req: pb.ProcessingRequest, credentials: Any = None) -> pb.ProcessingResponse:
    """A bidi-stream call, as Envoy makes it: one message out, one back."""
    channel = (
        grpc.aio.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", "localhost")])
        if credentials is not None
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        call = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=pb.ProcessingRequest.SerializeToString,
            response_deserializer=pb.ProcessingResponse.FromString,
        )()
        await call.write(req)
        response = await call.read()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        return response


async def _http_call(uds: str, body: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_unix_connection(uds)
    writer.write(b"POST /ext_proc HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    payload = await reader.readexactly(length)
    writer.close()
    return int(head.split(b" ")[1]), payload


def _cluster(resp: pb.ProcessingResponse) -> str:
    for option in resp.request_headers.response.header_mutation.set_headers:
        if option.header.key == HEADER_CLUSTER:
            return option.header.raw_value.decode()
    raise AssertionError(f"no cluster header in {resp}")


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_service_answers_on_a_private_unix_socket(
    tmp_path: Path, policy_file: Path, certs: pki.CertPaths, transport: str
) -> None:
    gateway = Gateway(_config(tmp_path, policy_file, transport))
    await gateway.start()
    uds = gateway.config.listen.uds
    assert uds is not None
    try:
        assert stat.S_IMODE(os.stat(uds).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(Path(uds).parent).st_mode) == 0o700
        req = request(infer(_token(certs)))
        if transport == "grpc":
            resp = await _grpc_call(f"unix:{uds}", req)
        else:
            status, body = await _http_call(uds, envoy_json(req))
            assert status == 200
            resp = json_format.Parse(body, pb.ProcessingResponse())
        assert _cluster(resp).startswith("cg.tabular.")
    finally:
        await gateway.close()
    assert not os.path.exists(uds)
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["outcome"] for line in lines] == ["allow"]


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_tcp_listener_requires_a_client_certificate(
    tmp_path: Path, policy_file: Path, certs: pki.CertPaths, transport: str, unused_tcp_port: int
) -> None:
    config = _config(tmp_path, policy_file, transport, certs_dir=str(certs.dir))
    config = GatewayConfig(
        **{
            **{f: getattr(config, f) for f in config.__slots__},
            "listen": ListenAddress(host="127.0.0.1", port=unused_tcp_port),
        }
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        req = request(infer(_token(certs)))
        ca = certs.ca_cert.read_bytes()
        if transport == "grpc":
            good = grpc.ssl_channel_credentials(
                ca, certs.envoy_client_key.read_bytes(), certs.envoy_client_cert.read_bytes()
            )
            resp = await _grpc_call(f"127.0.0.1:{unused_tcp_port}", req, good)
            assert _cluster(resp).startswith("cg.tabular.")
            with pytest.raises(grpc.aio.AioRpcError):
                await asyncio.wait_for(
                    _grpc_call(f"127.0.0.1:{unused_tcp_port}", req, grpc.ssl_channel_credentials(ca)), 5
                )
        else:
            import ssl

            ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
            ctx.check_hostname = False
            reader, writer = await asyncio.open_connection("127.0.0.1", unused_tcp_port, ssl=ctx)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.close()
            ctx.load_cert_chain(str(certs.envoy_client_cert), str(certs.envoy_client_key))
            reader, writer = await asyncio.open_connection("127.0.0.1", unused_tcp_port, ssl=ctx)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
            writer.close()
    finally:
        await gateway.close()


async def test_reload_swaps_policy_and_keeps_the_old_one_on_error(
    tmp_path: Path, policy_file: Path, certs: pki.CertPaths
) -> None:
    gateway = Gateway(_config(tmp_path, policy_file, "http"))
    before = gateway.holder.policy
    engine: Processor = gateway.engine
    policy_file.write_text(
        policy_file.read_text().replace("weight: 10\n", "weight: 100\n").replace("weight: 90\n", "weight: 0\n")
    )
    assert gateway.reload() is True
    assert gateway.holder.policy.digest != before.digest
    resp = engine.handle_proto(request(infer(_token(certs))))
    assert _cluster(resp) == "cg.tabular.canary.0"
    good = gateway.holder.policy
    policy_file.write_text("routes: [")
    assert gateway.reload() is False
    assert gateway.holder.policy is good and gateway.holder.reload_failures == 1
    # a new jwt section whose JWKS cannot be loaded: neither the policy nor the verifier changes
    verifier = engine.verifier
    policy_file.write_text(POLICY.format(jwks=certs.dir / "missing-jwks.json", response_headers="true"))
    assert gateway.reload() is False
    assert gateway.holder.policy is good and engine.verifier is verifier and gateway.holder.reload_failures == 2
    # a new, loadable JWKS location: both swap together
    copy = certs.dir / "jwks-copy.json"
    copy.write_bytes(certs.jwks.read_bytes())
    policy_file.write_text(POLICY.format(jwks=copy, response_headers="true"))
    assert gateway.reload() is True
    assert engine.verifier is not verifier and gateway.holder.policy.jwt.jwks == str(copy)
    assert _cluster(engine.handle_proto(request(infer(_token(certs))))).startswith("cg.tabular.")
    await gateway.close()


async def test_start_http_replaces_a_stale_socket_but_never_a_live_one(tmp_path: Path) -> None:
    uds = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(uds)  # bound, never listening, then closed: what a killed process leaves behind
    dead.close()
    server = await start_http(lambda body: b"{}", uds=uds)
    try:
        assert await _http_call(uds, b"{}") == (200, b"{}")
        with pytest.raises(OSError, match="another process is listening"):
            await start_http(lambda body: b"{}", uds=uds)
    finally:
        server.close()
        await server.wait_closed()
    plain = tmp_path / "plain-file"
    plain.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await start_http(lambda body: b"{}", uds=str(plain))


def test_cli_registers_the_gateway_command() -> None:
    args = build_parser().parse_args(
        ["gateway", "--policy", "p.yaml", "--transport", "http", "--listen", "tcp:127.0.0.1:9100", "--max-body", "1m"]
    )
    assert args.transport == "http" and args.max_body == 1 << 20 and args.listen == "tcp:127.0.0.1:9100"
    assert ListenAddress.parse(args.listen) == ListenAddress(host="127.0.0.1", port=9100)
    for bad in ("tcp:nohost", "udp:1.2.3.4:5", "uds:"):
        with pytest.raises(ValueError):
            ListenAddress.parse(bad)
