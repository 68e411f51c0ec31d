"""A deterministic fault knob for demos and tests (``--fault-rate``): the rollback demo needs a
canary that fails a known fraction of requests.

Failures are spread evenly by a request counter, not drawn at random: after n requests exactly
``floor(n * rate)`` have failed, so a test can assert the count. With ``after_s`` the variant is
healthy for that long first, counted from its first request (when the demo's traffic reaches it,
however long the rest of the stack took to start), so a demo shows a good canary going bad;
requests before the onset are not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from fractions import Fraction


class FaultInjector:
    """Decides, request by request, whether to fail it; ``rate`` in [0, 1]."""

    __slots__ = ("_after_s", "_clock", "_den", "_num", "_onset", "count", "rate")

    def __init__(self, rate: float, after_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be within [0, 1], got {rate}")
        self.rate = rate
        fraction = Fraction(rate).limit_denominator(1_000_000)
        self._num = fraction.numerator
        self._den = fraction.denominator
        self.count = 0
        self._clock = clock
        self._after_s = after_s
        self._onset: float | None = None  # set by the first request when after_s > 0

    def fail_next(self) -> bool:
        if self._after_s > 0:
            if self._onset is None:
                self._onset = self._clock() + self._after_s
            if self._clock() < self._onset:
                return False
            self._after_s = 0.0
        n = self.count = self.count + 1
        return (n * self._num) // self._den > ((n - 1) * self._num) // self._den
