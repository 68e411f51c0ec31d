"""Rate-limited logging for warnings that repeat once per request while something stays broken.

A sidecar whose Redis is down used to write one WARNING per request (1 334 lines in 10 s, issue
17.6), drowning every other line. `Throttle` logs the first occurrence of a kind of message at
once, then at most one line per ``every_s`` seconds for that kind, saying how many were held back;
`Throttle.resolved` logs the tally still held back when the condition ends (so the last counts are
never lost) and re-arms the kind, so the next failure is logged at once again.

The kind (``key``) defaults to the message template, so ``"sink failed: %s"`` with different
exception texts is one kind. Thread-safe; the hot path is one lock and one clock read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: default seconds between two lines of one kind
EVERY_S = 30.0


@dataclass(slots=True)
class _Kind:
    last: float  # when a line of this kind was last written
    held: int = 0  # occurrences not written since then


class Throttle:
    """First occurrence at once, then one line per ``every_s`` with the count held back in between."""

    def __init__(
        self, logger: logging.Logger, every_s: float = EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, *args: object, key: str | None = None) -> bool:
        """Log ``msg % args`` unless a line of this kind was written less than ``every_s`` ago.

        Returns whether a line was written. A written line after held-back ones ends with
        ``(N more like this in the last S s)``.
        """
        now = self.clock()
        kind_key = msg if key is None else key
        with self._lock:
            kind = self._kinds.get(kind_key)
            if kind is None:
                self._kinds[kind_key] = _Kind(now)
                held = 0
            elif now - kind.last < self.every_s:
                kind.held += 1
                return False
            else:
                held, since = kind.held, now - kind.last
                kind.last, kind.held = now, 0
        if held:
            self.logger.log(level, msg + " (%d more like this in the last %.0f s)", *args, held, since)
        else:
            self.logger.log(level, msg, *args)
        return True

    def warning(self, msg: str, *args: object, key: str | None = None) -> bool:
        return self.log(logging.WARNING, msg, *args, key=key)

    def error(self, msg: str, *args: object, key: str | None = None) -> bool:
        return self.log(logging.ERROR, msg, *args, key=key)

    def resolved(self, key: str, msg: str, *args: object, level: int = logging.INFO) -> bool:
        """The condition of kind ``key`` ended: log ``msg`` with the tally held back (if the kind was
        seen at all) and re-arm it. Returns whether a line was written."""
        with self._lock:
            kind = self._kinds.pop(key, None)
        if kind is None:
            return False
        if kind.held:
            self.logger.log(level, msg + " (%d more warnings held back before this)", *args, kind.held)
        else:
            self.logger.log(level, msg, *args)
        return True

    def held(self, key: str) -> int:
        """Occurrences of kind ``key`` not yet written (for tests and status)."""
        with self._lock:
            kind = self._kinds.get(key)
            return 0 if kind is None else kind.held
