"""Graceful shutdown of a real ``serve_fast`` process: SIGTERM under load loses no decision.

A grpcio client keeps about 50 ext_proc conversations in flight (each answered once, then paused
mid-stream, then answered again and half-closed, the way Envoy's stream waits for the response
phase) when the process gets SIGTERM. A raw HTTP/2 connection beside it watches the wire: the
two-step GOAWAY, and a stream opened after the final one refused with REFUSED_STREAM.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import grpc
import hpack
import pytest
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from tests.h2.strategies import (
    ACK,
    NO_ERROR,
    PING,
    REFUSED_STREAM,
    SETTINGS,
    Reader,
    data_frame,
    frame,
    grpc_message,
    handshake,
    headers_frame,
    ping,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 50
DRAIN_TIMEOUT = 5.0
MAX_SID = (1 << 31) - 1


def message(kind: str) -> pb.ProcessingRequest:
    r = pb.ProcessingRequest()
    getattr(r, kind).SetInParent()
    return r


def seen(response: pb.ProcessingResponse) -> str:
    return response.request_headers.response.header_mutation.set_headers[0].header.key


class RawPeer:
    """One hand-driven HTTP/2 connection to the server, read frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.wire = Reader()
        self.encoder = hpack.Encoder()
        self.eof = False

    async def next_frames(self, until, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not until():
                chunk = await self.reader.read(65536)
                if not chunk:
                    self.eof = True
                    return
                self.wire.feed(chunk)

    def send(self, data: bytes) -> None:
        self.writer.write(data)


def test_sigterm_under_load_loses_no_decision_and_exits_zero():
    sock_dir = tempfile.mkdtemp(prefix="h2s")
    path = os.path.join(sock_dir, "x.sock")

    async def main():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.h2.h2_serve_script", path, str(DRAIN_TIMEOUT),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert await asyncio.wait_for(proc.stdout.readline(), 20.0) == b"ready\n"
            await run_load_and_terminate(proc)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def run_load_and_terminate(proc: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        # The raw watcher: handshake, one stream answered and left open.
        raw = RawPeer(*await asyncio.open_unix_connection(path))
        raw.send(handshake() + frame(SETTINGS, ACK, 0))
        raw.send(headers_frame(raw.encoder, 1) + data_frame(1, grpc_message(message("request_headers"))))
        await raw.next_frames(lambda: raw.wire.stream(1).data)

        terminated_at: float | None = None
        in_flight = 0
        decided = []  # conversations that got a first answer: (both answers, final status)
        refused = []  # conversations that got none: (status, refused after SIGTERM)
        loaded = asyncio.Event()

        async with grpc.aio.insecure_channel("unix:" + path) as channel:
            stub = pbg.ExternalProcessorStub(channel)

            async def conversation() -> bool:
                """One ext_proc stream; False once the server no longer takes new ones."""
                nonlocal in_flight
                call = stub.Process()
                try:
                    await call.write(message("request_headers"))
                    first = await call.read()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    first = grpc.aio.EOF
                if first is grpc.aio.EOF:
                    # when the refusal is seen, not when the call object was made: on a loaded machine
                    # a call made just before SIGTERM may reach the wire only after the final GOAWAY
                    refused.append((await call.code(), terminated_at is not None))
                    return False
                in_flight += 1
                if in_flight >= WORKERS:
                    loaded.set()
                await asyncio.sleep(0.05)  # mid-conversation, as Envoy waits for the upstream
                answers = [seen(first)]
                try:
                    await call.write(message("response_headers"))
                    second = await call.read()
                    if second is not grpc.aio.EOF:
                        answers.append(seen(second))
                    await call.done_writing()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    pass
                decided.append((answers, await call.code()))
                in_flight -= 1
                return True

            async def worker() -> None:
                while await conversation():
                    pass

            workers = [asyncio.create_task(worker()) for _ in range(WORKERS)]
            await asyncio.wait_for(loaded.wait(), 20.0)
            await asyncio.sleep(0.3)  # steady load: conversations starting and ending all the time
            async with asyncio.timeout(10.0):  # signal at a moment when most are mid-conversation
                while in_flight < WORKERS * 0.8:
                    await asyncio.sleep(0.001)
            terminated_at = loop.time()
            proc.send_signal(signal.SIGTERM)

            # The wire: GOAWAY(2^31-1) and a PING; on its ACK, GOAWAY(last id); later streams refused.
            await raw.next_frames(lambda: any(f[0] == PING and not f[1] & ACK for f in raw.wire.frames))
            assert raw.wire.goaways[0] == (MAX_SID, NO_ERROR)
            raw.send(headers_frame(raw.encoder, 3) + data_frame(3, grpc_message(message("request_headers"))))
            drain_ping = next(f[3] for f in raw.wire.frames if f[0] == PING and not f[1] & ACK)
            raw.send(ping(drain_ping, ack=True))
            await raw.next_frames(lambda: len(raw.wire.goaways) == 2)
            assert raw.wire.goaways[1] == (3, NO_ERROR)  # stream 3 crossed the first GOAWAY: kept
            raw.send(headers_frame(raw.encoder, 5, end_stream=True))
            await raw.next_frames(lambda: raw.wire.stream(5).rst is not None)
            assert raw.wire.stream(5).rst == REFUSED_STREAM
            raw.send(data_frame(1, b"", end_stream=True) + data_frame(3, b"", end_stream=True))
            await raw.next_frames(lambda: False)  # until the server closes the connection
            assert raw.eof
            assert raw.wire.goaways[-1][1] == NO_ERROR
            for sid in (1, 3):
                assert raw.wire.stream(sid).grpc_status == 0 and len(raw.wire.stream(sid).messages) == 1

            await asyncio.wait_for(asyncio.gather(*workers), 10.0)
            raw.writer.close()

        code = await asyncio.wait_for(proc.wait(), DRAIN_TIMEOUT + 5.0)
        exited_after = loop.time() - terminated_at
        report = json.loads((await proc.stdout.read()).decode().strip().splitlines()[-1])
        assert code == 0 and report["cut_off"] == 0
        assert exited_after < DRAIN_TIMEOUT
        # No decision lost: every conversation the server answered once was answered to the end.
        assert len(decided) > WORKERS
        assert all(d == (["x-seen-1", "x-seen-2"], grpc.StatusCode.OK) for d in decided), decided
        # Refusals only after SIGTERM, and cleanly: the client sees UNAVAILABLE, nothing else.
        assert len(refused) == WORKERS
        assert all(r == (grpc.StatusCode.UNAVAILABLE, True) for r in refused), refused
        assert report["streams"] == len(decided) + 2  # the raw peer's streams 1 and 3
        assert report["internal_errors"] == report["processor_errors"] == report["connection_errors"] == 0

    try:
        uvloop.run(main())
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
