"""gRPC over HTTP/2 for one method: request validation and the header blocks the server sends.

Every block the server sends is built once, by a fresh ``hpack.Encoder`` with never-indexed
literals, so it references only the static table and is valid on any connection at any time
(no per-connection encoder state to keep in step). The request check is a pure function of the
decoded header list, so the connection memoises it together with the HPACK decode.
"""

from __future__ import annotations

import enum
import functools
import re
import struct

import hpack

METHOD_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"

#: 5-byte gRPC message prefix: compressed flag, big-endian length.
MESSAGE_PREFIX = struct.Struct(">BI")


class GrpcStatus(enum.IntEnum):
    """The gRPC status codes this server can answer with."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


def _block(headers: list[tuple[bytes, bytes]]) -> bytes:
    encoder = hpack.Encoder()
    return encoder.encode([hpack.NeverIndexedHeaderTuple(n, v) for n, v in headers])


_GRPC_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]

#: Response headers sent before the first message of a stream.
RESPONSE_HEADERS = _block(_GRPC_HEAD)


@functools.cache
def trailers(status: GrpcStatus, message: str = "", *, trailers_only: bool = False) -> bytes:
    """The block that ends a stream; ``trailers_only`` when no response headers were sent yet.

    ``message`` is a fixed, generic sentence: exception text never reaches the peer.
    """
    fields = list(_GRPC_HEAD) if trailers_only else []
    fields.append((b"grpc-status", str(int(status)).encode()))
    if message:
        fields.append((b"grpc-message", message.encode("ascii")))
    return _block(fields)


@functools.cache
def http_error(status: int) -> bytes:
    """A plain HTTP answer for requests that are not gRPC at all (gRPC spec: 415 / 405)."""
    return _block([(b":status", str(status).encode())])


class Malformed:
    """Verdict for a header list that RFC 9113 §8.2-8.3 calls malformed (RST PROTOCOL_ERROR)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MALFORMED"


MALFORMED = Malformed()

_NAME = re.compile(rb":?[!#$%&'*+\-.^_`|~0-9a-z]+")
_VALUE = re.compile(rb"(?:[^\x00\r\n\t ](?:[^\x00\r\n]*[^\x00\r\n\t ])?)?")
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})
_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNIT = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` in seconds (gRPC over HTTP/2: ``1*8DIGIT unit``), ``None`` if malformed."""
    match = _TIMEOUT.fullmatch(value)
    if match is None:
        return None
    return int(match[1]) * _TIMEOUT_UNIT[match[2]]


def _fields_valid(headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    for name, value in headers:
        if _NAME.fullmatch(name) is None or _VALUE.fullmatch(value) is None:
            return False
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            return False
    return True


def request_verdict(headers: tuple[tuple[bytes, bytes], ...]) -> bytes | Malformed | float | None:
    """What to do with a new stream, from its request headers alone (so it is memoised with them).

    ``None``: accept it. A ``float``: accept it, with its ``grpc-timeout`` in seconds. ``MALFORMED``:
    reset it. ``bytes``: a complete header block to answer with and end it.
    """
    if not _fields_valid(headers):
        return MALFORMED
    pseudo: dict[bytes, bytes] = {}
    regular = False
    content_type = None
    timeout = None
    for name, value in headers:
        if name[0] == 0x3A:  # ':'
            if regular or name in pseudo or name not in _REQUEST_PSEUDO:
                return MALFORMED
            pseudo[name] = value
        else:
            regular = True
            if name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value
    method, path = pseudo.get(b":method"), pseudo.get(b":path")
    if method is None or not path or b":scheme" not in pseudo:
        return MALFORMED
    if method != b"POST":
        return http_error(405)
    if content_type is None or not (
        content_type == b"application/grpc" or content_type.startswith((b"application/grpc+", b"application/grpc;"))
    ):
        return http_error(415)
    if path != METHOD_PATH:
        return trailers(GrpcStatus.UNIMPLEMENTED, "unknown method", trailers_only=True)
    if timeout is not None:
        seconds = parse_timeout(timeout)
        if seconds is None:
            return trailers(GrpcStatus.INTERNAL, "malformed grpc-timeout", trailers_only=True)
        return seconds
    return None


def trailers_valid(headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    """Request trailers: well-formed fields and no pseudo-header (RFC 9113 §8.1)."""
    return _fields_valid(headers) and not any(name[:1] == b":" for name, _ in headers)
