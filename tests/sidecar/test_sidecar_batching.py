"""Batching: the pure merge/split/take functions, then the asyncio Batcher around them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import batching
from sidecar.batching import Batcher, BatchTiming, Pending, merge, merge_key, split, take_batch
from sidecar.errors import InferenceFailed, Unavailable

# Pure functions ------------------------------------------------------------------------------


def pending(rows: int, width: int = 3, dtype=np.float32) -> Pending:
    inputs = (np.zeros((rows, width), dtype),)
    return Pending(inputs, rows, merge_key(inputs), future=None)  # type: ignore[arg-type]


def test_take_batch_fills_up_to_max_rows_in_order() -> None:
    queue = deque([pending(1), pending(2), pending(3), pending(1)])
    first = take_batch(queue, 4)
    assert [p.rows for p in first] == [1, 2]
    assert [p.rows for p in take_batch(queue, 4)] == [3, 1]
    assert not queue


def test_an_oversized_head_runs_alone() -> None:
    queue = deque([pending(10), pending(1)])
    assert [p.rows for p in take_batch(queue, 4)] == [10]
    assert [p.rows for p in take_batch(queue, 4)] == [1]


def test_requests_that_cannot_merge_run_in_their_own_batch() -> None:
    queue = deque([pending(1, 3), pending(1, 3), pending(1, 4), pending(1, 4), pending(1, 3, np.float64)])
    batches = []
    while queue:
        batches.append([(p.inputs[0].shape[1], p.inputs[0].dtype.name) for p in take_batch(queue, 64)])
    assert batches == [[(3, "float32")] * 2, [(4, "float32")] * 2, [(3, "float64")]]


row_counts = st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(counts=row_counts, width=st.integers(1, 4))
def test_split_undoes_merge(counts: list[int], width: int) -> None:
    parts = [
        (np.arange(n * width, dtype=np.float32).reshape(n, width) + i, np.full((n,), i, np.int64))
        for i, n in enumerate(counts)
    ]
    merged = merge(parts)
    assert merged[0].shape == (sum(counts), width)
    back = split(merged, counts)
    assert len(back) == len(parts)
    for got, want in zip(back, parts, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_split_refuses_outputs_without_a_batch_axis() -> None:
    with pytest.raises(InferenceFailed, match="returned 1 rows for a batch of 3 rows"):
        split((np.zeros((1, 3)),), [1, 2])
    with pytest.raises(InferenceFailed, match="returned a scalar"):
        split((np.float32(1.0) * np.ones(()),), [1])


# The Batcher ---------------------------------------------------------------------------------


class Model:
    """A stand-in model: doubles its input, records each batch, can be told to fail or block."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs):
        self.gate.wait(5)
        self.batches.append(inputs[0].shape[0])
        if self.fail:
            raise InferenceFailed("model exploded")
        return (inputs[0] * 2,)


class Observer:
    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []

    def on_batch(self, rows, requests, compute_s, waits_s) -> None:
        assert compute_s >= 0 and len(waits_s) == requests
        self.batches.append((rows, requests))


class WaitObserver:
    def __init__(self) -> None:
        self.waits: list[list[float]] = []

    def on_batch(self, rows, requests, compute_s, waits_s) -> None:
        self.waits.append(list(waits_s))


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def x(rows: int, start: float) -> tuple[np.ndarray]:
    return (np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + start,)


async def test_concurrent_requests_merge_and_each_gets_its_own_rows(executor) -> None:
    model, observer = Model(), Observer()
    batcher = Batcher(model, executor, max_batch_size=64, observer=observer)
    batcher.start()
    model.gate.clear()  # hold the first batch so the rest queue up behind it
    first = batcher.submit(x(1, 0), 1)
    await asyncio.sleep(0.01)
    inputs = [x(n, 100 * i) for i, n in enumerate([1, 2, 3, 1, 2], start=1)]
    futures = [batcher.submit(a, a[0].shape[0]) for a in inputs]
    assert batcher.depth == 5
    model.gate.set()
    await first
    results = await asyncio.gather(*futures)
    for a, got in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(got[0], a[0] * 2)
    assert model.batches == [1, 9]
    assert observer.batches == [(1, 1), (9, 5)]
    await batcher.close()


async def test_batching_off_runs_each_request_alone(executor) -> None:
    model = Model()
    batcher = Batcher(model, executor, max_batch_size=1)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit(x(1, i), 1) for i in range(5)))
    assert model.batches == [1] * 5
    assert [r[0][0, 0] for r in results] == [0, 2, 4, 6, 8]
    await batcher.close()


async def test_a_failed_batch_fails_every_request_in_it(executor) -> None:
    model = Model()
    batcher = Batcher(model, executor, max_batch_size=8)
    batcher.start()
    model.fail = True
    model.gate.clear()
    futures = [batcher.submit(x(1, i), 1) for i in range(3)]
    model.gate.set()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, InferenceFailed) and "model exploded" in str(r) for r in results)
    model.fail = False  # the worker survives a failed batch
    np.testing.assert_array_equal((await batcher.submit(x(1, 5), 1))[0], x(1, 5)[0] * 2)
    await batcher.close()


async def test_a_full_queue_answers_unavailable(executor) -> None:
    model = Model()
    batcher = Batcher(model, executor, max_batch_size=1, max_queue=2)
    batcher.start()
    model.gate.clear()
    running = batcher.submit(x(1, 0), 1)
    await asyncio.sleep(0.01)  # the worker took it; two more may wait
    waiting = [batcher.submit(x(1, 1), 1), batcher.submit(x(1, 2), 1)]
    await asyncio.sleep(0.01)
    queued = [batcher.submit(x(1, 3), 1)] if batcher.depth < 2 else []
    with pytest.raises(Unavailable, match="queue is full"):
        batcher.submit(x(1, 4), 1)
    model.gate.set()
    await asyncio.gather(running, *waiting, *queued)
    await batcher.close()


class FakeClock:
    """The batcher's clock, moved by the test: its decisions are then checked exactly, with no
    wall-clock bar (the worker's real timers only decide how soon it looks at this clock again)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(batching, "time", fake)
    real_pending = batching.Pending
    monkeypatch.setattr(
        batching, "Pending", lambda inputs, rows, key, future: real_pending(inputs, rows, key, future, fake.now)
    )
    return fake


#: Generous real-time bound for "this eventually happens" on a busy 2-core CI machine.
EVENTUALLY_S = 10.0


async def test_a_delay_counts_from_the_oldest_request(executor, clock: FakeClock) -> None:
    model, observer = Model(), WaitObserver()
    batcher = Batcher(model, executor, max_batch_size=64, max_delay_s=0.15, observer=observer)
    batcher.start()
    first = batcher.submit(x(1, 0), 1)  # enqueued at 0.00: the batch is due at 0.15
    clock.now = 0.05
    second = batcher.submit(x(1, 1), 1)  # would be due at 0.20 if the newest request counted
    clock.now = 0.149
    await asyncio.sleep(0.3)  # the worker's 0.15 s timer has had time to fire and look at the clock
    assert model.batches == [] and not first.done() and not second.done()
    clock.now = 0.15
    await asyncio.wait_for(asyncio.gather(first, second), EVENTUALLY_S)
    assert model.batches == [2]
    assert observer.waits == [[0.15, pytest.approx(0.10)]]  # dispatched at the oldest's deadline
    await batcher.close()


async def test_a_full_batch_does_not_wait_for_the_delay(executor, clock: FakeClock) -> None:
    model = Model()
    batcher = Batcher(model, executor, max_batch_size=4, max_delay_s=5.0)
    batcher.start()
    # The clock never moves: only being full can release this batch.
    await asyncio.wait_for(asyncio.gather(*(batcher.submit(x(1, i), 1) for i in range(4))), EVENTUALLY_S)
    assert model.batches == [4]
    await batcher.close()


async def test_close_finishes_queued_requests_then_refuses(executor) -> None:
    model = Model()
    batcher = Batcher(model, executor, max_batch_size=2, max_delay_s=10.0)
    batcher.start()
    futures = [batcher.submit(x(1, i), 1) for i in range(3)]  # one batch of 2 at once, one left waiting
    await batcher.close()  # does not wait 10 s: closing flushes the queue
    assert all(f.done() and not f.exception() for f in futures)
    with pytest.raises(Unavailable, match="shutting down"):
        batcher.submit(x(1, 9), 1)


async def test_large_requests_are_pipelined(executor) -> None:
    """A second full batch is handed to the executor while the first computes."""
    model = Model()
    batcher = Batcher(model, executor, max_batch_size=4, max_inflight=2)
    batcher.start()
    model.gate.clear()
    futures = [batcher.submit(x(8, i), 8) for i in range(3)]
    await asyncio.sleep(0.02)
    assert batcher.depth == 1  # two in flight (one computing, one handed over), one waiting
    model.gate.set()
    await asyncio.gather(*futures)
    assert model.batches == [8, 8, 8]
    await batcher.close()


def test_bad_settings_are_refused(executor) -> None:
    with pytest.raises(ValueError):
        Batcher(Model(), executor, max_batch_size=0)
    with pytest.raises(ValueError):
        Batcher(Model(), executor, max_delay_s=-1)


# The lone-request path -------------------------------------------------------------------------


class ThreadModel(Model):
    """Records the thread each batch ran on; ``slow_s`` makes every run take at least that long."""

    def __init__(self, slow_s: float = 0.0) -> None:
        super().__init__()
        self.threads: list[str] = []
        self.slow_s = slow_s

    def __call__(self, inputs):
        self.threads.append(threading.current_thread().name)
        if self.slow_s:
            time.sleep(self.slow_s)
        return super().__call__(inputs)


async def test_a_lone_one_row_request_of_a_fast_model_runs_on_the_loop(executor) -> None:
    """The first lone run is measured in the executor; once the model is known to be fast, a lone
    one-row request skips the thread hop: same answer, counted like any batch."""
    model, observer = ThreadModel(), Observer()
    batcher = Batcher(model, executor, max_batch_size=64, observer=observer)
    batcher.inline_max_s = 1.0  # opted in; "fast" for this test whatever the machine's load
    batcher.start()
    loop_thread = threading.current_thread().name
    first = await batcher.submit(x(1, 0), 1)
    assert model.threads[0] != loop_thread and batcher.lone_s is not None  # measured in the executor first
    timing = BatchTiming()
    second = batcher.submit(x(1, 10), 1, timing)
    assert second.done()  # computed before submit returned
    np.testing.assert_array_equal((await second)[0], x(1, 10)[0] * 2)
    assert model.threads[1] == loop_thread and (timing.batch_rows, timing.batch_requests) == (1, 1)
    assert observer.batches == [(1, 1), (1, 1)]
    np.testing.assert_array_equal(first[0], x(1, 0)[0] * 2)
    await batcher.close()


async def test_anything_but_a_lone_fast_one_row_request_keeps_the_loop_free(executor) -> None:
    loop_thread = threading.current_thread().name
    model = ThreadModel()
    batcher = Batcher(model, executor, max_batch_size=64)
    batcher.inline_max_s = 1.0
    batcher.start()
    await batcher.submit(x(1, 0), 1)  # now known to be fast
    model.gate.clear()
    busy = batcher.submit(x(3, 0), 3)  # three rows: to the executor, held there
    waiting = batcher.submit(x(1, 0), 1)  # one row, but the model is busy: it queues
    assert not busy.done() and not waiting.done()
    model.gate.set()
    await asyncio.gather(busy, waiting)
    assert loop_thread not in model.threads

    slow = ThreadModel(slow_s=0.01)  # slower than the limit, however quiet the machine
    slow_batcher = Batcher(slow, executor, max_batch_size=64, inline_max_s=0.001)
    slow_batcher.start()
    for i in range(3):
        await slow_batcher.submit(x(1, i), 1)
    assert slow_batcher.lone_s is not None and slow_batcher.lone_s > slow_batcher.inline_max_s
    assert loop_thread not in slow.threads  # a model slower than the hop never blocks the loop

    delayed = ThreadModel()
    delayed_batcher = Batcher(delayed, executor, max_batch_size=64, max_delay_s=0.001, inline_max_s=1.0)
    delayed_batcher.start()
    for i in range(3):
        await delayed_batcher.submit(x(1, i), 1)
    assert loop_thread not in delayed.threads  # with a batching delay, requests wait for company
    unmeasured = ThreadModel()
    generous = Batcher(unmeasured, executor, max_batch_size=64, inline_max_s=5.0)  # a limit over a second
    generous.start()
    await generous.submit(x(1, 0), 1)
    assert unmeasured.threads[0] != loop_thread  # the first lone run is measured in the executor, whatever the limit
    await generous.close()

    off = ThreadModel()
    off_batcher = Batcher(off, executor, max_batch_size=64)  # the default: off
    off_batcher.start()
    for i in range(3):
        await off_batcher.submit(x(1, i), 1)
    assert loop_thread not in off.threads
    for b in (batcher, slow_batcher, delayed_batcher, off_batcher):
        await b.close()


async def test_a_lone_request_that_fails_on_the_loop_fails_its_caller_only(executor) -> None:
    model = ThreadModel()
    batcher = Batcher(model, executor, max_batch_size=64)
    batcher.inline_max_s = 1.0
    batcher.start()
    await batcher.submit(x(1, 0), 1)
    model.fail = True
    with pytest.raises(InferenceFailed, match="model exploded"):
        await batcher.submit(x(1, 0), 1)
    model.fail = False
    np.testing.assert_array_equal((await batcher.submit(x(1, 5), 1))[0], x(1, 5)[0] * 2)
    await batcher.close()


class Screen:
    """An admission check: refuses any request holding a negative value, records each call's rows."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, merged, rows):
        self.calls.append(list(rows))
        if (merged[0] >= 0).all():
            return None
        out, start = [], 0
        for n in rows:
            bad = (merged[0][start : start + n] < 0).any()
            out.append(InferenceFailed(f"refused {start}") if bad else None)
            start += n
        return out


async def test_a_screen_refuses_only_its_requests_and_the_model_never_sees_them(executor) -> None:
    model, screen = Model(), Screen()
    batcher = Batcher(model, executor, max_batch_size=64)
    batcher.screen = screen
    batcher.start()
    model.gate.clear()  # hold the first batch so the rest queue up behind it
    first = batcher.submit(x(1, 0), 1)
    await asyncio.sleep(0.01)
    inputs = [x(2, 10), x(1, -100), x(3, 20), x(1, -200)]
    futures = [batcher.submit(a, a[0].shape[0]) for a in inputs]
    model.gate.set()
    await first
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert screen.calls == [[1], [2, 1, 3, 1]]  # one check per batch
    np.testing.assert_array_equal(results[0][0], inputs[0][0] * 2)
    np.testing.assert_array_equal(results[2][0], inputs[2][0] * 2)
    assert [str(r) for r in (results[1], results[3])] == ["refused 2", "refused 6"]
    assert model.batches == [1, 5]  # the refused rows never reached the model
    everyone_bad = batcher.submit(x(1, -5), 1)
    with pytest.raises(InferenceFailed, match="refused 0"):
        await everyone_bad
    assert model.batches == [1, 5]
    await batcher.close()


async def test_a_screen_that_fails_or_miscounts_fails_its_batch_closed(executor) -> None:
    model = Model()
    batcher = Batcher(model, executor, max_batch_size=64)
    batcher.screen = lambda merged, rows: [None]  # one answer for a batch of two
    batcher.start()
    model.gate.clear()
    first = batcher.submit(x(1, 0), 1)
    await asyncio.sleep(0.01)
    futures = [batcher.submit(x(1, i), 1) for i in (1, 2)]
    model.gate.set()
    await first  # one answer for one request: served
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, InferenceFailed) and "answered for 1 of 2" in str(r) for r in results)

    def broken(merged, rows):
        raise ValueError("screen bug")

    batcher.screen = broken
    with pytest.raises(ValueError, match="screen bug"):
        await batcher.submit(x(1, 3), 1)
    assert model.batches == [1]  # nothing ran unscreened
    await batcher.close()


async def test_the_lone_request_path_is_screened_too(executor) -> None:
    model = ThreadModel()
    batcher = Batcher(model, executor, max_batch_size=64)
    batcher.inline_max_s = 1.0
    batcher.screen = Screen()
    batcher.start()
    await batcher.submit(x(1, 0), 1)  # measured in the executor: now known to be fast
    refused = batcher.submit(x(1, -3), 1)
    assert refused.done()  # decided on the loop, inline
    with pytest.raises(InferenceFailed, match="refused 0"):
        await refused
    assert model.batches == [1]
    await batcher.close()
