"""The audit trail: one JSON line per decision, written off the event loop.

The request path appends a tuple to a bounded deque (~0.1 µs, no lock, no syscall); a daemon
thread wakes a few times a second, formats the pending tuples with orjson and writes them in one
call. When the deque is full the entry is dropped and counted, because an audit log that blocks
the data plane is an outage. A line records who (the SPIFFE ID and the token's ``sub``, hashed with
the same secret salt as the cohort unit), what (route, variant, region, shadows) and the verdict
(outcome, reason, status) with the request id -- never the payload, the token or a raw user id.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

import orjson

log = logging.getLogger("cohortgate.audit")

#: The tuple the processor records, in this order.
FIELDS = (
    "time",
    "request_id",
    "identity",
    "subject",
    "route",
    "variant",
    "region",
    "outcome",
    "reason",
    "status",
    "shadows",
)


class AuditLog:
    """A non-blocking JSON-lines writer. ``record`` is safe to call from the event loop."""

    def __init__(
        self,
        stream: IO[bytes],
        subject_hash: Callable[[str], str],
        *,
        max_pending: int = 65_536,
        flush_interval_s: float = 0.2,
        close_stream: bool = False,
    ) -> None:
        if max_pending <= 0 or flush_interval_s <= 0:
            raise ValueError("max_pending and flush_interval_s must be positive")
        self._stream = stream
        self._hash = subject_hash
        self._close_stream = close_stream
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._max = max_pending
        self._interval = flush_interval_s
        self._wake = threading.Event()
        self._stopped = False
        self.written = 0
        self.dropped = 0
        self.write_errors = 0
        self._thread = threading.Thread(target=self._run, name="cohortgate-audit", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, target: str, subject_hash: Callable[[str], str], **kwargs: Any) -> AuditLog:
        """``-`` for standard output, else a file opened for appending (0600 when created)."""
        if target == "-":
            return cls(sys.stdout.buffer, subject_hash, **kwargs)
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return cls(os.fdopen(fd, "ab"), subject_hash, close_stream=True, **kwargs)

    def record(self, entry: tuple[Any, ...]) -> None:
        """Queue one decision (a tuple in `FIELDS` order); drop and count it if the queue is full."""
        if len(self._pending) >= self._max:
            self.dropped += 1
            return
        self._pending.append(entry)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything recorded so far is written (tests, shutdown)."""
        done = threading.Event()
        self._pending.append(done)  # type: ignore[arg-type]  # a marker the writer sets
        self._wake.set()
        done.wait(timeout)

    def close(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5.0)
        if self._close_stream:
            self._stream.close()

    # ---- the writer thread

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            self._drain()
            if self._stopped:
                self._drain()
                return

    def _drain(self) -> None:
        pending = self._pending
        lines: list[bytes] = []
        markers: list[threading.Event] = []
        while pending:
            entry = pending.popleft()
            if isinstance(entry, threading.Event):
                markers.append(entry)
                continue
            try:
                lines.append(self._line(entry))
            except Exception:  # a malformed entry must not stop the trail
                log.exception("dropping an audit entry that cannot be formatted")
                self.dropped += 1
        if lines:
            try:
                self._stream.write(b"".join(lines))
                self._stream.flush()
                self.written += len(lines)
            except (OSError, ValueError) as exc:
                self.write_errors += 1
                log.warning("cannot write %d audit lines: %s", len(lines), exc)
        for marker in markers:
            marker.set()

    def _line(self, entry: tuple[Any, ...]) -> bytes:
        record = dict(zip(FIELDS, entry, strict=True))
        record["time"] = (
            dt.datetime.fromtimestamp(entry[0], dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
        subject = record["subject"]
        record["subject"] = self._hash(str(subject)) if subject is not None else None
        record["shadows"] = list(record["shadows"])
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
