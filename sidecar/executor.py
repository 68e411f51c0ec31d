"""The model executor of ``sidecar --workers N``: one process per device that owns the model.

It loads the model once (the same supply-chain checks and warm-up as a single sidecar), then listens
on a private Unix socket for the front processes. Each front hands over its shared-memory arena at
the handshake (``sidecar.link``); its requests then arrive as small frames naming tensors in that
arena. Every front's requests go into **one** ``Batcher`` (``sidecar.batching``), so batches form
across fronts; each answer's outputs are written back into the request's slot.

Per-request failures are as in one process: a failed batch fails its own requests (each front gets
the error class and sentence, and answers with that status); the executor lives on. Its batch
metrics live in ``SharedStats``, which every front maps and renders on its ``/metrics``.

Stopping (SIGTERM from the parent, after the fronts have drained): the socket closes, queued and
running batches finish and are answered, then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from sidecar import serving
from sidecar.arena import SharedStats, aligned
from sidecar.batching import Batcher, BatchTiming
from sidecar.errors import ModelLoadError, SidecarError, Unavailable
from sidecar.link import (
    FAILED,
    OK,
    Corked,
    FrameReader,
    Hello,
    encode_hello,
    executor_handshake,
    frame,
    pack_tensor,
    unpack_tensor,
)
from sidecar.model import CPU, OnnxModel

log = logging.getLogger(__name__)


class _Batches:
    """Counts batches that merged requests from more than one front (requests of one batch are
    answered one after another, in order, so the latest batch's fronts are enough)."""

    __slots__ = ("_batch", "_counted", "_first", "_stats")

    def __init__(self, stats: SharedStats) -> None:
        self._stats = stats
        self._batch = 0
        self._first: object = None
        self._counted = False

    def note(self, batch: int, front: object) -> None:
        if batch != self._batch:
            self._batch, self._first, self._counted = batch, front, False
        elif front is not self._first and not self._counted:
            self._counted = True
            self._stats.cells[SharedStats.CROSS] += 1


class _ExecutorProtocol(asyncio.Protocol):
    """One front's connection: decode its frames, submit to the shared batcher, answer each."""

    def __init__(self, executor: Executor, arena: np.ndarray, pid: int) -> None:
        self._executor = executor
        self._arena = arena
        self.pid = pid
        self._reader = FrameReader()
        self._out = Corked(asyncio.get_running_loop())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._out.transport = transport  # type: ignore[assignment]
        self._executor.connections.add(self)
        log.info("front pid %d connected", self.pid)

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.transport = None
        self._executor.connections.discard(self)
        log.info("front pid %d disconnected", self.pid)

    def data_received(self, data: bytes) -> None:
        executor = self._executor
        batcher = executor.batcher
        cells = executor.stats.cells
        arena = self._arena
        for rid, rows, specs, out_offset, out_size, want_timing in self._reader.feed(data):
            try:
                inputs = tuple(unpack_tensor(spec, arena, copy=False) for spec in specs)
                cells[SharedStats.INLINE if specs and specs[0][2] < 0 else SharedStats.SHM] += 1
                timing = BatchTiming()
                future = batcher.submit(inputs, rows, timing)
            except Exception as exc:
                self._fail(rid, exc)
                continue
            future.add_done_callback(partial(self._answer, rid, out_offset, out_size, timing, want_timing))
        cells[SharedStats.DEPTH] = batcher.depth

    def _answer(
        self, rid: int, offset: int, capacity: int, timing: BatchTiming, want_timing: bool, future: asyncio.Future
    ) -> None:
        executor = self._executor
        executor.stats.cells[SharedStats.DEPTH] = executor.batcher.depth
        exc = Unavailable("the model executor stopped") if future.cancelled() else future.exception()
        if exc is not None:
            self._fail(rid, exc)
            return
        executor.batches.note(timing.batch, self)
        outputs = future.result()
        try:
            arena = self._arena if capacity and sum(aligned(a.nbytes) for a in outputs) <= capacity else None
            specs = []
            position = offset
            for a in outputs:
                specs.append(pack_tensor(a, arena, position))
                position += aligned(a.nbytes)
        except Exception as failed:  # a slot that does not fit (a front's bug): that request fails, alone
            self._fail(rid, failed)
            return
        times = (
            (timing.queue_s, timing.compute_s, timing.batch_rows, timing.batch_requests, timing.batch)
            if want_timing
            else None
        )
        self._out.write(frame((rid, OK, tuple(specs), times)))

    def _fail(self, rid: int, exc: BaseException) -> None:
        if isinstance(exc, SidecarError):
            kind, text = type(exc).__name__, exc.message
        else:
            log.error("request %d failed in the executor: %r", rid, exc)
            kind, text = "internal", type(exc).__name__
        retry_after = exc.retry_after_s if isinstance(exc, Unavailable) else 0
        self._out.write(frame((rid, FAILED, kind, text, retry_after)))

    def close(self) -> None:
        self._out.flush()
        if self._out.transport is not None:
            self._out.transport.close()


class Executor:
    """The executor's state: the model, the one batcher, the stats, the fronts connected."""

    def __init__(self, model: OnnxModel, artifact: Any, batcher: Batcher, stats: SharedStats, stats_fd: int) -> None:
        self.model = model
        self.batcher = batcher
        self.stats = stats
        self.stats_fd = stats_fd
        self.batches = _Batches(stats)
        self.connections: set[_ExecutorProtocol] = set()
        self.hello = encode_hello(
            Hello(
                signature=model.signature,
                provider=model.provider,
                providers=model.providers,
                intra_op_threads=model.intra_op_threads,
                max_batch_size=batcher.max_batch_size,
                artifact=artifact,
                pid=os.getpid(),
            )
        )

    async def accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        welcoming: set[asyncio.Task] = set()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = loop.create_task(self._welcome(conn), name="executor-welcome")
            welcoming.add(task)
            task.add_done_callback(welcoming.discard)

    async def _welcome(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn.setblocking(True)
            arena, pid = await loop.run_in_executor(None, executor_handshake, conn, self.hello, self.stats_fd)
        except (OSError, ValueError) as exc:
            log.warning("a front's handshake failed: %s", exc)
            conn.close()
            return
        await loop.create_unix_connection(lambda: _ExecutorProtocol(self, arena, pid), sock=conn)


async def run(config: Any, socket_path: str, stop: asyncio.Event | None = None) -> None:
    """Load the model, serve fronts on ``socket_path`` until SIGTERM/SIGINT (or ``stop``), drain.

    Raises ``ModelLoadError`` when the model cannot be served (the parent then stops the sidecar)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    name = config.model_name
    threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")
    try:
        try:
            model, artifact = await loop.run_in_executor(threads, serving.load_model, config, config.model_path, name)
        except ModelLoadError:
            raise
        except Exception as exc:  # e.g. the warm-up run failed: restarting would not help either
            raise ModelLoadError(f"model {config.model_path} cannot be served: {exc}") from exc
        stats, stats_fd = SharedStats.create()
        batch = config.max_batch_size if model.signature.batchable else 1
        if batch != config.max_batch_size:
            log.warning("model %s has a fixed first axis: batching is off", name)
        # On CPU the calling thread computes, so batches run on this loop (which does nothing else):
        # no thread hand-over and GIL ping-pong per batch. On CUDA the device computes while the
        # run waits with the GIL released, so a thread lets the loop read and merge the next batch.
        on_loop = model.provider == CPU
        batcher = Batcher(
            model.run,
            None if on_loop else threads,
            max_batch_size=batch,
            max_delay_s=config.max_queue_delay_ms / 1000.0,
            max_queue=config.max_queue,
            observer=stats,
        )
        batcher.start()
        executor = Executor(model, artifact, batcher, stats, stats_fd)
        listener = _listen(socket_path)
        accepting = loop.create_task(executor.accept(listener), name="executor-accept")
        log.info(
            "model executor ready: %s on %s, %d intra-op threads, batching %s",
            name,
            model.provider,
            model.intra_op_threads,
            f"up to {batch} rows" if batch > 1 else "off",
        )
        try:
            await stop.wait()
        finally:
            accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accepting
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)
            await batcher.close()  # queued and running batches finish and are answered
            for _ in range(2):  # their answers' callbacks run (conn.close flushes what they wrote)
                await asyncio.sleep(0)
            for conn in list(executor.connections):
                conn.close()
            os.close(stats_fd)
    finally:
        threads.shutdown(wait=False, cancel_futures=True)


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(256)
    listener.setblocking(False)
    return listener
