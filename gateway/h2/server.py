"""The asyncio adapter: sockets in, ``H2Connection`` bytes out, and a graceful drain.

Thin on purpose: one ``asyncio.Protocol`` per connection moves bytes between the transport and
the sans-I/O connection, pausing reads while the transport's write buffer is full; one timer per
server calls every connection's ``tick()`` so its timeouts apply. Runs on any asyncio loop;
production runs it on uvloop (``uvloop.run(main())``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl as ssl_module
import stat
import tempfile

from gateway.h2.connection import DRAIN_PING_GRACE, H2Connection, H2Counters, H2Limits, NewProcessor

log = logging.getLogger("gateway.h2")

_BACKLOG = 1024
_SUN_PATH_MAX = 108  # sockaddr_un.sun_path, NUL included
_CLOSE_GRACE = 2.0  # how long a closing transport may take to flush before it is aborted


class _H2Protocol(asyncio.Protocol):
    __slots__ = ("_abort_timer", "_conn", "_server", "_transport")

    def __init__(self, server: FastServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._conn = H2Connection(
            server._new_processor,
            server.limits,
            server.counters,
            local=server.local,
            trace_context=server.trace_context,
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._server._protocols.add(self)
        transport.write(self._conn.initiate())  # type: ignore[attr-defined]
        if self._server._draining:
            self.start_drain()

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        out = conn.receive(data)
        if out:
            self._transport.write(out)  # type: ignore[union-attr]
        if conn.closed:
            self._close_transport()

    def eof_received(self) -> bool:
        return False  # the peer is done: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self._conn.connection_lost()
        self._server._forget(self)
        self._server._lingering.discard(self)

    def pause_writing(self) -> None:
        self._transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self._transport.resume_reading()  # type: ignore[union-attr]

    def _send(self, out: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if out:
            transport.write(out)
        if self._conn.closed:
            self._close_transport()

    def _close_transport(self) -> None:
        """Flush and close; the HTTP/2 connection is over, so drain stops waiting for it.

        A TLS close waits for the peer's close_notify, which grpc clients may never send after
        their GOAWAY; the abort timer makes sure the socket goes anyway.
        """
        transport = self._transport
        if transport is None:
            return
        if not transport.is_closing():
            transport.close()
            self._abort_timer = asyncio.get_running_loop().call_later(_CLOSE_GRACE, transport.abort)
            self._server._lingering.add(self)
        self._server._forget(self)

    def tick(self) -> None:
        self._send(self._conn.tick())

    def start_drain(self) -> None:
        self._send(self._conn.start_drain())

    def finish_drain(self) -> None:
        self._send(self._conn.finish_drain())

    def close(self) -> None:
        self._send(self._conn.close())
        self._close_transport()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class FastServer:
    """A listening ext_proc server. ``drain()`` for a graceful stop, ``close()`` for a hard one.

    ``local``: it listens on a Unix socket, so ``limits.uds_idle_timeout`` applies to its peers.
    """

    def __init__(
        self, new_processor: NewProcessor, limits: H2Limits, *, local: bool = False, trace_context: bool = False
    ) -> None:
        self._new_processor = new_processor
        self.trace_context = trace_context
        self.limits = limits
        self.local = local
        self.counters = H2Counters()
        self._ticker: asyncio.TimerHandle | None = None
        self._protocols: set[_H2Protocol] = set()  # HTTP/2 connections still open
        self._lingering: set[_H2Protocol] = set()  # finished, socket still closing
        self._draining = False
        self._server: asyncio.AbstractServer | None = None
        self._uds: tuple[str, int] | None = None  # path, inode
        self._idle: asyncio.Event | None = None
        #: A UDS path, or ``(host, port)`` for TCP.
        self.address: str | tuple[str, int] = ""

    @property
    def connections(self) -> int:
        return len(self._protocols)

    @property
    def open_streams(self) -> int:
        return sum(protocol._conn.open_streams for protocol in self._protocols)

    def _start_ticker(self) -> None:
        self._ticker = asyncio.get_running_loop().call_later(self.limits.tick_interval, self._tick)

    def _tick(self) -> None:
        for protocol in list(self._protocols):
            protocol.tick()
        self._start_ticker()

    def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def _forget(self, protocol: _H2Protocol) -> None:
        self._protocols.discard(protocol)
        if not self._protocols and self._idle is not None:
            self._idle.set()

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._uds is not None:
            path, inode = self._uds
            self._uds = None
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)

    def close(self) -> None:
        """Stop listening and close every connection now (a final GOAWAY, no waiting)."""
        self._draining = True
        self._stop_listening()
        self._stop_ticker()
        for protocol in list(self._protocols):
            protocol.close()

    async def drain(self, timeout: float = 10.0) -> int:
        """Stop listening, GOAWAY every connection, let open streams finish, then close.

        Streams still open after ``timeout`` seconds are cut off; returns how many (0: nothing lost).
        """
        loop = asyncio.get_running_loop()
        self._draining = True
        self._stop_listening()
        for protocol in list(self._protocols):
            protocol.start_drain()
        grace = loop.call_later(min(DRAIN_PING_GRACE, timeout / 2), self._finish_drains)
        cut_off = 0
        try:
            await self._wait_idle(timeout)
        finally:
            grace.cancel()
            self._stop_ticker()
            leftovers = list(self._protocols)
            cut_off = sum(protocol._conn.open_streams for protocol in leftovers)
            if cut_off:
                log.warning("drain timed out after %.1f s: cutting off %d open streams", timeout, cut_off)
            for protocol in leftovers:
                protocol.close()
            # Finished connections whose socket is still closing (a TLS peer that never sends
            # close_notify) get a moment to flush, then go: the server is done with them.
            for _ in range(10):
                if not self._lingering:
                    break
                await asyncio.sleep(0.01)
            for protocol in [*self._protocols, *self._lingering]:
                protocol.abort()
            if self._server is not None:
                await self._server.wait_closed()
        return cut_off

    def _finish_drains(self) -> None:
        for protocol in list(self._protocols):
            protocol.finish_drain()

    async def _wait_idle(self, timeout: float) -> None:
        if not self._protocols:
            return
        self._idle = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FastServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain(timeout=5.0)


def _bind_unix(path: str) -> socket.socket:
    """A listening socket at ``path`` that is never, even briefly, reachable by other users.

    Bound inside a fresh 0700 directory, set to 0600, then renamed into place, so there is no
    window with umask-default permissions and no process-wide umask change (a path too long for
    that detour is bound in place under a private umask instead).
    """
    path = os.path.abspath(path)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, "not a socket", path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket left by a dead process
        else:
            raise OSError(errno.EADDRINUSE, "a server is already listening", path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tmpdir = tempfile.mkdtemp(prefix=".", dir=os.path.dirname(path))
        tmp = os.path.join(tmpdir, "s")
        try:
            if len(os.fsencode(tmp)) < _SUN_PATH_MAX:
                sock.bind(tmp)
                os.chmod(tmp, 0o600)
                os.rename(tmp, path)
            else:  # no room for the detour: bind in place with a private umask
                old_umask = os.umask(0o177)
                try:
                    sock.bind(path)
                finally:
                    os.umask(old_umask)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            os.rmdir(tmpdir)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_fast(
    new_processor: NewProcessor,
    *,
    uds: str | None = None,
    host: str | None = None,
    port: int | None = None,
    ssl: ssl_module.SSLContext | None = None,
    limits: H2Limits | None = None,
    trace_context: bool = False,
) -> FastServer:
    """Serve ``envoy.service.ext_proc.v3.ExternalProcessor/Process`` on a UDS or TCP (+TLS).

    ``new_processor()`` is called once per gRPC stream. With ``ssl``, ALPN is set to ``h2``
    on the given context (gRPC clients insist on it). ``trace_context``: pass each stream's W3C
    trace metadata to ``new_processor`` (see ``H2Connection``).
    """
    if (uds is None) == (host is None and port is None):
        raise ValueError("serve_fast needs exactly one of uds= or host=/port=")
    if ssl is not None and uds is not None:
        raise ValueError("TLS is for TCP listeners; a UDS is protected by its file mode")
    loop = asyncio.get_running_loop()
    server = FastServer(new_processor, limits or H2Limits(), local=uds is not None, trace_context=trace_context)
    if uds is not None:
        sock = _bind_unix(uds)
        try:
            server._server = await loop.create_unix_server(lambda: _H2Protocol(server), sock=sock)
        except BaseException:
            sock.close()
            raise
        path = os.path.abspath(uds)
        server._uds = (path, os.lstat(path).st_ino)
        server.address = path
    else:
        if ssl is not None:
            ssl.set_alpn_protocols(["h2"])
        server._server = await loop.create_server(
            lambda: _H2Protocol(server), host or "127.0.0.1", port or 0, ssl=ssl, backlog=_BACKLOG
        )
        sockname = server._server.sockets[0].getsockname()
        server.address = (sockname[0], sockname[1])
    server._start_ticker()
    log.info("ext_proc fast server listening on %s", server.address)
    return server
