"""The fast ext_proc server against the real grpcio client (sync and grpc.aio): UDS, TCP, TLS.

Each test runs its own event loop explicitly (uvloop, the production loop, unless the test is
about the loop), so the server and the aio client share it while sync clients run in a thread.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import stat
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from google.protobuf import struct_pb2

from gateway.h2 import FastServer, H2Limits, serve_fast
from tests.h2.strategies import PREFACE, EchoProcessor, Reader, settings

# ----------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    cert_file: str
    key_file: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h2server test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("pki")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Pki(ca.public_bytes(serialization.Encoding.PEM), str(d / "cert.pem"), str(d / "key.pem"))


@pytest.fixture
def sock_dir():
    """A short directory for Unix sockets (sun_path is 108 bytes; tmp_path can be longer)."""
    d = tempfile.mkdtemp(prefix="h2t")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class Endpoint:
    server: FastServer
    target: str
    credentials: grpc.ChannelCredentials | None

    def aio_channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target)
        return grpc.aio.secure_channel(self.target, self.credentials)

    def sync_channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self.credentials)


@asynccontextmanager
async def serving(
    transport: str, sock_dir: str, pki: Pki | None = None, processor: Callable = EchoProcessor, **limits
) -> AsyncIterator[Endpoint]:
    lim = H2Limits(**limits)
    if transport == "uds":
        path = os.path.join(sock_dir, "xp.sock")
        server = await serve_fast(processor, uds=path, limits=lim)
        endpoint = Endpoint(server, "unix:" + path, None)
    elif transport == "tcp":
        server = await serve_fast(processor, host="127.0.0.1", port=0, limits=lim)
        endpoint = Endpoint(server, f"127.0.0.1:{server.address[1]}", None)
    else:
        assert pki is not None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.cert_file, pki.key_file)
        server = await serve_fast(processor, host="127.0.0.1", port=0, ssl=ctx, limits=lim)
        endpoint = Endpoint(
            server, f"127.0.0.1:{server.address[1]}", grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
        )
    try:
        yield endpoint
    finally:
        await server.drain(timeout=2.0)


TRANSPORTS = ["uds", "tcp", "tls"]


def envoy_messages() -> list[pb.ProcessingRequest]:
    """One of each message Envoy sends on an ext_proc stream, the first with attributes."""
    headers = pb.ProcessingRequest()
    for key, value in [(":path", "/v2/models/m/infer"), (":method", "POST"), ("authorization", "Bearer t")]:
        headers.request_headers.headers.headers.add(key=key, raw_value=value.encode())
    attrs = struct_pb2.Struct()
    attrs.update({"source.principal": "spiffe://example.org/ns/a/sa/b", "request.id": "r-1"})
    headers.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    body = pb.ProcessingRequest()
    body.request_body.body = b'{"inputs": []}'
    body.request_body.end_of_stream = True
    response_headers = pb.ProcessingRequest()
    response_headers.response_headers.headers.headers.add(key=":status", raw_value=b"200")
    response_body = pb.ProcessingRequest()
    response_body.response_body.body = b"{}"
    trailers = pb.ProcessingRequest()
    trailers.request_trailers.trailers.headers.add(key="x-t", raw_value=b"1")
    response_trailers = pb.ProcessingRequest()
    response_trailers.response_trailers.trailers.headers.add(key="grpc-status", raw_value=b"0")
    return [headers, body, response_headers, response_body, trailers, response_trailers]


def seen_keys(responses) -> list[str]:
    return [r.request_headers.response.header_mutation.set_headers[0].header.key for r in responses]


def run(main, loop: str = "uvloop"):
    return uvloop.run(main()) if loop == "uvloop" else asyncio.run(main())


# ----------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_aio_client_every_message_shape(transport, loop, sock_dir, pki):
    async def main():
        async with serving(transport, sock_dir, pki) as ep, ep.aio_channel() as channel:
            stub = pbg.ExternalProcessorStub(channel)
            call = stub.Process(iter(envoy_messages()))
            responses = [r async for r in call]
            assert await call.code() == grpc.StatusCode.OK
            # request_trailers gets no answer from EchoProcessor: 5 answers for 6 messages.
            assert seen_keys(responses) == ["x-seen-1", "x-seen-2", "x-seen-3", "x-seen-4", "x-seen-6"]
            kinds = [r.request_headers.response.header_mutation.set_headers[0].header.raw_value for r in responses]
            assert kinds[0].startswith(b"request_headers:") and kinds[3].startswith(b"response_body:")

    run(main, loop)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sync_client_every_message_shape(transport, sock_dir, pki):
    def client(ep: Endpoint) -> tuple[list[str], grpc.StatusCode]:
        with ep.sync_channel() as channel:
            stub = pbg.ExternalProcessorStub(channel)
            call = stub.Process(iter(envoy_messages()), timeout=10)
            responses = list(call)
            return seen_keys(responses), call.code()

    async def main():
        async with serving(transport, sock_dir, pki) as ep:
            keys, code = await asyncio.to_thread(client, ep)
            assert code == grpc.StatusCode.OK
            assert keys == ["x-seen-1", "x-seen-2", "x-seen-3", "x-seen-4", "x-seen-6"]
            assert ep.server.counters.streams == 1

    run(main)


def test_interactive_stream_like_envoy_headers_then_response_headers(sock_dir):
    """Envoy writes, waits for the answer, writes again much later, then half-closes."""

    async def main():
        async with serving("uds", sock_dir) as ep, ep.aio_channel() as channel:
            call = pbg.ExternalProcessorStub(channel).Process()
            messages = envoy_messages()
            await call.write(messages[0])
            first = await call.read()
            await asyncio.sleep(0.05)
            await call.write(messages[2])
            second = await call.read()
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert seen_keys([first, second]) == ["x-seen-1", "x-seen-2"]
            assert await call.code() == grpc.StatusCode.OK

    run(main)


def test_half_close_without_messages_is_ok(sock_dir):
    async def main():
        async with serving("uds", sock_dir) as ep, ep.aio_channel() as channel:
            call = pbg.ExternalProcessorStub(channel).Process(iter([]))
            assert [r async for r in call] == []
            assert await call.code() == grpc.StatusCode.OK

    run(main)


def test_client_cancel_resets_the_stream_and_the_connection_carries_on(sock_dir):
    async def main():
        async with serving("uds", sock_dir) as ep, ep.aio_channel() as channel:
            stub = pbg.ExternalProcessorStub(channel)
            call = stub.Process()
            await call.write(envoy_messages()[0])
            await call.read()
            call.cancel()
            for _ in range(200):
                if ep.server.counters.peer_resets:
                    break
                await asyncio.sleep(0.01)
            assert ep.server.counters.peer_resets == 1
            again = stub.Process(iter(envoy_messages()[:1]))
            assert len([r async for r in again]) == 1
            assert ep.server.connections == 1

    run(main)


@pytest.mark.parametrize("transport", ["uds", "tls"])
def test_compressed_messages_are_refused_with_unimplemented(transport, sock_dir, pki):
    async def main():
        async with serving(transport, sock_dir, pki) as ep, ep.aio_channel() as channel:
            call = pbg.ExternalProcessorStub(channel).Process(
                iter(envoy_messages()[:1]), compression=grpc.Compression.Gzip
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in call]
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(main)


def test_processor_exception_is_internal_generic_and_logged_once(sock_dir, caplog):
    boom = pb.ProcessingRequest()
    boom.request_headers.headers.headers.add(key="x-boom", raw_value=b"1")

    async def main():
        async with serving("uds", sock_dir) as ep, ep.aio_channel() as channel:
            stub = pbg.ExternalProcessorStub(channel)
            with caplog.at_level(logging.ERROR, logger="gateway.h2"):
                call = stub.Process(iter([boom]))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    [r async for r in call]
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert info.value.details() == "internal error"
            assert ep.server.counters.processor_errors == 1
            assert len([r for r in caplog.records if r.name == "gateway.h2"]) == 1
            ok = stub.Process(iter(envoy_messages()[:1]))  # same connection, still serving
            assert len([r async for r in ok]) == 1
            assert ep.server.counters.connections == 1

    run(main)


def test_unknown_method_is_unimplemented(sock_dir):
    async def main():
        async with serving("uds", sock_dir) as ep, ep.aio_channel() as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await check(b"")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(main)


def test_large_messages_both_ways_respect_flow_control(sock_dir):
    class Echo:
        def handle(self, request):
            r = pb.ProcessingResponse()
            r.request_body.response.body_mutation.body = request.request_body.body
            return r

    big = pb.ProcessingRequest()
    big.request_body.body = os.urandom(3 << 20)

    async def main():
        async with (
            serving("uds", sock_dir, processor=Echo) as ep,
            grpc.aio.insecure_channel(ep.target, options=[("grpc.max_receive_message_length", 8 << 20)]) as ch,
        ):
            call = pbg.ExternalProcessorStub(ch).Process(iter([big, big]))
            bodies = [r.request_body.response.body_mutation.body async for r in call]
            assert bodies == [big.request_body.body] * 2

    run(main)


def test_message_over_the_limit_is_resource_exhausted(sock_dir):
    big = pb.ProcessingRequest()
    big.request_body.body = b"x" * 5000

    async def main():
        async with serving("uds", sock_dir, max_message_size=4096) as ep, ep.aio_channel() as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in pbg.ExternalProcessorStub(channel).Process(iter([big]))]
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(main)


def test_many_concurrent_streams_above_the_stream_limit_all_complete(sock_dir):
    async def main():
        async with serving("uds", sock_dir, max_concurrent_streams=16) as ep, ep.aio_channel() as channel:
            stub = pbg.ExternalProcessorStub(channel)
            messages = envoy_messages()

            async def one():
                call = stub.Process()
                await call.write(messages[0])
                first = await call.read()
                await asyncio.sleep(0.01)  # hold the stream open so they overlap
                await call.write(messages[1])
                second = await call.read()
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
                return seen_keys([first, second])

            results = await asyncio.gather(*(one() for _ in range(200)))
            assert results == [["x-seen-1", "x-seen-2"]] * 200

    run(main)


# ----------------------------------------------------------------------------- lifecycle


def test_drain_lets_in_flight_streams_finish_and_refuses_new_connections(sock_dir):
    async def main():
        path = os.path.join(sock_dir, "d.sock")
        server = await serve_fast(EchoProcessor, uds=path)
        async with grpc.aio.insecure_channel("unix:" + path) as channel:
            stub = pbg.ExternalProcessorStub(channel)
            call = stub.Process()
            messages = envoy_messages()
            await call.write(messages[0])
            await call.read()
            drain = asyncio.create_task(server.drain(timeout=5.0))
            await asyncio.sleep(0.2)
            assert not os.path.exists(path)  # no longer listening
            async with grpc.aio.insecure_channel("unix:" + path) as fresh:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    [r async for r in pbg.ExternalProcessorStub(fresh).Process(iter(messages[:1]), timeout=2)]
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not drain.done()  # still waiting for the in-flight stream
            await call.write(messages[2])
            assert seen_keys([await call.read()]) == ["x-seen-2"]
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            await asyncio.wait_for(drain, 5.0)
            assert server.connections == 0

    run(main)


def test_drain_under_load_loses_no_in_flight_stream(sock_dir):
    """SIGTERM's path: 50 streams mid-conversation when the drain starts all finish OK."""

    async def main():
        path = os.path.join(sock_dir, "l.sock")
        server = await serve_fast(EchoProcessor, uds=path)
        messages = envoy_messages()
        async with grpc.aio.insecure_channel("unix:" + path) as channel:
            stub = pbg.ExternalProcessorStub(channel)
            started = asyncio.Event()
            opened = 0

            async def conversation():
                nonlocal opened
                call = stub.Process()
                await call.write(messages[0])
                first = await call.read()
                opened += 1
                if opened == 50:
                    started.set()
                await started.wait()
                await asyncio.sleep(0.3)  # the drain has begun
                await call.write(messages[2])
                second = await call.read()
                await call.done_writing()
                return seen_keys([first, second]), await call.code()

            tasks = [asyncio.create_task(conversation()) for _ in range(50)]
            await started.wait()
            drain = asyncio.create_task(server.drain(timeout=10.0))
            results = await asyncio.gather(*tasks)
            await asyncio.wait_for(drain, 10.0)
        assert results == [(["x-seen-1", "x-seen-2"], grpc.StatusCode.OK)] * 50
        assert server.counters.streams == 50 and server.connections == 0

    run(main)


def test_drain_timeout_cuts_off_streams_that_never_end(sock_dir):
    async def main():
        path = os.path.join(sock_dir, "t.sock")
        server = await serve_fast(EchoProcessor, uds=path)
        async with grpc.aio.insecure_channel("unix:" + path) as channel:
            call = pbg.ExternalProcessorStub(channel).Process()
            await call.write(envoy_messages()[0])
            await call.read()
            loop = asyncio.get_running_loop()
            start = loop.time()
            await server.drain(timeout=0.5)
            assert loop.time() - start < 2.0
            assert server.connections == 0
            call.cancel()

    run(main)


def test_unix_socket_is_private_replaces_stale_and_refuses_live(sock_dir):
    async def main():
        path = os.path.join(sock_dir, "p.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # a leftover file nobody listens on
        server = await serve_fast(EchoProcessor, uds=path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert os.listdir(sock_dir) == ["p.sock"]  # no temporary left behind
        with pytest.raises(OSError) as info:
            await serve_fast(EchoProcessor, uds=path)
        assert info.value.errno == errno.EADDRINUSE
        server.close()
        await server.wait_closed()
        assert not os.path.exists(path)
        with open(path, "w"):
            pass
        with pytest.raises(FileExistsError):
            await serve_fast(EchoProcessor, uds=path)

    run(main)


def test_hard_close_sends_goaway_and_closes_connections(sock_dir):
    async def main():
        async with serving("uds", sock_dir) as ep, ep.aio_channel() as channel:
            stub = pbg.ExternalProcessorStub(channel)
            assert len([r async for r in stub.Process(iter(envoy_messages()[:1]))]) == 1
            ep.server.close()
            for _ in range(200):
                if ep.server.connections == 0:
                    break
                await asyncio.sleep(0.01)
            assert ep.server.connections == 0

    run(main)


# ----------------------------------------------------------------------------- timeouts through sockets


async def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def test_idle_tcp_connection_is_closed_gracefully_and_the_client_reconnects(sock_dir):
    async def main():
        async with serving("tcp", sock_dir, idle_timeout=0.3) as ep, ep.aio_channel() as channel:
            stub = pbg.ExternalProcessorStub(channel)
            assert len([r async for r in stub.Process(iter(envoy_messages()[:1]))]) == 1
            assert await _wait_for(lambda: ep.server.connections == 0)
            assert ep.server.counters.idle_timeouts == 1
            assert ep.server.counters.connection_errors == 0
            again = stub.Process(iter(envoy_messages()[:1]))  # a fresh connection, no error seen
            assert len([r async for r in again]) == 1 and await again.code() == grpc.StatusCode.OK
            assert ep.server.counters.connections == 2

    run(main)


@pytest.mark.parametrize(("uds_idle_timeout", "closed"), [(None, False), (0.3, True)])
def test_unix_socket_idle_timeout_is_its_own_and_off_by_default(uds_idle_timeout, closed, sock_dir):
    async def main():
        async with (
            serving("uds", sock_dir, idle_timeout=0.3, uds_idle_timeout=uds_idle_timeout) as ep,
            ep.aio_channel() as channel,
        ):
            stub = pbg.ExternalProcessorStub(channel)
            assert len([r async for r in stub.Process(iter(envoy_messages()[:1]))]) == 1
            assert await _wait_for(lambda: ep.server.connections == 0, timeout=1.2) is closed
            assert ep.server.counters.idle_timeouts == int(closed)

    run(main)


def test_peer_that_never_acks_settings_gets_settings_timeout_then_eof(sock_dir):
    async def main():
        async with serving("tcp", sock_dir, settings_timeout=0.2) as ep:
            reader, writer = await asyncio.open_connection(*ep.server.address)
            writer.write(PREFACE + settings())  # a handshake, but never our SETTINGS' ACK
            loop = asyncio.get_running_loop()
            start = loop.time()
            got = Reader()
            while chunk := await asyncio.wait_for(reader.read(65536), 3.0):
                got.feed(chunk)
            assert loop.time() - start < 2.0
            assert got.goaways == [(0, 0x4)]  # SETTINGS_TIMEOUT
            assert ep.server.counters.settings_timeouts == 1
            writer.close()

    run(main)


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (b"\xff\xff\xff\x00\x00\x00\x00\x00\x01", 0x6),  # a frame longer than max frame size
        (b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00", 0x1),  # WINDOW_UPDATE of 0
    ],
)
def test_malformed_frames_over_a_real_socket_end_in_goaway_then_eof(garbage, code, sock_dir):
    """No hang and no exception over a real socket: the server answers GOAWAY and closes."""

    async def main():
        async with serving("uds", sock_dir) as ep:
            reader, writer = await asyncio.open_unix_connection(ep.server.address)
            writer.write(PREFACE + settings() + garbage)
            got = Reader()
            while chunk := await asyncio.wait_for(reader.read(65536), 3.0):
                got.feed(chunk)
            assert got.goaways == [(0, code)]
            assert ep.server.counters.internal_errors == 0
            assert await _wait_for(lambda: ep.server.connections == 0, timeout=1.0)
            writer.close()

    run(main)
