"""The link between a front process and the model executor (``sidecar --workers N``): wire format,
handshake, and the front's end, ``RemoteBatcher`` (the ``Batcher`` interface, run elsewhere).

Tensors never cross the socket pickled. A front writes each request's inputs into a slot of its
arena (``sidecar.arena``, shared memory the executor mapped at the handshake) and sends a small
control frame: request id, rows, and per input its dtype, shape and offset. The executor stacks rows
of every front's requests into one batch, writes each request's outputs into the same slot and
answers with their dtypes, shapes and offsets; the front copies them out and frees the slot.

When the arena has no room left (requests in flight beyond ``ARENA_BYTES``), the request's bytes
travel inline in the frame instead, and outputs whose size the signature does not fix come back
inline too: the fallback costs a copy through the socket, never a refusal. The executor counts both
paths (``cohortgate_sidecar_worker_requests_total{path}``).

Frames are a 4-byte little-endian length and a ``marshal``-ed tuple of ints, strings and bytes
(both ends are the same interpreter; the socket is private to one sidecar's processes):

    front -> executor  (id, rows, ((dtype, shape, offset, None | bytes), ...), out_offset, out_capacity, timing?)
    executor -> front  (id, 0, ((dtype, shape, offset, None | bytes), ...), None | timing tuple)
                       (id, 1, error class name, message, retry_after_s)

The handshake (blocking, once per connection) is the only pickled exchange: the front sends its
arena's fd, the executor answers with the model's signature, provider and artifact, and its stats' fd.

The executor going away fails the requests in flight with 503 (``Unavailable``), turns ``ready``
false and reconnects every ``RECONNECT_S`` until the parent has restarted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import marshal
import math
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily

from sidecar import errors
from sidecar.arena import ALIGN, Arena, SharedStats, aligned, attach
from sidecar.batching import BatchTiming, Tensors
from sidecar.errors import InferenceFailed, SidecarError, Unavailable
from sidecar.metrics import PREFIX
from sidecar.protocol import DATATYPES, Signature

log = logging.getLogger(__name__)

VERSION = 1
HEADER = struct.Struct("<I")
RECONNECT_S = 0.2
HANDSHAKE_S = 10.0  # a busy executor answers a hello in far less
OK, FAILED = 0, 1
_ERRORS: dict[str, type[SidecarError]] = {
    cls.__name__: cls
    for cls in (errors.BadRequest, errors.NotFound, errors.PayloadTooLarge, InferenceFailed, Unavailable)
}


# ------------------------------------------------------------------------------ frames


def frame(message: Any) -> bytes:
    body = marshal.dumps(message)
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Cut a byte stream into frames: ``feed`` returns the messages complete so far."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        buffer += data
        messages = []
        start = 0
        end = len(buffer)
        while end - start >= 4:
            (size,) = HEADER.unpack_from(buffer, start)
            if end - start - 4 < size:
                break
            messages.append(marshal.loads(memoryview(buffer)[start + 4 : start + 4 + size]))
            start += 4 + size
        if start:
            del buffer[:start]
        return messages


class Corked:
    """Writes gathered within one loop iteration go out as one ``write`` (one syscall, not one each)."""

    __slots__ = ("_loop", "_out", "_scheduled", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._out: list[bytes] = []
        self._scheduled = False
        self.transport: asyncio.Transport | None = None

    def write(self, data: bytes) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)
        self._out.append(data)

    def flush(self) -> None:
        self._scheduled = False
        out = self._out
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            self._out = []
            transport.write(out[0] if len(out) == 1 else b"".join(out))


def pack_tensor(a: np.ndarray, target: np.ndarray | None, offset: int) -> tuple:
    """Describe (and copy) one tensor: into ``target`` at ``offset`` when given, else inline bytes."""
    if target is None:
        return (a.dtype.str, a.shape, -1, np.ascontiguousarray(a).tobytes())
    n = a.nbytes
    if n:
        target[offset : offset + n] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return (a.dtype.str, a.shape, offset, None)


def unpack_tensor(spec: tuple, view: np.ndarray, *, copy: bool) -> np.ndarray:
    """The array a ``pack_tensor`` tuple describes: a view of ``view`` (copied when asked) or its bytes."""
    dtype, shape, offset, data = spec
    dt = np.dtype(dtype)
    if data is not None:
        return np.frombuffer(data, dt).reshape(shape)
    n = dt.itemsize * math.prod(shape)
    a = view[offset : offset + n].view(dt).reshape(shape)
    return a.copy() if copy else a


def tensors_nbytes(arrays: Sequence[np.ndarray]) -> int:
    return sum(aligned(a.nbytes) for a in arrays)


def output_layout(signature: Signature) -> tuple[int, int] | None:
    """The outputs' size as (fixed bytes, bytes per row), when the signature fixes it; else None (then
    they come back inline). Each output is rounded up to ``ALIGN`` on its own, so the fixed part
    reserves that slack."""
    fixed = per_row = 0
    for spec in signature.outputs:
        dims = list(spec.shape)
        free_rows = bool(dims) and dims[0] == -1
        rest = dims[1:] if free_rows else dims
        if any(d < 0 for d in rest):
            return None
        size = int(np.prod(rest, dtype=np.int64)) * np.dtype(DATATYPES[spec.datatype]).itemsize
        if free_rows:
            per_row += size
            fixed += ALIGN
        else:
            fixed += aligned(size)
    return fixed, per_row


# ------------------------------------------------------------------------------ handshake


@dataclass(frozen=True, slots=True)
class Hello:
    """What the executor tells a front about the model it serves."""

    signature: Signature
    provider: str
    providers: tuple[str, ...]
    intra_op_threads: int
    max_batch_size: int
    artifact: Any  # sidecar.artifacts.Artifact without its bytes; timings as a plain dict
    pid: int


def encode_hello(hello: Hello) -> bytes:
    artifact = hello.artifact
    if artifact is not None:
        artifact = dataclasses.replace(artifact, model=b"", timings=dict(artifact.timings))
    return pickle.dumps(dataclasses.replace(hello, artifact=artifact))


def _send_frame_with_fds(sock: socket.socket, payload: bytes, fds: Sequence[int]) -> None:
    data = HEADER.pack(len(payload)) + payload
    sent = socket.send_fds(sock, [data], list(fds))
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_frame_with_fds(sock: socket.socket, max_fds: int = 1) -> tuple[bytes, list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, max_fds)
    if not data:
        raise ConnectionError("the peer closed the connection during the handshake")
    while len(data) < 4 or len(data) < 4 + HEADER.unpack_from(data)[0]:
        more = sock.recv(1 << 16)
        if not more:
            raise ConnectionError("the peer closed the connection during the handshake")
        data += more
    (size,) = HEADER.unpack_from(data)
    return data[4 : 4 + size], list(fds)


def front_handshake(path: str, arena_fd: int) -> tuple[socket.socket, Hello, SharedStats]:
    """Blocking: connect to the executor, hand it our arena, read what it serves. Raises OSError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_S)
        sock.connect(path)
        _send_frame_with_fds(sock, pickle.dumps(("hello", VERSION, os.getpid())), [arena_fd])
        payload, fds = _recv_frame_with_fds(sock)
        if len(fds) != 1:
            raise ConnectionError(f"the executor sent {len(fds)} descriptors, expected its stats")
        try:
            stats = SharedStats(attach(fds[0], writable=False))
        finally:
            os.close(fds[0])
        hello = pickle.loads(payload)  # from our own executor, over a socket in a 0700 directory
        artifact = hello.artifact
        if artifact is not None:
            hello = dataclasses.replace(
                hello, artifact=dataclasses.replace(artifact, timings=MappingProxyType(artifact.timings))
            )
        sock.settimeout(None)
        sock.setblocking(False)
        return sock, hello, stats
    except BaseException:
        sock.close()
        raise


def executor_handshake(sock: socket.socket, hello: bytes, stats_fd: int) -> tuple[np.ndarray, int]:
    """Blocking: read a front's hello and its arena, answer with ``hello``. Returns (arena view, pid)."""
    sock.settimeout(HANDSHAKE_S)
    payload, fds = _recv_frame_with_fds(sock)
    try:
        kind, version, pid = pickle.loads(payload)
        if kind != "hello" or version != VERSION or len(fds) != 1:
            raise ConnectionError(f"not a front's hello: {kind!r} version {version!r} with {len(fds)} fds")
        arena = attach(fds[0])
    finally:
        for fd in fds:
            os.close(fd)
    _send_frame_with_fds(sock, hello, [stats_fd])
    sock.settimeout(None)
    sock.setblocking(False)
    return np.frombuffer(arena, np.uint8), pid


# ------------------------------------------------------------------------------ the front's end


class RemoteModel:
    """What a front knows of the model the executor serves (``OnnxModel``'s descriptive half)."""

    def __init__(
        self, path: str, hello: Hello, sock: socket.socket, stats: SharedStats, arena: Arena, executor_socket: str
    ) -> None:
        self.path = path  # the model's reference, for messages
        self.executor_socket = executor_socket
        self.name = hello.signature.name
        self.signature = hello.signature
        self.provider = hello.provider
        self.providers = hello.providers
        self.intra_op_threads = hello.intra_op_threads
        self.hello = hello
        self._handed = (sock, stats, arena)

    def run(self, inputs: Tensors) -> Tensors:
        raise InferenceFailed("this front runs no model; the executor does")

    def remote_batcher(self, sidecar: Any) -> RemoteBatcher:
        """The batcher for ``Sidecar._start_serving``: it takes over this model's connection."""
        sock, stats, arena = self._handed
        return RemoteBatcher(
            self.executor_socket,
            self.signature,
            sock,
            stats,
            arena,
            sidecar=sidecar,
            max_batch_size=self.hello.max_batch_size,
        )


async def connect(executor_socket: str, reference: str) -> tuple[RemoteModel, Any]:
    """Wait for the executor (it listens once its model is warm), shake hands; (model, artifact)."""
    arena = Arena()
    loop = asyncio.get_running_loop()
    waited = time.monotonic()
    try:
        while True:
            try:
                sock, hello, stats = await loop.run_in_executor(None, front_handshake, executor_socket, arena.fd)
                break
            except OSError as exc:
                if time.monotonic() - waited > 30:
                    log.info("still waiting for the model executor at %s: %s", executor_socket, exc)
                    waited = time.monotonic()
                await asyncio.sleep(RECONNECT_S)
    except BaseException:
        arena.close()
        raise
    return RemoteModel(reference, hello, sock, stats, arena, executor_socket), hello.artifact


@dataclass(slots=True)
class _Call:
    future: asyncio.Future
    offset: int  # the slot, -1 when the inputs went inline
    size: int
    timing: BatchTiming | None


class _FrontProtocol(asyncio.Protocol):
    def __init__(self, batcher: RemoteBatcher, out: Corked) -> None:
        self._batcher = batcher
        self._out = out
        self._reader = FrameReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._out.transport = transport  # type: ignore[assignment]
        self._out.flush()

    def data_received(self, data: bytes) -> None:
        answer = self._batcher._answer
        for message in self._reader.feed(data):
            answer(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.transport = None
        self._batcher._lost(self)


class RemoteBatcher:
    """``Batcher``'s interface in a front process: every request goes to the executor's one batcher.

    ``submit`` copies the inputs into the arena and returns a future resolved by the executor's answer.
    ``depth`` and the batch histograms are the executor's (``SharedStats``)."""

    def __init__(
        self,
        path: str,
        signature: Signature,
        sock: socket.socket,
        stats: SharedStats,
        arena: Arena,
        *,
        sidecar: Any = None,
        max_batch_size: int = 1,
    ) -> None:
        self.path = path  # the executor's socket
        self.signature = signature
        self.max_batch_size = max_batch_size
        self.max_delay_s = 0.0
        self.screen: Callable[..., Any] | None = None  # a contract's admission check, per request here
        self._sock: socket.socket | None = sock
        self.stats = stats
        self.arena = arena
        self._sidecar = sidecar
        self._calls: dict[int, _Call] = {}
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: Corked | None = None
        self._protocol: _FrontProtocol | None = None
        self._reconnecting: asyncio.Task | None = None
        self._connecting: asyncio.Task | None = None
        self._closing = False
        self._took_ready = False
        self._outputs = output_layout(signature)
        if sidecar is not None:
            self._adopt_stats(stats)

    @property
    def depth(self) -> int:
        return self.stats.depth

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        sock, self._sock = self._sock, None
        assert sock is not None
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        self._out = out = Corked(loop)  # writes before the transport exists wait in it
        protocol = self._protocol = _FrontProtocol(self, out)
        self._connecting = loop.create_task(loop.create_unix_connection(lambda: protocol, sock=sock), name="link")
        self._connecting.add_done_callback(lambda task: self._connected(task, protocol, sock))

    def _connected(self, task: asyncio.Task, protocol: _FrontProtocol, sock: socket.socket) -> None:
        if task.cancelled() or task.exception() is not None:  # never expected: treat it as a lost executor
            log.error("cannot attach the executor's socket: %r", None if task.cancelled() else task.exception())
            sock.close()
            self._lost(protocol)

    def submit(self, inputs: Tensors, rows: int, timing: BatchTiming | None = None) -> asyncio.Future:
        """Send one request to the executor; the future resolves to its outputs. Raises ``Unavailable``."""
        out = self._out
        if self._closing or out is None or self._protocol is None:
            raise Unavailable("the model executor is not connected")
        screen = self.screen
        if screen is not None:
            refused = screen(inputs, [rows])
            if refused is not None and refused[0] is not None:
                raise refused[0]
        arena = self.arena
        size = tensors_nbytes(inputs)
        layout = self._outputs
        out_size = 0 if layout is None else layout[0] + layout[1] * rows
        offset = arena.alloc(size + out_size)
        if offset < 0:
            specs = tuple(pack_tensor(a, None, 0) for a in inputs)
            out_offset = out_size = 0
        else:
            view = arena.view
            position = offset
            packed = []
            for a in inputs:
                packed.append(pack_tensor(a, view, position))
                position += aligned(a.nbytes)
            specs = tuple(packed)
            out_offset = offset + size
        self._next = rid = self._next + 1
        future = self._loop.create_future()  # type: ignore[union-attr]
        message = frame((rid, rows, specs, out_offset, out_size, timing is not None))
        out.write(message)
        self._calls[rid] = _Call(future, offset, size + out_size, timing)
        return future

    def _answer(self, message: tuple) -> None:
        call = self._calls.pop(message[0], None)
        if call is None:
            return
        try:
            if message[1] == OK:
                view = self.arena.view
                outputs = tuple(unpack_tensor(spec, view, copy=True) for spec in message[2])
                timing = call.timing
                if timing is not None and message[3] is not None:
                    (timing.queue_s, timing.compute_s, timing.batch_rows, timing.batch_requests, timing.batch) = (
                        message[3]
                    )
            else:
                _, _, kind, text, retry_after = message
                cls = _ERRORS.get(kind)
                if cls is None:
                    exc: Exception = RuntimeError(f"the model executor failed: {text}")
                elif cls is Unavailable:
                    exc = Unavailable(text, retry_after)
                else:
                    exc = cls(text)
        finally:
            if call.offset >= 0:
                self.arena.free(call.offset, call.size)
        if call.future.done():
            return
        if message[1] == OK:
            call.future.set_result(outputs)
        else:
            call.future.set_exception(exc)

    def _lost(self, protocol: _FrontProtocol) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._out = None
        calls, self._calls = self._calls, {}
        gone = Unavailable("the model executor stopped; it is being restarted")
        for call in calls.values():
            if call.offset >= 0:
                self.arena.free(call.offset, call.size)
            if not call.future.done():
                call.future.set_exception(gone)
        if self._closing:
            return
        log.error("the model executor went away; %d request(s) in flight answered 503; reconnecting", len(calls))
        sidecar = self._sidecar
        if sidecar is not None and sidecar.ready:
            sidecar.ready = sidecar.metrics.ready = False
            self._took_ready = True
        self._reconnecting = self._loop.create_task(self._reconnect(), name="sidecar-link-reconnect")  # type: ignore[union-attr]

    async def _reconnect(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(RECONNECT_S)
            try:
                sock, hello, stats = await loop.run_in_executor(None, front_handshake, self.path, self.arena.fd)
            except OSError:
                continue
            except Exception:  # never expected: keep trying, but say why
                log.exception("the handshake with the model executor failed")
                continue
            if hello.signature != self.signature:  # the parent restarts the same model: never expected
                sock.close()
                log.error("the restarted executor serves another signature; this front stays unready")
                return
            if self._closing:
                sock.close()
                return
            self._adopt_stats(stats)
            self._attach(sock)
            sidecar = self._sidecar
            if sidecar is not None and self._took_ready:
                sidecar.ready = sidecar.metrics.ready = True
                self._took_ready = False
            log.info("reconnected to the model executor (pid %d)", hello.pid)
            return

    def _adopt_stats(self, stats: SharedStats) -> None:
        """The front's /metrics shows the executor's batch histograms and transport counts."""
        self.stats = stats
        metrics = self._sidecar.metrics
        metrics.queue_seconds = stats.queue_seconds
        metrics.compute_seconds = stats.compute_seconds
        metrics.batch_rows = stats.batch_rows
        metrics.batch_requests = stats.batch_requests
        if not getattr(metrics, "_worker_collector", False):
            metrics.registry.register(_WorkerCollector(self, metrics.model))
            metrics._worker_collector = True

    async def close(self) -> None:
        """Wait for the requests in flight, then close the link and the arena."""
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        pending = [c.future for c in self._calls.values()]
        if pending:
            await asyncio.wait(pending)
        out = self._out
        if out is not None:
            out.flush()
            if out.transport is not None:
                out.transport.close()
        if self._sock is not None:
            self._sock.close()
        self.arena.close()  # the executor's mapping (if any) keeps the memory until it lets go


class _WorkerCollector:
    """Counts only the executor knows: requests by transport path, batches shared by several fronts."""

    def __init__(self, batcher: RemoteBatcher, model: str) -> None:
        self._batcher = batcher
        self._model = model

    def collect(self) -> Any:
        stats = self._batcher.stats
        paths = CounterMetricFamily(
            f"{PREFIX}_worker_requests",
            "Requests the model executor received from the front processes, by how their tensors came: "
            "shm (the front's shared-memory arena) or inline (through the socket: the arena was full).",
            labels=["model", "path"],
        )
        paths.add_metric([self._model, "shm"], stats.count(SharedStats.SHM))
        paths.add_metric([self._model, "inline"], stats.count(SharedStats.INLINE))
        yield paths
        shared = CounterMetricFamily(
            f"{PREFIX}_cross_front_batches",
            "Batches the model executor formed from the requests of more than one front process.",
            labels=["model"],
        )
        shared.add_metric([self._model], stats.count(SharedStats.CROSS))
        yield shared
