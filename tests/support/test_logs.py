"""Rate-limited warnings (issue 17.6): a flood becomes a handful of lines and no occurrence goes uncounted."""

from __future__ import annotations

import asyncio
import logging
import re

from cohortgate.support.logs import Throttle
from sidecar import report as sidecar_report
from sidecar.report import Reporter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def counted(records: list[logging.LogRecord]) -> int:
    """Occurrences a set of lines accounts for: each line is one, plus the N it says it held back."""
    total = 0
    for r in records:
        m = re.search(r"\((\d+) more", r.getMessage())
        total += 1 + (int(m.group(1)) if m else 0)
    return total


def test_a_flood_of_1334_warnings_in_10_s_is_three_lines_that_count_every_one(caplog):
    clock = Clock()
    throttle = Throttle(logging.getLogger("flood"), every_s=5.0, clock=clock)
    caplog.set_level(logging.INFO, logger="flood")
    for i in range(1334):  # the sidecar: one failure per request while Redis is down
        clock.now = i * 10.0 / 1334
        throttle.warning("sink failed: %s", f"error {i}")
    assert throttle.resolved("sink failed: %s", "sink works again")
    lines = [r for r in caplog.records if r.name == "flood"]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING, logging.INFO]  # at 0 s, 5 s, the end
    assert lines[0].getMessage() == "sink failed: error 0"  # the first occurrence, at once and verbatim
    assert "more like this in the last 5 s" in lines[1].getMessage()
    assert counted(lines[:2]) + int(re.search(r"\((\d+) more", lines[2].getMessage()).group(1)) == 1334
    # re-armed: the next failure is written at once, and other kinds were never held back by this one
    assert throttle.warning("sink failed: %s", "again") and throttle.warning("other: %s", "x")
    assert not throttle.resolved("never seen", "nothing")


def test_the_sidecar_logs_a_dead_report_sink_once_not_once_per_request(caplog):
    class DeadSink:
        async def send(self, reports):
            raise ConnectionError("Redis is down")

        async def close(self):
            pass

    async def main() -> None:
        reporter = Reporter(DeadSink(), variant="canary", model="tabular", output_names=(), batch=1)
        reporter.start()
        for i in range(200):
            reporter.report(f"r{i}", 200, 0.001, None)
            await asyncio.sleep(0)  # one request at a time: every report is its own failed batch
        await reporter.close()

    caplog.set_level(logging.WARNING, logger=sidecar_report.log.name)
    sidecar_report.throttled.resolved(sidecar_report.SINK_FAILED, "reset")  # module state from other tests
    asyncio.run(main())
    lines = [r for r in caplog.records if r.name == sidecar_report.log.name]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # was 200 (one per request)
    assert sidecar_report.throttled.held(sidecar_report.SINK_FAILED) == 199
