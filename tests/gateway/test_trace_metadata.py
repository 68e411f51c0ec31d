"""Envoy puts its own W3C trace context in the ext_proc stream's gRPC metadata when it started the
trace (the request headers then carry none): both gRPC servers hand it to the per-stream processor,
and only when tracing is on."""

from __future__ import annotations

import asyncio
import os
import tempfile

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from gateway.h2 import H2Connection, serve_fast
from gateway.h2.connection import trace_carrier
from gateway.transport_grpc import start_grpc

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


class Recorder:
    """A processor factory that remembers what each stream was given."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, *args):
        self.calls.append(args)
        return self

    def handle(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        response = pb.ProcessingResponse()
        response.request_headers.SetInParent()
        return response


def test_the_carrier_holds_only_the_trace_headers():
    headers = ((b":path", b"/x"), (b"traceparent", TRACEPARENT.encode()), (b"tracestate", b"a=1"), (b"x", b"y"))
    assert trace_carrier(headers) == {"traceparent": TRACEPARENT, "tracestate": "a=1"}
    assert trace_carrier(((b":path", b"/x"),)) is None


def test_the_connection_reads_no_metadata_unless_asked():
    assert H2Connection(Recorder())._trace_context is False


async def _call(target: str, metadata) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=pb.ProcessingRequest.SerializeToString,
            response_deserializer=pb.ProcessingResponse.FromString,
        )
        request = pb.ProcessingRequest()
        request.request_headers.SetInParent()
        await call(request, metadata=metadata, timeout=30)


@pytest.mark.parametrize("server", ["fast", "grpcio"])
@pytest.mark.parametrize("trace_context", [True, False])
async def test_each_stream_gets_its_trace_metadata_when_tracing_is_on(server, trace_context):
    recorder = Recorder()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "xp.sock")
        if server == "fast":
            srv = await serve_fast(recorder, uds=path, trace_context=trace_context)
        else:
            srv = await start_grpc(recorder, uds=path, trace_context=trace_context)
        try:
            await _call("unix:" + path, (("traceparent", TRACEPARENT),))
            await _call("unix:" + path, ())
        finally:
            if server == "fast":
                await srv.drain(timeout=2.0)
            else:
                await asyncio.wait_for(srv.stop(None), 10)
    if trace_context:
        assert recorder.calls == [({"traceparent": TRACEPARENT},), (None,)]
    else:
        assert recorder.calls == [(), ()]
