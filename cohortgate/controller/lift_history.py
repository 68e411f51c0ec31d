"""The lift of each outcome metric over time: what the dashboard's bands and the report's plots draw.

The controller looks at the outcome ledger once per interval (`OutcomesService.sample`) and records
each metric's lift and always-valid interval here. Memory is bounded without losing the start of
an experiment: when a series passes ``max_points`` every other point is dropped (the first kept)
and from then on only every other look is kept, so the points stay evenly spaced and a week-long
experiment is drawn end to end from at most ``max_points`` points (the newest look always shown).
A look where the challenger has fewer than half its units of the look before means the ledger
started its comparison afresh (a rolled-back challenger resumed; units crossing between arms in a
ramp remove far fewer): its series starts again there.

A point is ``[t, rel, av_lo, av_hi, fh_lo, fh_hi, units_challenger, units_control]``: relative
lift, the always-valid interval (the running intersection that decides) and the fixed-horizon one
(for reference), as fractions; None where a bound is still infinite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

RESTART_MIN_UNITS = 20  # below this a halving is noise, not a restart
MAX_POINTS = 720  # per series: 12 minutes at one look a second before the first thinning


def _num(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return round(v, 8) if math.isfinite(v) else None


def point(t: float, result: Mapping[str, Any]) -> list[Any]:
    """One look at one metric and challenger (a ``MetricResult.to_json()``) as a history point."""
    av = result.get("interval_always_valid") or (None, None)
    fh = result.get("interval_fixed_horizon") or (None, None)
    units = result.get("units") or {}
    return [
        round(float(t), 3),
        _num((result.get("lift") or {}).get("relative")),
        _num(av[0]),
        _num(av[1]),
        _num(fh[0]),
        _num(fh[1]),
        int(units.get("challenger") or 0),
        int(units.get("control") or 0),
    ]


@dataclass(slots=True)
class _Series:
    points: list[list[Any]] = field(default_factory=list)
    stride: int = 1  # keep every stride-th look
    looks: int = 0
    last: list[Any] | None = None  # the newest look, shown even when the stride skips it


@dataclass(slots=True)
class LiftHistory:
    """Bounded per-(route, metric, challenger) series of looks."""

    max_points: int = MAX_POINTS
    _series: dict[tuple[str, str, str], _Series] = field(default_factory=dict)

    def record(self, t: float, results: Iterable[Mapping[str, Any]]) -> None:
        """Add one look per result (``MetricResult.to_json()`` dicts)."""
        for r in results:
            key = (str(r["route"]), str(r["metric"]), str(r["challenger"]))
            s = self._series.setdefault(key, _Series())
            p = point(t, r)
            if s.last is not None and s.last[6] >= RESTART_MIN_UNITS and 2 * p[6] < s.last[6]:
                s = self._series[key] = _Series()  # the challenger's units halved: its comparison restarted
            s.last = p
            if s.looks % s.stride == 0:
                s.points.append(p)
                if len(s.points) > self.max_points:
                    del s.points[1::2]
                    s.stride *= 2
            s.looks += 1

    def series(self, route: str) -> list[dict[str, Any]]:
        """The route's series, JSON-able, in (metric, challenger) order; the newest look last."""
        out = []
        for (r, m, c), s in sorted(self._series.items()):
            if r != route:
                continue
            points = [list(p) for p in s.points]
            if s.last is not None and (not points or points[-1][0] != s.last[0]):
                points.append(list(s.last))
            out.append({"metric": m, "challenger": c, "points": points})
        return out
