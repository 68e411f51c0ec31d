"""The gRPC side of one ext_proc stream: message framing, the processor, the status it ends with.

The HTTP/2 connection hands each stream its DATA bytes and sends what comes back; this module
knows nothing of frames. A stream splits its bytes into length-prefixed gRPC messages (the
``MESSAGE_PREFIX`` of ``grpcwire``), has its processor answer each, and ends with the trailers
block of a ``GrpcStatus`` (``grpcwire.trailers``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from envoy.service.ext_proc.v3 import external_processor_pb2

from gateway.h2.flowcontrol import StreamFlow
from gateway.h2.grpcwire import MESSAGE_PREFIX, GrpcStatus, trailers
from gateway.h2.streamstate import StreamState

_ProcessingRequest = external_processor_pb2.ProcessingRequest
_OPEN = StreamState.OPEN


class StreamProcessor(Protocol):
    """One per gRPC stream (Envoy opens one stream per HTTP request). A processor that also has
    ``handle_encoded(request) -> bytes | None`` (the same answer, serialised) is asked that instead."""

    def handle(
        self, request: external_processor_pb2.ProcessingRequest
    ) -> external_processor_pb2.ProcessingResponse | None: ...


#: called once per gRPC stream; with ``trace_context`` on, given the stream's W3C trace metadata
#: (``{"traceparent": ..., "tracestate": ...}`` or None)
NewProcessor = Callable[..., StreamProcessor]


class MalformedMessage(Exception):
    """A message that is not a ProcessingRequest (answered INTERNAL, like grpcio does)."""


#: Why a stream's input ends it: (status, grpc-message), from the message prefix alone.
PrefixFailure = tuple[GrpcStatus, str]
_COMPRESSED: PrefixFailure = (GrpcStatus.UNIMPLEMENTED, "compressed messages are not supported")
_BAD_FLAG: PrefixFailure = (GrpcStatus.INTERNAL, "invalid message flag")
_TOO_LARGE: PrefixFailure = (GrpcStatus.RESOURCE_EXHAUSTED, "message larger than the limit")


class GrpcStream(StreamFlow):
    """One stream: its lifecycle state, its flow-control windows (``StreamFlow``) and its gRPC call."""

    __slots__ = ("buf", "deadline", "headers_sent", "processor", "state", "trailers")

    def __init__(
        self, sid: int, processor: StreamProcessor, recv_window: int, send_window: int, deadline: float | None
    ) -> None:
        StreamFlow.__init__(self, sid, recv_window, send_window)
        self.state = _OPEN
        self.processor: StreamProcessor | None = processor
        self.buf = bytearray()  # a partial gRPC message
        self.deadline = deadline  # from grpc-timeout, on the connection's clock
        self.headers_sent = False
        self.trailers: bytes | None = None  # the final block, once decided, while DATA waits before it

    def take_messages(self, data: bytes | bytearray, max_message: int) -> tuple[list[bytes], PrefixFailure | None]:
        """The complete messages in what is buffered plus ``data``, keeping the rest in ``buf``.

        Stops at the first prefix that ends the stream (compressed, bad flag, over ``max_message``)
        and returns why, after the messages before it.
        """
        buf = self.buf
        if buf:
            buf += data
            data = buf
        messages: list[bytes] = []
        size = len(data)
        pos = 0
        failure = None
        while size - pos >= 5:
            flag, length = MESSAGE_PREFIX.unpack_from(data, pos)
            if flag:
                failure = _COMPRESSED if flag == 1 else _BAD_FLAG
                break
            if length > max_message:
                failure = _TOO_LARGE
                break
            end = pos + 5 + length
            if end > size:
                break
            messages.append(data[pos + 5 : end])  # type: ignore[arg-type]  # a bytearray slice: bytes-like
            pos = end
        if data is buf:
            del buf[:pos]
        elif pos < size:
            buf += data[pos:]
        return messages, failure

    def answer(self, message: bytes) -> bytes | None:
        """The processor's response to one message, prefixed for the wire; None if it has none.

        Raises ``MalformedMessage`` for bytes that are not a ProcessingRequest; anything the
        processor raises propagates.
        """
        try:
            request = _ProcessingRequest.FromString(message)
        except Exception:
            raise MalformedMessage from None
        encoded = getattr(self.processor, "handle_encoded", None)
        if encoded is not None:  # the answer as bytes: never parsed into a message to be serialised again
            payload: bytes | None = encoded(request)
        else:
            response = self.processor.handle(request)  # type: ignore[union-attr]
            payload = None if response is None else response.SerializeToString()
        if payload is None:
            return None
        return MESSAGE_PREFIX.pack(0, len(payload)) + payload

    def final_block(self, status: GrpcStatus, message: str) -> bytes:
        """The block that ends the call: trailers, or trailers-only if no response headers went out."""
        block = trailers(status, message, trailers_only=not self.headers_sent)
        self.headers_sent = True
        return block
