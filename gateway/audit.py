"""The audit trail: one JSON line per decision, written off the event loop.

The request path appends a tuple to a bounded deque (~0.1 µs, no lock, no syscall); a daemon
thread wakes a few times a second, formats the pending tuples with orjson and writes them in one
call. When the deque is full the entry is dropped and counted, because an audit log that blocks
the data plane is an outage. A line records who (the SPIFFE ID and the token's ``sub``, hashed with
the same secret salt as the cohort unit), what (route, variant, region, shadows) and the verdict
(outcome, reason, status) with the request id -- never the payload, the token or a raw user id.
An allowed line also names the model the chosen backend serves (``model_digest``, from the compiled
policy: a pinned reference's digest, a local file's sha256) so an investigation can replay exactly that
artifact; Envoy's access log carries the digest that actually answered (docs/models.md, Provenance).

A file trail is rotated by `RotatingFile` (issue 17.5: it grew ~8 MB/min at 520 req/s): by size
and by age, keeping ``backups`` old files (``PATH.1`` newest ... ``PATH.N``). Rotation happens in
the writer thread between two batch writes, so it never blocks the request path (which only
appends to the deque) and never splits or loses a line. Why not ``logging.handlers`` (QueueHandler
+ RotatingFileHandler): a ``LogRecord`` per line on the request path costs ~10x the deque append
(measured with timeit, see tests/gateway/test_audit_rotation.py). ``-`` writes to standard output
for a log shipper, unrotated. ``log_format="ecs"`` writes the same records as Elastic Common Schema
documents (`cohortgate.support.logs.audit_to_ecs`: ``@timestamp``, ``event.*``, ``service.*``,
``user.id`` = the hashed subject, ``trace.id`` when the request carried a W3C trace).
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NamedTuple

import orjson

from cohortgate.support.logs import audit_to_ecs

log = logging.getLogger("cohortgate.audit")


class AuditEntry(NamedTuple):
    """One decision as the processor records it. Built with ``tuple.__new__(AuditEntry, values)`` on the
    request path (0.15 µs; the NamedTuple's own ``__new__`` is a Python call, 0.5 µs)."""

    time: float
    request_id: str
    identity: str | None
    subject: Any  # the JWT's sub; hashed when written, never stored raw
    route: str | None
    variant: str | None
    region: str | None
    outcome: str  # allow | deny | error
    reason: str  # the assignment (bucket, override, +fallback) or the denial code
    status: int
    shadows: tuple[str, ...]
    trace_id: str | None = None  # the request's W3C trace id, when tracing is on
    # ``sha256:<hex>`` of the model the chosen backend is meant to serve (`cohortgate.core.policy.routed_digest`);
    # None on denials and where the policy cannot know it. Envoy's access log carries the served one.
    model_digest: str | None = None


TRACE_FIELD = "trace_id"
MODEL_DIGEST_FIELD = "model_digest"
#: fields a line has only when set (tracing on; an allowed request to a backend with a known model)
OPTIONAL_FIELDS = (TRACE_FIELD, MODEL_DIGEST_FIELD)
#: the fields every line has
FIELDS = tuple(f for f in AuditEntry._fields if f not in OPTIONAL_FIELDS)
#: ``log_format`` choices: cohortgate's own flat lines, or ECS documents
AUDIT_FORMATS = ("json", "ecs")


#: subjects whose hash the writer keeps (cleared when full: a bounded cache)
_SUBJECTS_LIMIT = 65_536
#: encoded (route, variant, region, outcome, reason, status, shadows) parts the writer keeps
_MIDDLES_LIMIT = 4096
_dumps = orjson.dumps
#: ``mmmZ"`` for each millisecond: a line's time ends with one lookup
_MILLIS = tuple(b'%03dZ"' % ms for ms in range(1000))
#: the identity and subject types the line cache keys on (a bool, int or float would meet its equal of another type)
_PLAIN = frozenset({str, type(None)})

#: defaults of a file trail: at most (1 + AUDIT_BACKUPS) x AUDIT_MAX_BYTES on disk
AUDIT_MAX_BYTES = 64 * 1024 * 1024
AUDIT_BACKUPS = 8
AUDIT_MAX_AGE_S = 24 * 3600.0


class RotatingFile:
    """An append-only file (0600) that the one writer thread rotates by size and age.

    ``write`` rotates first when the file would grow past ``max_bytes`` or is older than
    ``max_age_s``; lines are never split (a line longer than ``max_bytes`` gets a file of its
    own). Not thread-safe: one writer.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int | None = AUDIT_MAX_BYTES,
        backups: int = AUDIT_BACKUPS,
        max_age_s: float | None = AUDIT_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if backups < 0 or (max_bytes is not None and max_bytes <= 0) or (max_age_s is not None and max_age_s <= 0):
            raise ValueError("backups must be >= 0, max_bytes and max_age_s positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.max_age_s = max_age_s
        self.clock = clock
        self.rotations = 0
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")
        self._size = os.fstat(fd).st_size
        self._opened = self.clock()

    def _due(self, n: int) -> bool:
        if self._size == 0:
            return False
        if self.max_bytes is not None and self._size + n > self.max_bytes:
            return True
        return self.max_age_s is not None and self.clock() - self._opened >= self.max_age_s

    def rotate(self) -> None:
        """``PATH`` -> ``PATH.1`` -> ... -> ``PATH.N`` (the oldest beyond ``backups`` is removed)."""
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            Path(f"{self.path}.{self.backups}").unlink(missing_ok=True)
            top = 1  # backups are contiguous (.1 .. .k): shift only those that exist
            while top < self.backups and Path(f"{self.path}.{top}").exists():
                top += 1
            for i in range(top - 1, 0, -1):
                Path(f"{self.path}.{i}").replace(f"{self.path}.{i + 1}")
            self.path.replace(f"{self.path}.1")
        self.rotations += 1
        self._open()

    def write(self, data: bytes) -> int:
        """Append whole lines; a batch bigger than the room left is split at line ends across files."""
        written = 0
        while data:
            if self._due(len(data)):
                self.rotate()
            room = len(data) if self.max_bytes is None else self.max_bytes - self._size
            if len(data) <= room:
                cut = len(data)
            else:
                cut = data.rfind(b"\n", 0, max(room, 0)) + 1
                if cut == 0:  # not one whole line fits: a fresh file takes the next line whole
                    cut = (data.find(b"\n") + 1 or len(data)) if self._size == 0 else 0
                if cut == 0:
                    self.rotate()
                    continue
            n = self._file.write(data[:cut])
            self._size += n
            written += n
            data = data[cut:]
        return written

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class AuditLog:
    """A non-blocking JSON-lines writer. ``record`` is safe to call from the event loop."""

    def __init__(
        self,
        stream: IO[bytes] | RotatingFile,
        subject_hash: Callable[[str], str],
        *,
        max_pending: int = 65_536,
        flush_interval_s: float = 0.2,
        close_stream: bool = False,
        log_format: str = "json",
    ) -> None:
        if max_pending <= 0 or flush_interval_s <= 0:
            raise ValueError("max_pending and flush_interval_s must be positive")
        if log_format not in AUDIT_FORMATS:
            raise ValueError(f"audit format {log_format!r}: use one of {', '.join(AUDIT_FORMATS)}")
        self._ecs = log_format == "ecs"
        self._stream = stream
        self._hash = subject_hash
        # writer-thread only: each subject's hash (an HMAC, ~5 us) and the current second's timestamp
        # prefix (~4 us of isoformat), so a line costs its dict and orjson; the cache is cleared when full
        self._subjects: dict[str, str] = {}
        self._second: tuple[tuple[int, ...], str] = ((), "")
        self._middles: dict[tuple[Any, ...], bytes] = {}  # route .. shadows, encoded: policy names only
        self._people: dict[tuple[Any, ...], bytes] = {}  # (identity, subject) -> their two fields, encoded
        self._second_bytes: tuple[float, bytes] = (-1.0, b"")  # the whole second and its encoded prefix
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
    def open(
        cls,
        target: str,
        subject_hash: Callable[[str], str],
        *,
        max_bytes: int | None = AUDIT_MAX_BYTES,
        backups: int = AUDIT_BACKUPS,
        max_age_s: float | None = AUDIT_MAX_AGE_S,
        **kwargs: Any,
    ) -> AuditLog:
        """``-`` for standard output (a log shipper rotates), else a `RotatingFile` (0600 when created)."""
        if target == "-":
            return cls(sys.stdout.buffer, subject_hash, **kwargs)
        stream = RotatingFile(target, max_bytes=max_bytes, backups=backups, max_age_s=max_age_s)
        return cls(stream, subject_hash, close_stream=True, **kwargs)

    def record(self, entry: AuditEntry) -> None:
        """Queue one decision; drop and count it if the queue is full."""
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
        """One line: `_record`'s JSON, byte for byte; the flat format joins encoded parts instead of
        building a dict, and the fields from route to shadows (names from the policy, a code, a
        status) come from a small cache, a third of the cost of ``orjson.dumps(record)``. The identity
        and hashed subject come encoded from a bounded cache too, and the time from the second's
        encoded prefix and a table of milliseconds (`_time_parts`): ~1.5 µs a line, from ~2.5 µs."""
        if self._ecs or len(entry) < 11:
            return self._record_line(entry)
        try:
            middle = self._middles.get(entry[4:11])
        except TypeError:  # an unhashable field: the general path
            return self._record_line(entry)
        if middle is None:
            if len(self._middles) >= _MIDDLES_LIMIT:
                self._middles.clear()
            route, variant, region, outcome, reason, status, shadows = entry[4:11]
            middle = self._middles[entry[4:11]] = b"".join(
                (
                    b',"route":',
                    _dumps(route),
                    b',"variant":',
                    _dumps(variant),
                    b',"region":',
                    _dumps(region),
                    b',"outcome":',
                    _dumps(outcome),
                    b',"reason":',
                    _dumps(reason),
                    b',"status":',
                    _dumps(status),
                    b',"shadows":',
                    _dumps(list(shadows)),
                )
            )
        identity, subject = who = entry[2:4]
        # Only str and None are keys: 1 == True == 1.0 would hand one of them the other's text.
        plain = type(identity) in _PLAIN and type(subject) in _PLAIN
        people = self._people.get(who) if plain else None
        if people is None:
            people = b"".join((b',"identity":', _dumps(identity), b',"subject":', _dumps(self._subject(subject))))
            if plain:
                if len(self._people) >= _SUBJECTS_LIMIT:
                    self._people.clear()
                self._people[who] = people
        parts = [b'{"time":"', *self._time_parts(entry[0]), b',"request_id":', _dumps(entry[1]), people, middle]
        if len(entry) > 11 and entry[11] is not None:
            parts += (b',"trace_id":', _dumps(entry[11]))
        if len(entry) > 12 and entry[12] is not None:
            parts += (b',"model_digest":', _dumps(entry[12]))
        parts.append(b"}\n")
        return b"".join(parts)

    def _subject(self, subject: Any) -> str | None:
        """The subject's keyed hash (cached: an HMAC per line was a third of the line's cost)."""
        if subject is None:
            return None
        subject = str(subject)
        hashed = self._subjects.get(subject)
        if hashed is None:
            if len(self._subjects) >= _SUBJECTS_LIMIT:
                self._subjects.clear()
            hashed = self._subjects[subject] = self._hash(subject)
        return hashed

    def _record_line(self, entry: tuple[Any, ...]) -> bytes:
        record = dict(zip(AuditEntry._fields, entry, strict=False))
        for name in OPTIONAL_FIELDS:
            if record.get(name) is None:
                record.pop(name, None)
        record["time"] = self._timestamp(entry[0])
        record["subject"] = self._subject(record["subject"])
        record["shadows"] = list(record["shadows"])
        if self._ecs:
            return orjson.dumps(audit_to_ecs(record), option=orjson.OPT_APPEND_NEWLINE)
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)

    def _time_parts(self, t: float) -> tuple[bytes, bytes]:
        """``_timestamp(t)`` encoded with its closing quote, as (the second's prefix, ``mmm"Z"``): the
        microseconds rounded as ``datetime.fromtimestamp`` rounds them (half to even, of the fraction),
        the prefix made by `_timestamp` once a second, so the text is the same byte for byte."""
        if not t >= 0:  # negative, NaN: datetime's own path
            return self._timestamp(t).encode(), b'"'
        frac, whole = math.modf(t)
        us = round(frac * 1e6)
        if us >= 1_000_000:
            whole += 1.0
            us -= 1_000_000
        cached, prefix = self._second_bytes
        if whole != cached:
            prefix = self._timestamp(whole)[:-4].encode()  # ``YYYY-MM-DDTHH:MM:SS.``
            self._second_bytes = (whole, prefix)
        return prefix, _MILLIS[us // 1000]

    def _timestamp(self, t: float) -> str:
        """``datetime.isoformat(timespec="milliseconds")`` in UTC with a ``Z``, its seconds part cached."""
        d = dt.datetime.fromtimestamp(t, dt.UTC)
        key = (d.second, d.minute, d.hour, d.day, d.month, d.year)
        cached_key, prefix = self._second
        if key != cached_key:
            prefix = f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}."
            self._second = (key, prefix)
        return f"{prefix}{d.microsecond // 1000:03d}Z"
