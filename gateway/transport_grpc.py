"""The ``grpc`` transport: Envoy's standard ``ExternalProcessor`` service on grpc.aio.

Envoy opens one ``Process`` stream per HTTP request and, in headers-only mode, sends exactly one
message on it. The method is therefore registered as unary-unary on the streaming method's path:
grpcio reads one message, the processor answers it, and the stream ends with status OK -- which
Envoy accepts as "processing complete". This skips grpcio's per-message async-iterator machinery,
the cheapest of the variants measured (see issue 8); the rest of the cost is grpcio's own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from cohortgate.support.files import private_umask

log = logging.getLogger("cohortgate.grpc")

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
METHOD = "Process"

_EMPTY = pb.ProcessingResponse()


class Processor(Protocol):
    def handle(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse | None: ...


def _trace_carrier(context: Any) -> dict[str, str] | None:
    """The call's W3C trace metadata (Envoy's own trace context when it started the trace)."""
    carrier = {k: v for k, v in context.invocation_metadata() or () if k in ("traceparent", "tracestate")}
    return carrier or None


def _handler(new_processor: Callable[..., Processor], trace_context: bool = False) -> grpc.GenericRpcHandler:
    async def process(request: pb.ProcessingRequest, context: Any) -> pb.ProcessingResponse:
        processor = new_processor(_trace_carrier(context)) if trace_context else new_processor()
        response = processor.handle(request)
        return _EMPTY if response is None else response

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(
                process,
                request_deserializer=pb.ProcessingRequest.FromString,
                response_serializer=pb.ProcessingResponse.SerializeToString,
            )
        },
    )


def server_credentials(cert: bytes, key: bytes, ca: bytes) -> grpc.ServerCredentials:
    """mTLS: the processor's certificate, and Envoy's client certificate required (signed by ``ca``)."""
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


async def start_grpc(
    new_processor: Callable[..., Processor],
    *,
    uds: str | None = None,
    host: str | None = None,
    port: int | None = None,
    credentials: grpc.ServerCredentials | None = None,
    trace_context: bool = False,
) -> grpc.aio.Server:
    """Start the server on a Unix socket (mode 0600) or a TCP port (mTLS when ``credentials``).
    ``trace_context``: give each processor the call's W3C trace metadata."""
    server = grpc.aio.server(
        handlers=[_handler(new_processor, trace_context)],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", 1 << 16),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    if uds is not None:
        address = f"unix:{uds}"
        with private_umask():
            bound = server.add_insecure_port(address)
    else:
        if host is None or port is None:
            raise ValueError("give either uds or host and port")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bound = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    if not bound:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    if uds is not None:
        os.chmod(uds, 0o600)
    log.info("ext_proc gRPC server listening on %s%s", address, " (mTLS)" if credentials else "")
    return server
