"""Process-wide runtime settings, made once by a service's entry point — never by library code.

A gateway or controller re-parses its policy while it serves. Parsing a 1 000-route file allocates
~100 000 short-lived, acyclic objects; with CPython's default collector thresholds each allocation
burst triggers collections that walk the whole long-lived heap (policy, token cache, protobuf
classes), which tripled the parse time. Freezing the start-up heap (`gc.freeze`: it is never scanned
again) and a larger first-generation threshold keep the parse fast with the collector on, for every
thread, instead of pausing the collector around each parse (process-wide state flipped by a reload
thread while the event loop runs). Measured on the 2-core VM (CPU time, a 1 000-route policy in a
400 000-object heap, median of 9): collector paused 405 ms, default 830 ms, tuned 518 ms.
"""

from __future__ import annotations

import gc

FIRST_GENERATION_THRESHOLD = 50_000  # CPython's default is 700 (2 000 from 3.13)


def tune_collector() -> None:
    """Call once, when start-up is done: freeze what exists, and collect young objects less often."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(FIRST_GENERATION_THRESHOLD, second, third)
