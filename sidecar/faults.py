"""A deterministic fault knob for demos and tests (``--fault-rate``): the rollback demo needs a
canary that fails a known fraction of requests.

Failures are spread evenly by a request counter, not drawn at random: after n requests exactly
``floor(n * rate)`` have failed, so a test can assert the count.
"""

from __future__ import annotations

from fractions import Fraction


class FaultInjector:
    """Decides, request by request, whether to fail it; ``rate`` in [0, 1]."""

    __slots__ = ("_den", "_num", "count", "rate")

    def __init__(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be within [0, 1], got {rate}")
        self.rate = rate
        fraction = Fraction(rate).limit_denominator(1_000_000)
        self._num = fraction.numerator
        self._den = fraction.denominator
        self.count = 0

    def fail_next(self) -> bool:
        n = self.count = self.count + 1
        return (n * self._num) // self._den > ((n - 1) * self._num) // self._den
