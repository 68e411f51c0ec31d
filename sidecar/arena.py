"""Shared memory between the sidecar's processes (``--workers N``): tensor arenas and batch counters.

Both are anonymous memory files (``memfd_create``) whose descriptors travel over the executor's Unix
socket (SCM_RIGHTS) when a front connects, so nothing is ever named in ``/dev/shm``: a process that
dies, even by SIGKILL, leaks no segment, and no other user can open one by name.

* ``Arena``: one per front process, written by the front (inputs) and by the executor (outputs).
  A first-fit allocator over it lives in the front alone (one event loop, no lock); a slot belongs to
  one request from its submit until its answer has been copied out.
* ``SharedStats``: one per executor, written by the executor alone (batch histograms, queue depth,
  transport counts) and read by every front's ``/metrics``. Values are float64 (exact counts up to
  2**53); a scrape may see a histogram mid-update, as Prometheus' own multiprocess mode may.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np
from prometheus_client.core import HistogramMetricFamily

from sidecar.metrics import BATCH_BUCKETS, LATENCY_BUCKETS

ALIGN = 64  # every slot and every tensor in it starts on a cache line
ARENA_BYTES = 256 * 1024 * 1024  # virtual: pages are only backed once written (first fit keeps to the low end)


def aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def memfd(name: str, size: int) -> int:
    """A new anonymous shared-memory file of ``size`` bytes; the caller owns (and closes) the fd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach(fd: int, *, writable: bool = True) -> mmap.mmap:
    """Map a shared-memory file another process sent us; the fd can be closed afterwards."""
    size = os.fstat(fd).st_size
    return mmap.mmap(fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))


class Arena:
    """A front's tensor arena: ``alloc`` a slot, write into ``view``, ``free`` it when answered."""

    def __init__(self, size: int = ARENA_BYTES, name: str = "cohortgate-arena") -> None:
        self.size = size
        self.fd = memfd(name, size)
        self.map = mmap.mmap(self.fd, size)
        self.view = np.frombuffer(self.map, np.uint8)
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted, never adjacent
        self.used = 0

    def alloc(self, n: int) -> int:
        """The offset of a free slot of ``n`` bytes (rounded up to ``ALIGN``), or -1 when none is left."""
        n = aligned(max(n, 1))
        free = self._free
        for i, (offset, length) in enumerate(free):
            if length >= n:
                if length == n:
                    del free[i]
                else:
                    free[i] = (offset + n, length - n)
                self.used += n
                return offset
        return -1

    def free(self, offset: int, n: int) -> None:
        """Give back a slot ``alloc`` returned for ``n`` bytes; neighbouring free slots merge."""
        n = aligned(max(n, 1))
        free = self._free
        self.used -= n
        insort(free, (offset, n))
        i = bisect_left(free, (offset, n))
        if i + 1 < len(free) and offset + n == free[i + 1][0]:  # merge with the next
            free[i] = (offset, n + free[i + 1][1])
            del free[i + 1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == offset:  # and with the previous
            free[i - 1] = (free[i - 1][0], free[i - 1][1] + free[i][1])
            del free[i]

    def close(self) -> None:
        del self.view
        with contextlib.suppress(BufferError):  # a view is still alive somewhere: the mapping goes with it
            self.map.close()
        os.close(self.fd)


class SharedHistogram:
    """A histogram in a float64 slice: ``counts`` per bucket (the last is +Inf), then the sum.

    The executor observes, fronts render; the same bucket bounds as ``sidecar.metrics.Histogram``."""

    __slots__ = ("bounds", "cells")

    def __init__(self, bounds: Sequence[float], cells: np.ndarray) -> None:
        self.bounds = tuple(bounds)
        self.cells = cells

    @staticmethod
    def width(bounds: Sequence[float]) -> int:
        return len(bounds) + 2

    def observe(self, value: float) -> None:
        cells = self.cells
        cells[bisect_left(self.bounds, value)] += 1
        cells[-1] += value

    def family(self, name: str, doc: str, model: str) -> HistogramMetricFamily:
        values = self.cells.tolist()
        family = HistogramMetricFamily(name, doc, labels=["model"])
        cumulative = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), values[:-1], strict=True):
            cumulative += int(count)
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family.add_metric([model], buckets, values[-1])
        return family


class SharedStats:
    """The executor's batch metrics, in shared memory so that every front's ``/metrics`` shows them.

    Also a ``BatchObserver`` (``sidecar.batching``): the executor's batcher reports into it."""

    DEPTH, SHM, INLINE, CROSS = range(4)  # scalar cells: queue depth, requests by transport, shared batches
    _SCALARS = 4
    _HISTOGRAMS = (LATENCY_BUCKETS, LATENCY_BUCKETS, BATCH_BUCKETS, BATCH_BUCKETS)
    SIZE = 8 * (_SCALARS + sum(len(b) + 2 for b in _HISTOGRAMS))

    def __init__(self, buffer: mmap.mmap) -> None:
        self.map = buffer
        self.cells = np.frombuffer(buffer, np.float64, count=self.SIZE // 8)
        start = self._SCALARS
        hists = []
        for bounds in self._HISTOGRAMS:
            width = SharedHistogram.width(bounds)
            hists.append(SharedHistogram(bounds, self.cells[start : start + width]))
            start += width
        self.queue_seconds, self.compute_seconds, self.batch_rows, self.batch_requests = hists

    @classmethod
    def create(cls, name: str = "cohortgate-stats") -> tuple[SharedStats, int]:
        """New zeroed stats and the fd to send to fronts (the executor keeps it open)."""
        fd = memfd(name, cls.SIZE)
        return cls(mmap.mmap(fd, cls.SIZE)), fd

    @property
    def depth(self) -> int:
        return int(self.cells[self.DEPTH])

    def count(self, cell: int) -> int:
        return int(self.cells[cell])

    def on_batch(self, rows: int, requests: int, compute_s: float, waits_s: Sequence[float]) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.compute_seconds.observe(compute_s)
        observe = self.queue_seconds.observe
        for wait in waits_s:
            observe(wait)
