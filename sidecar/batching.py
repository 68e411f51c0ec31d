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

from .errors import InferenceFailed, Unavailable

Tensors = tuple[np.ndarray, ...]


@dataclass(slots=True)
class Pending:
    """One queued request: its inputs, its rows, its merge key and the future its caller awaits."""

    inputs: Tensors
    rows: int
    key: tuple
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


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


class Batcher:
    """Queue requests, run them in batches in ``executor``, resolve each caller's future.

    Create it anywhere; ``start()`` must run inside the event loop that will use it (the queue's
    wake-up futures belong to that loop).
    """

    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        *,
        max_batch_size: int = 1,
        max_delay_s: float = 0.0,
        max_queue: int = 1024,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_delay_s >= 0")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._observer = observer or _NullObserver()
        self._queue: deque[Pending] = deque()
        self._queued_rows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Future | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not counting the one being computed)."""
        return len(self._queue)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.create_task(self._work(), name="sidecar-batcher")

    def submit(self, inputs: Tensors, rows: int) -> asyncio.Future:
        """Queue one request; the returned future resolves to its outputs. Raises ``Unavailable``."""
        if self._closing or self._loop is None:
            raise Unavailable("the sidecar is shutting down")
        if len(self._queue) >= self.max_queue:
            raise Unavailable(f"the request queue is full ({self.max_queue} waiting)")
        future = self._loop.create_future()
        key = merge_key(inputs) if self.max_batch_size > 1 else ()
        self._queue.append(Pending(inputs, rows, key, future))
        self._queued_rows += rows
        # Greedy: wake an idle worker at once. With a delay: only when the queue was empty (the
        # worker sleeps untimed) or a full batch is waiting.
        if self.max_delay_s == 0 or len(self._queue) == 1 or self._queued_rows >= self.max_batch_size:
            self._wake()
        return future

    async def close(self) -> None:
        """Refuse new requests, finish every queued one, stop the worker."""
        self._closing = True
        self._wake()
        if self._worker is not None:
            await self._worker

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _sleep_until_woken(self, timeout: float | None) -> None:
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
        loop = self._loop
        queue = self._queue
        while True:
            if not queue:
                if self._closing:
                    return
                await self._sleep_until_woken(None)
                continue
            if self.max_delay_s > 0 and not self._closing and self._queued_rows < self.max_batch_size:
                remaining = queue[0].enqueued + self.max_delay_s - time.perf_counter()
                if remaining > 0:
                    await self._sleep_until_woken(remaining)
                    continue
            batch = take_batch(queue, self.max_batch_size)
            rows = [p.rows for p in batch]
            self._queued_rows -= sum(rows)
            started = time.perf_counter()
            waits = [started - p.enqueued for p in batch]
            try:
                merged = merge([p.inputs for p in batch])
                outputs = await loop.run_in_executor(self._executor, self._run, merged)  # type: ignore[union-attr]
                parts = split(outputs, rows)
            except Exception as exc:  # each caller gets the failure; the worker lives on
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self._observer.on_batch(sum(rows), len(batch), time.perf_counter() - started, waits)
            for p, part in zip(batch, parts, strict=True):
                if not p.future.done():
                    p.future.set_result(part)
