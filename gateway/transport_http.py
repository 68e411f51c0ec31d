"""The ``http`` transport: Envoy's ext_proc ``http_service`` (opt-in; Envoy marks it work in progress).

Envoy POSTs each ``ProcessingRequest`` as JSON (proto field names, header values base64 in
``raw_value``) and reads a JSON ``ProcessingResponse`` from a 200 answer; any other status is a
processor failure, which Envoy answers fail-closed. The peer is one well-behaved Envoy on a private
socket, so this is a lean HTTP/1.1 server on an asyncio ``Protocol`` (keep-alive, ``content-length``
or chunked bodies, bounded sizes) rather than a web framework: aiohttp's request machinery alone
costs more than the whole decision. ``GET /healthz`` answers 200 for readiness probes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
import stat
from collections.abc import Callable

from cohortgate.support.files import private_umask

log = logging.getLogger("cohortgate.http")

MAX_HEAD_BYTES = 64 << 10
MAX_BODY_BYTES = 1 << 20

_OK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
_HEALTHZ = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n"


def _error(status: int, reason: str) -> bytes:
    body = b'{"error":{"code":"bad_request","message":"' + reason.encode() + b'"}}'
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class _Incomplete(Exception):
    pass


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ExtProcHttpProtocol(asyncio.Protocol):
    """One connection from Envoy. ``handle(body) -> body`` does the processing, synchronously."""

    __slots__ = ("_buffer", "_handle", "_transport")

    def __init__(self, handle: Callable[[bytes], bytes]) -> None:
        self._handle = handle
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._buffer.clear()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        transport = self._transport
        while buffer and transport is not None:
            try:
                consumed, out, close = self._one(buffer)
            except _Incomplete:
                return
            except _BadRequest as exc:
                transport.write(_error(exc.status, exc.reason))
                transport.close()
                self._transport = None
                return
            del buffer[:consumed]
            transport.write(out)
            if close:
                transport.close()
                self._transport = None
                return

    def _one(self, buffer: bytearray) -> tuple[int, bytes, bool]:
        """Parse one request at the start of ``buffer``: (bytes consumed, response, close after)."""
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise _BadRequest(431, "Request Header Fields Too Large")
            raise _Incomplete
        if end > MAX_HEAD_BYTES:
            raise _BadRequest(431, "Request Header Fields Too Large")
        lines = bytes(buffer[:end]).split(b"\r\n")
        try:
            method, target, version = lines[0].split(b" ")
        except ValueError:
            raise _BadRequest(400, "Bad Request") from None
        length = None
        chunked = False
        close = version != b"HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise _BadRequest(400, "Bad Request")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _BadRequest(400, "Bad Request") from None
                if length < 0:
                    raise _BadRequest(400, "Bad Request")
            elif name == b"transfer-encoding":
                chunked = value.strip().lower() == b"chunked"
                if not chunked:
                    raise _BadRequest(501, "Not Implemented")
            elif name == b"connection":
                token = value.strip().lower()
                close = token == b"close" or (close and token != b"keep-alive")
        start = end + 4
        if chunked:
            body, consumed = _dechunk(buffer, start)
        else:
            length = length or 0
            if length > MAX_BODY_BYTES:
                raise _BadRequest(413, "Payload Too Large")
            if len(buffer) < start + length:
                raise _Incomplete
            body, consumed = bytes(buffer[start : start + length]), start + length
        if method == b"POST":
            out = self._handle(body)
            return consumed, _OK_HEAD + str(len(out)).encode() + b"\r\n\r\n" + out, close
        if method == b"GET" and target == b"/healthz":
            return consumed, _HEALTHZ, close
        raise _BadRequest(405, "Method Not Allowed")


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int]:
    """A chunked body starting at ``start``: (body, end offset); `_Incomplete` until it is all there."""
    parts: list[bytes] = []
    total = 0
    pos = start
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            raise _Incomplete
        try:
            size = int(bytes(buffer[pos:eol]).split(b";", 1)[0], 16)
        except ValueError:
            raise _BadRequest(400, "Bad Request") from None
        pos = eol + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", pos - 2)
            if trailer_end < 0:
                raise _Incomplete
            return b"".join(parts), trailer_end + 4
        total += size
        if total > MAX_BODY_BYTES:
            raise _BadRequest(413, "Payload Too Large")
        if len(buffer) < pos + size + 2:
            raise _Incomplete
        parts.append(bytes(buffer[pos : pos + size]))
        pos += size + 2


def clear_stale_socket(path: str) -> None:
    """Remove a Unix socket left by a dead process; refuse to steal one that is still served."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(errno.EADDRINUSE, "another process is listening on this socket", path)
    finally:
        probe.close()


def server_ssl_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """mTLS: present the processor's certificate and require a client certificate signed by ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def start_http(
    handle: Callable[[bytes], bytes],
    *,
    uds: str | None = None,
    host: str | None = None,
    port: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """Listen on a Unix socket (mode 0600) or TCP (TLS when ``ssl_context``); returns the server."""
    loop = asyncio.get_running_loop()

    def factory() -> ExtProcHttpProtocol:
        return ExtProcHttpProtocol(handle)

    if uds is not None:
        clear_stale_socket(uds)
        with private_umask():
            server = await loop.create_unix_server(factory, uds, backlog=1024)
        os.chmod(uds, 0o600)
        where = f"unix:{uds}"
    else:
        if host is None or port is None:
            raise ValueError("give either uds or host and port")
        server = await loop.create_server(factory, host, port, ssl=ssl_context, backlog=1024)
        where = f"{host}:{port}"
    log.info("ext_proc HTTP server listening on %s%s", where, " (mTLS)" if ssl_context else "")
    return server
