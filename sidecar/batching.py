"""Dynamic batching, in the manner of MLServer's adaptive batcher.

The merge and split of tensors, and the choice of which queued requests form the next batch, are
plain functions (tested without an event loop). ``Batcher`` is the thin asyncio shell around them:
each request gets its own future; one worker takes batches off the queue and runs each as a single
call in the model's executor thread; a failed batch fails every future in it.

Policy: greedy by default (``max_delay_s == 0``): whatever is queued when the previous batch
finishes forms the next one, so a lone request never waits. A delay, when set, counts from the
oldest queued request. ``max_batch_size`` counts rows (the first axis), as Triton's does; at 1,
requests never merge. Requests whose trailing shapes or dtypes differ from the head of the queue
wait for a batch of their own.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sidecar.errors import InferenceFailed, Unavailable

Tensors = tuple[np.ndarray, ...]


@dataclass(slots=True)
class BatchTiming:
    """What happened to one request inside the batcher, filled in before its future resolves.

    Only a caller that asks (tracing on) passes one to `Batcher.submit`; without it the batcher
    records nothing per request, so the hot path pays a single ``is not None`` test."""

    queue_s: float = 0.0  # from submit to the batch's dispatch
    compute_s: float = 0.0  # the model call for the whole batch, in the executor thread
    batch_rows: int = 0  # rows in the batch this request ran in
    batch_requests: int = 0  # requests merged into that batch
    batch: int = 0  # that batch's sequence number in this batcher (1, 2, ...): requests in one share it


@dataclass(slots=True)
class Pending:
    """One queued request: its inputs, its rows, its merge key and the future its caller awaits."""

    inputs: Tensors
    rows: int
    key: tuple
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    timing: BatchTiming | None = None


def merge_key(inputs: Tensors) -> tuple:
    """Requests merge only when every input agrees on dtype and on all axes after the first."""
    return tuple((a.dtype.str, a.shape[1:]) for a in inputs)


def take_batch(queue: deque[Pending], max_rows: int) -> list[Pending]:
    """Pop the next batch off the left of ``queue``: the head, then followers that fit and match.

    A head larger than ``max_rows`` runs alone; the first follower that does not fit or does not
    share the head's key ends the batch (FIFO order is kept).
    """
    head = queue.popleft()
    batch = [head]
    rows = head.rows
    key = head.key
    while queue:
        nxt = queue[0]
        if rows + nxt.rows > max_rows or nxt.key != key:
            break
        queue.popleft()
        batch.append(nxt)
        rows += nxt.rows
    return batch


def merge(parts: Sequence[Tensors]) -> Tensors:
    """Stack the inputs of several requests along the first axis."""
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def split(outputs: Tensors, rows: Sequence[int]) -> list[Tensors]:
    """Cut batched outputs back into one tuple per request, by each request's row count."""
    total = sum(rows)
    for array in outputs:
        if array.ndim == 0 or array.shape[0] != total:
            got = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
            raise InferenceFailed(
                f"the model returned {got} for a batch of {total} rows, so the batch cannot be "
                "split; serve this model with --max-batch-size 1"
            )
    if len(rows) == 1:
        return [outputs]
    parts = []
    start = 0
    for count in rows:
        stop = start + count
        parts.append(tuple(a[start:stop] for a in outputs))
        start = stop
    return parts


class BatchObserver(Protocol):
    """Where the batcher reports what it did (the metrics adapter implements this)."""

    def on_batch(self, rows: int, requests: int, compute_s: float, waits_s: Sequence[float]) -> None: ...


class _NullObserver:
    def on_batch(self, rows: int, requests: int, compute_s: float, waits_s: Sequence[float]) -> None:
        pass


RunFn = Callable[[Tensors], Tensors]
# A batch's admission check (the data contract in enforce mode): given the merged inputs and each
# request's rows, None when every request may run, else per request the error that refuses it (or
# None). One vector check per batch instead of one per request keeps the event loop's cost flat.
Screen = Callable[[Tensors, Sequence[int]], Sequence[BaseException | None] | None]


def _timed(run: RunFn, inputs: Tensors) -> tuple[Tensors, float]:
    """Runs in the executor thread, so the compute time excludes waiting for the thread."""
    started = time.perf_counter()
    outputs = run(inputs)
    return outputs, time.perf_counter() - started


# Opt-in (`sidecar --inline-max-us`): a lone one-row request (nothing queued, nothing computing, greedy
# batching) runs on the event loop itself when the model's recent lone one-row runs took under the
# limit, saving the executor hop (two thread wake-ups and a loop round trip: CPU per request at
# concurrency 1 x0.71, measured). Off by default because the loop cannot see requests still unread in
# their sockets: under concurrent load each lone request finishes before the next is read, so no batch
# ever forms (one-row requests at c64 fell to 0.43x with a 512-column model). For one client at a time.
_LONE_EWMA = 0.2  # weight of the newest lone run in the running estimate


def _stamp(p: Pending, started: float, compute_s: float, batch_rows: int, batch_requests: int, batch: int) -> None:
    """Fill the request's timing, when it asked for one, with its wait and its batch."""
    if p.timing is not None:
        t = p.timing
        t.queue_s, t.compute_s = started - p.enqueued, compute_s
        t.batch_rows, t.batch_requests, t.batch = batch_rows, batch_requests, batch


def _refuse(batch: list[Pending], refused: Sequence[BaseException | None]) -> list[Pending]:
    """Fail the requests a screen refused; the rest, in order."""
    if len(refused) != len(batch):
        raise InferenceFailed(f"the batch screen answered for {len(refused)} of {len(batch)} requests")
    kept = []
    for p, exc in zip(batch, refused, strict=True):
        if exc is None:
            kept.append(p)
        elif not p.future.done():
            p.future.set_exception(exc)
    return kept


class Batcher:
    """Queue requests, run them in batches in ``executor``, resolve each caller's future.

    ``executor=None`` runs each batch on the event loop's own thread: for a process whose loop does
    nothing but feed the model (the executor of ``sidecar --workers``), where a thread hand-over per
    batch only adds wake-ups and GIL contention.

    Create it anywhere; ``start()`` must run inside the event loop that will use it (the queue's
    wake-up futures belong to that loop).

    At most ``max_inflight`` batches are handed to the executor at once. A second one is handed
    over while the first computes only when it is already full (it cannot grow by waiting), so
    large requests keep the model busy back to back while small ones still batch greedily.
    """

    def __init__(
        self,
        run: RunFn,
        executor: Executor | None,
        *,
        max_batch_size: int = 1,
        max_delay_s: float = 0.0,
        max_queue: int = 1024,
        max_inflight: int = 2,
        observer: BatchObserver | None = None,
        inline_max_s: float = 0.0,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_s < 0 or max_inflight < 1:
            raise ValueError("max_batch_size, max_queue and max_inflight must be >= 1, max_delay_s >= 0")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.max_inflight = max_inflight
        self._observer = observer or _NullObserver()
        self._queue: deque[Pending] = deque()
        self._queued_rows = 0
        self._inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Future | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._batches = 0  # batches handed to the model so far (BatchTiming.batch)
        self.lone_s: float | None = None  # running estimate of a lone one-row request's compute time
        self.inline_max_s = inline_max_s if max_delay_s == 0 else 0.0  # 0: never inline
        self.screen: Screen | None = None  # set by the sidecar when its contract enforces (QualityGate.screen)

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not counting those being computed)."""
        return len(self._queue)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.create_task(self._work(), name="sidecar-batcher")

    def submit(self, inputs: Tensors, rows: int, timing: BatchTiming | None = None) -> asyncio.Future:
        """Queue one request; the returned future resolves to its outputs. Raises ``Unavailable``.
        ``timing``, when given, holds the request's queue wait, batch size and compute time by then."""
        if self._closing or self._loop is None:
            raise Unavailable("the sidecar is shutting down")
        if len(self._queue) >= self.max_queue:
            raise Unavailable(f"the request queue is full ({self.max_queue} waiting)")
        future = self._loop.create_future()
        key = merge_key(inputs) if self.max_batch_size > 1 else ()
        pending = Pending(inputs, rows, key, future)
        if timing is not None:
            pending.timing = timing
        lone_s = self.lone_s  # None until one lone run was measured in the executor
        if rows == 1 and self._inflight == 0 and not self._queue and lone_s is not None and lone_s < self.inline_max_s:
            self._run_inline(pending)
            return future
        self._queue.append(pending)
        self._queued_rows += rows
        # Wake the worker only when it can act: the model is idle (greedy; with a delay, only the
        # first arrival starts the clock) or a full batch is waiting.
        if self._queued_rows >= self.max_batch_size or (
            self._inflight == 0 and (self.max_delay_s == 0 or len(self._queue) == 1)
        ):
            self._wake()
        return future

    async def close(self) -> None:
        """Refuse new requests, finish every queued and running one, stop the worker."""
        self._closing = True
        self._wake()
        if self._worker is not None:
            await self._worker

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _sleep_until_woken(self, timeout: float | None = None) -> None:
        loop = self._loop
        self._wakeup = wakeup = loop.create_future()  # type: ignore[union-attr]
        timer = None if timeout is None else loop.call_later(timeout, self._wake)  # type: ignore[union-attr]
        try:
            await wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    async def _work(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                if self._closing and self._inflight == 0:
                    return
                await self._sleep_until_woken()
                continue
            if self._inflight:
                # Busy: only a full batch may go ahead, and only up to max_inflight.
                if self._inflight >= self.max_inflight or self._queued_rows < self.max_batch_size:
                    await self._sleep_until_woken()
                    continue
            elif self.max_delay_s > 0 and not self._closing and self._queued_rows < self.max_batch_size:
                remaining = queue[0].enqueued + self.max_delay_s - time.perf_counter()
                if remaining > 0:
                    await self._sleep_until_woken(remaining)
                    continue
            self._dispatch(take_batch(queue, self.max_batch_size))
            if self._executor is None:
                # The batch ran on the loop: yield twice, so its answers' callbacks and what they
                # scheduled (the executor process's corked writes) go out, and sockets are read,
                # before the next batch computes.
                await asyncio.sleep(0)
                await asyncio.sleep(0)

    def _dispatch(self, batch: list[Pending]) -> None:
        rows = [p.rows for p in batch]
        self._queued_rows -= sum(rows)
        started = time.perf_counter()
        try:
            merged = merge([p.inputs for p in batch])
            if self.screen is not None:
                refused = self.screen(merged, rows)
                if refused is not None:
                    batch = _refuse(batch, refused)
                    if not batch:
                        return
                    rows = [p.rows for p in batch]
                    merged = merge([p.inputs for p in batch])
        except Exception as exc:  # fail closed: nobody in a batch that could not be merged or screened runs
            self._fail(batch, exc)
            return
        self._inflight += 1
        self._batches += 1
        number = self._batches
        if self._executor is None:  # on the loop's thread: no hand-over, no GIL ping-pong
            done = self._loop.create_future()  # type: ignore[union-attr]
            try:
                done.set_result(_timed(self._run, merged))
            except Exception as exc:
                done.set_exception(exc)
            self._finish(batch, rows, started, done, number)
            return
        done = self._loop.run_in_executor(self._executor, _timed, self._run, merged)  # type: ignore[union-attr]
        done.add_done_callback(lambda f: self._finish(batch, rows, started, f, number))

    def _run_inline(self, pending: Pending) -> None:
        """The lone-request path: compute now, on the loop; the caller's future is done on return."""
        started = time.perf_counter()
        try:
            verdict = self.screen(pending.inputs, [pending.rows]) if self.screen is not None else None
            if verdict is not None and not _refuse([pending], verdict):
                return
            outputs, compute_s = _timed(self._run, pending.inputs)
        except Exception as exc:  # the caller gets it, as from the executor
            pending.future.set_exception(exc)
            return
        self._note_lone([1], compute_s)
        self._observer.on_batch(pending.rows, 1, compute_s, [started - pending.enqueued])
        self._batches += 1
        _stamp(pending, started, compute_s, pending.rows, 1, self._batches)
        pending.future.set_result(outputs)

    def _note_lone(self, rows: list[int], compute_s: float) -> None:
        if rows == [1]:
            self.lone_s = compute_s if self.lone_s is None else self.lone_s + _LONE_EWMA * (compute_s - self.lone_s)

    def _finish(
        self, batch: list[Pending], rows: list[int], started: float, done: asyncio.Future, number: int = 0
    ) -> None:
        self._inflight -= 1
        try:
            outputs, compute_s = done.result()
            self._note_lone(rows, compute_s)
            self._observer.on_batch(sum(rows), len(batch), compute_s, [started - p.enqueued for p in batch])
            parts = split(outputs, rows)
        except asyncio.CancelledError:
            self._fail(batch, Unavailable("the sidecar stopped before this request ran"))
        except Exception as exc:  # each caller gets the failure; the worker lives on
            self._fail(batch, exc)
        else:
            for p, part in zip(batch, parts, strict=True):
                _stamp(p, started, compute_s, sum(rows), len(batch), number)
                if not p.future.done():
                    p.future.set_result(part)
        self._wake()

    @staticmethod
    def _fail(batch: list[Pending], exc: BaseException) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)
