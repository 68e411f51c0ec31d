"""The pieces of ``sidecar --workers`` without processes: the arena's allocator, frames, tensor
packing, the shared batch stats, and the link on a socket pair (a front's end against a fake executor)."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.arena import ALIGN, Arena, SharedStats, aligned, attach
from sidecar.batching import Batcher, BatchTiming
from sidecar.errors import InferenceFailed, Unavailable
from sidecar.link import (
    FAILED,
    OK,
    FrameReader,
    RemoteBatcher,
    frame,
    output_layout,
    pack_tensor,
    unpack_tensor,
)
from sidecar.metrics import SidecarMetrics
from sidecar.protocol import Signature, TensorSpec

# The allocator ----------------------------------------------------------------------------------


def test_alloc_free_reuses_and_merges() -> None:
    arena = Arena(16 * ALIGN)
    try:
        a = arena.alloc(1)
        b = arena.alloc(ALIGN + 1)  # two cache lines
        c = arena.alloc(ALIGN)
        assert (a, b, c) == (0, ALIGN, 3 * ALIGN)
        assert arena.alloc(13 * ALIGN) == -1  # 12 lines left
        arena.free(b, ALIGN + 1)
        assert arena.alloc(2 * ALIGN) == ALIGN  # the hole is reused
        arena.free(ALIGN, 2 * ALIGN)
        arena.free(a, 1)
        arena.free(c, ALIGN)
        assert arena.used == 0
        assert arena.alloc(16 * ALIGN) == 0  # the free slots merged back into one
    finally:
        arena.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5 * ALIGN)), max_size=60), st.randoms())
def test_slots_never_overlap_and_everything_comes_back(ops: list[tuple[bool, int]], rnd: random.Random) -> None:
    """Any sequence of allocs and frees: live slots are disjoint, inside the arena, and freeing them
    all leaves one free slot the size of the arena."""
    size = 32 * ALIGN
    arena = Arena(size)
    live: list[tuple[int, int]] = []
    try:
        for do_alloc, n in ops:
            if do_alloc or not live:
                offset = arena.alloc(n)
                if offset >= 0:
                    assert offset % ALIGN == 0 and offset + aligned(n) <= size
                    for other, m in live:
                        assert offset + aligned(n) <= other or other + aligned(m) <= offset
                    live.append((offset, n))
            else:
                arena.free(*live.pop(rnd.randrange(len(live))))
        for slot in live:
            arena.free(*slot)
        assert arena.used == 0
        assert arena.alloc(size) == 0
    finally:
        arena.close()


# Frames and tensors ---------------------------------------------------------------------------


def test_frames_survive_any_cut_of_the_stream() -> None:
    messages = [(1, 3, (("<f4", (3, 2), 0, None),), 64, 128, False), (2, 1, "x" * 300, None, b"\0\1")]
    stream = b"".join(frame(m) for m in messages)
    for cut in range(len(stream) + 1):
        reader = FrameReader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == messages


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<i8", "|b1", "<f2", "|u1"])
def test_tensors_travel_through_the_arena_or_inline(dtype: str) -> None:
    a = (np.arange(24) % 7).astype(dtype).reshape(4, 3, 2)
    view = np.zeros(4096, np.uint8)
    spec = pack_tensor(a[::1], view, 128)
    assert spec[2] == 128 and spec[3] is None
    back = unpack_tensor(spec, view, copy=True)
    assert back.dtype == a.dtype and np.array_equal(back, a)
    view[:] = 0  # a copy does not see the slot reused
    assert np.array_equal(back, a)
    inline = pack_tensor(a.T, None, 0)  # a non-contiguous one, inline
    assert inline[2] == -1
    assert np.array_equal(unpack_tensor(inline, view, copy=False), a.T)


def test_output_layout_reserves_rows_and_alignment() -> None:
    fixed_rows = Signature(
        "m",
        (TensorSpec("x", "FP32", (-1, 4)),),
        (TensorSpec("label", "INT64", (-1,)), TensorSpec("p", "FP32", (-1, 2))),
    )
    fixed, per_row = output_layout(fixed_rows)
    assert per_row == 8 + 8
    assert fixed == 2 * ALIGN
    free_width = Signature("m", (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, -1)),))
    assert output_layout(free_width) is None  # comes back inline


# Shared stats ---------------------------------------------------------------------------------


def test_stats_written_by_one_process_are_read_by_another_mapping() -> None:
    stats, fd = SharedStats.create()
    try:
        reader = SharedStats(attach(fd, writable=False))
        stats.on_batch(rows=5, requests=2, compute_s=0.002, waits_s=[0.001, 0.0001])
        stats.cells[SharedStats.DEPTH] = 3
        assert reader.depth == 3
        family = reader.batch_rows.family("b", "doc", "m")
        buckets = {s.labels.get("le"): s.value for s in family.samples if s.name == "b_bucket"}
        assert buckets["4.0"] == 0 and buckets["8.0"] == 1 and buckets["+Inf"] == 1
        assert [s.value for s in family.samples if s.name == "b_sum"] == [5.0]
        waits = reader.queue_seconds.family("q", "doc", "m")
        assert [s.value for s in waits.samples if s.name == "q_count"] == [2.0]
    finally:
        os.close(fd)


# The front's end against a fake executor ------------------------------------------------------


def _signature() -> Signature:
    return Signature("m", (TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("y", "FP32", (-1, 3)),))


async def _fake_executor(sock: socket.socket, arena: np.ndarray, answer) -> None:
    """Reads request frames; ``answer(message, inputs)`` returns the reply tuple (or None: stay silent)."""
    loop = asyncio.get_running_loop()
    reader = FrameReader()
    while data := await loop.sock_recv(sock, 1 << 16):
        for message in reader.feed(data):
            inputs = [unpack_tensor(spec, arena, copy=False) for spec in message[2]]
            reply = answer(message, inputs)
            if reply is not None:
                await loop.sock_sendall(sock, frame(reply))


async def _front(answer):
    front_sock, exec_sock = socket.socketpair()
    for s in (front_sock, exec_sock):
        s.setblocking(False)
    arena = Arena(64 * ALIGN)
    stats, stats_fd = SharedStats.create()
    metrics = SidecarMetrics("m")
    sidecar = SimpleNamespace(ready=True, metrics=metrics)
    batcher = RemoteBatcher("unused", _signature(), front_sock, stats, arena, sidecar=sidecar, max_batch_size=8)
    batcher.start()
    view = np.frombuffer(attach(os.dup(arena.fd)), np.uint8)  # the executor's own mapping
    task = asyncio.ensure_future(_fake_executor(exec_sock, view, answer))
    return batcher, sidecar, exec_sock, task, stats_fd


async def test_answers_come_back_through_the_slot_and_errors_keep_their_class() -> None:
    def answer(message, inputs):
        rid, rows, _, out_offset, out_size, want_timing = message
        (x,) = inputs
        if x[0, 0] < 0:
            return (rid, FAILED, "InferenceFailed", "onnxruntime failed: negative", 0)
        if x[0, 0] > 100:
            return (rid, FAILED, "Unavailable", "the request queue is full (1 waiting)", 1)
        y = x * 2
        target = arena_view if out_size >= y.nbytes else None
        spec = pack_tensor(y, target, out_offset)
        return (rid, OK, (spec,), (0.001, 0.002, rows, 1, 7) if want_timing else None)

    batcher, _, exec_sock, task, stats_fd = await _front(answer)
    arena_view = np.frombuffer(attach(os.dup(batcher.arena.fd)), np.uint8)
    try:
        timing = BatchTiming()
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        (y,) = await batcher.submit((x,), 2, timing)
        assert np.array_equal(y, x * 2)
        assert (timing.batch_rows, timing.batch) == (2, 7)
        assert batcher.arena.used == 0  # the slot was freed when the answer was copied out
        with pytest.raises(InferenceFailed, match="negative"):
            await batcher.submit((-(x + 1),), 2)
        with pytest.raises(Unavailable, match="queue is full"):
            await batcher.submit((x + 1000,), 2)
        many = await asyncio.gather(*(batcher.submit((x + i,), 2) for i in range(20)))
        assert all(np.array_equal(out[0], (x + i) * 2) for i, out in enumerate(many))
        assert batcher.arena.used == 0
    finally:
        task.cancel()
        exec_sock.close()
        await batcher.close()
        os.close(stats_fd)


async def test_a_lost_executor_fails_what_is_in_flight_with_503_and_unreadies() -> None:
    batcher, sidecar, exec_sock, task, stats_fd = await _front(lambda message, inputs: None)  # never answers
    try:
        x = np.ones((1, 3), np.float32)
        pending = [batcher.submit((x,), 1) for _ in range(3)]
        await asyncio.sleep(0.05)
        task.cancel()
        exec_sock.close()
        for future in pending:
            with pytest.raises(Unavailable, match="executor"):
                await future
        assert sidecar.ready is False and sidecar.metrics.ready is False
        assert batcher.arena.used == 0
        with pytest.raises(Unavailable):
            batcher.submit((x,), 1)
    finally:
        await batcher.close()
        os.close(stats_fd)


# The executor's batcher: batches on the loop's own thread ----------------------------------------


async def test_a_batcher_without_an_executor_runs_batches_on_the_loop() -> None:
    threads: list[int] = []

    def run(inputs):
        threads.append(threading.get_ident())
        if (inputs[0] < 0).any():
            raise InferenceFailed("onnxruntime failed: negative")
        return (inputs[0] * 2,)

    batcher = Batcher(run, None, max_batch_size=8)
    batcher.start()
    try:
        futures = [batcher.submit((np.full((1, 2), i, np.float32),), 1) for i in range(5)]
        outs = await asyncio.gather(*futures)
        assert [float(o[0][0, 0]) for o in outs] == [0, 2, 4, 6, 8]
        assert threads == [threading.get_ident()]  # one batch, on this thread
        bad = batcher.submit((np.full((1, 2), -1, np.float32),), 1)
        with pytest.raises(InferenceFailed):
            await bad
        (again,) = await batcher.submit((np.ones((1, 2), np.float32),), 1)  # it lives on
        assert float(again[0, 0]) == 2
    finally:
        await batcher.close()


async def test_a_full_arena_sends_the_tensors_inline_and_still_answers() -> None:
    def answer(message, inputs):
        rid, _, specs, _, out_size, _ = message
        seen.append((specs[0][2], out_size))
        return (rid, OK, (pack_tensor(inputs[0] + 1, None, 0),), None)

    seen: list[tuple[int, int]] = []
    batcher, _, exec_sock, task, stats_fd = await _front(answer)  # a 4 KiB arena
    try:
        small = np.zeros((2, 3), np.float32)
        big = np.zeros((400, 3), np.float32)  # 4.8 KB in, as much out: no slot fits it
        (a,) = await batcher.submit((small,), 2)
        (b,) = await batcher.submit((big,), 400)
        assert np.array_equal(a, small + 1) and np.array_equal(b, big + 1)
        assert seen[0][0] >= 0 and seen[0][1] > 0  # in the arena, with room for the outputs
        assert seen[1] == (-1, 0)  # inline, outputs inline too
        assert batcher.arena.used == 0
    finally:
        task.cancel()
        exec_sock.close()
        await batcher.close()
        os.close(stats_fd)
