"""Drift sketches: the wire format a sidecar sends and the controller reads (never raw payloads).

A sidecar summarises what it saw in one window -- per input feature and per output -- as a
fixed-bin histogram (numeric) or as counts per declared value (categorical), and sends one
`QualityReport` per window with the contract's violation counts. The controller compares each
variant's sketches against the reference (from ``cohortgate models profile``, same edges) and
against control's on the same window.

Windows are **disjoint**: a sidecar reports each interval ``[window_start, window_end)`` once, and
a sliding window over the last N reports is their `merge` (counts add, so merging is exact:
the merge of the sketches of the parts equals the sketch of the whole).

Shapes (JSON: ``to_json`` / ``from_json``; ``kind`` tells the two sketches apart)::

    NumericSketch      edges (k+1 increasing floats), counts (k ints; bin i is edges[i] <= x < edges[i+1],
                       the last bin also holds x == edges[-1], numpy.histogram's convention),
                       nulls (NaN or missing), below (< edges[0], -inf too), above (> edges[-1], +inf too)
    CategoricalSketch  counts {value: n} over the reference's values, nulls, other (a value outside
                       them: counted, never named -- a stray value may be personal data)
    QualityReport      model, variant, route (or None), window_start/end (Unix s), rows, requests,
                       inputs {feature: sketch}, outputs {output: sketch},
                       violations {feature: {rule: count}}

Pure: numpy only (the builders `NumericSketch.of` / `CategoricalSketch.of` are vectorised).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cohortgate.core.errors import CohortgateError

NUMERIC = "numeric"
CATEGORICAL = "categorical"
WIRE_VERSION = 1


class SketchMismatch(CohortgateError):
    """Two sketches that cannot be merged (different edges, kinds, models or variants)."""


@dataclass(frozen=True, slots=True)
class NumericSketch:
    """A fixed-bin histogram of one numeric feature, with nulls and out-of-range values apart."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    nulls: int = 0
    below: int = 0
    above: int = 0

    def __post_init__(self) -> None:
        if len(self.edges) < 2 or len(self.counts) != len(self.edges) - 1:
            raise ValueError(
                f"a numeric sketch needs k+1 >= 2 edges and k counts (got {len(self.edges)} and {len(self.counts)})"
            )
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("a numeric sketch's edges must be strictly increasing")

    @classmethod
    def empty(cls, edges: Sequence[float]) -> NumericSketch:
        return cls(tuple(float(e) for e in edges), (0,) * (len(edges) - 1))

    @classmethod
    def of(cls, values: npt.ArrayLike, edges: Sequence[float]) -> NumericSketch:
        """The sketch of ``values`` (NaN is a null) over ``edges``."""
        x = np.asarray(values, dtype=np.float64).ravel()
        e = np.asarray(edges, dtype=np.float64)
        null = np.isnan(x)
        below = int(np.count_nonzero(x < e[0]))
        above = int(np.count_nonzero(x > e[-1]))
        inside = x[~null & (x >= e[0]) & (x <= e[-1])]
        counts, _ = np.histogram(inside, bins=e)
        return cls(tuple(float(v) for v in e), tuple(int(c) for c in counts), int(np.count_nonzero(null)), below, above)

    @property
    def kind(self) -> str:
        return NUMERIC

    @property
    def total(self) -> int:
        """Every value seen: binned, null or out of range."""
        return sum(self.counts) + self.nulls + self.below + self.above

    def merge(self, other: Sketch) -> NumericSketch:
        if not isinstance(other, NumericSketch) or other.edges != self.edges:
            raise SketchMismatch("numeric sketches merge only over the same edges")
        return NumericSketch(
            self.edges,
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.nulls + other.nulls,
            self.below + other.below,
            self.above + other.above,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": NUMERIC,
            "edges": list(self.edges),
            "counts": list(self.counts),
            "nulls": self.nulls,
            "below": self.below,
            "above": self.above,
        }


@dataclass(frozen=True, slots=True)
class CategoricalSketch:
    """Counts per declared value of one categorical feature; undeclared values only counted."""

    counts: Mapping[str, int]
    nulls: int = 0
    other: int = 0

    @classmethod
    def empty(cls, values: Iterable[str]) -> CategoricalSketch:
        return cls({str(v): 0 for v in values})

    @classmethod
    def of(cls, values: npt.ArrayLike, allowed: Iterable[str]) -> CategoricalSketch:
        """The sketch of ``values`` (None or NaN is a null) over the declared ``allowed`` values."""
        declared = [str(v) for v in allowed]
        x = np.asarray(values, dtype=object).ravel()
        null = np.fromiter((v is None or (isinstance(v, float) and v != v) for v in x), dtype=bool, count=x.size)
        present = x[~null].astype(str)
        uniq, n = np.unique(present, return_counts=True)
        seen = dict(zip(uniq.tolist(), n.tolist(), strict=True))
        counts = {v: int(seen.pop(v, 0)) for v in declared}
        return cls(counts, int(np.count_nonzero(null)), int(sum(seen.values())))

    @property
    def kind(self) -> str:
        return CATEGORICAL

    @property
    def total(self) -> int:
        return sum(self.counts.values()) + self.nulls + self.other

    def merge(self, other: Sketch) -> CategoricalSketch:
        if not isinstance(other, CategoricalSketch):
            raise SketchMismatch("a categorical sketch merges only with another categorical sketch")
        counts = dict(self.counts)
        for k, v in other.counts.items():
            counts[k] = counts.get(k, 0) + v
        return CategoricalSketch(counts, self.nulls + other.nulls, self.other + other.other)

    def to_json(self) -> dict[str, Any]:
        return {"kind": CATEGORICAL, "counts": dict(self.counts), "nulls": self.nulls, "other": self.other}


Sketch = NumericSketch | CategoricalSketch


def sketch_from_json(data: Mapping[str, Any]) -> Sketch:
    """A sketch from its JSON; ValueError names what is wrong."""
    kind = data.get("kind")
    try:
        if kind == NUMERIC:
            return NumericSketch(
                tuple(float(e) for e in data["edges"]),
                tuple(_count(c) for c in data["counts"]),
                _count(data.get("nulls", 0)),
                _count(data.get("below", 0)),
                _count(data.get("above", 0)),
            )
        if kind == CATEGORICAL:
            counts = data["counts"]
            if not isinstance(counts, Mapping):
                raise ValueError("a categorical sketch's counts must be an object")
            return CategoricalSketch(
                {str(k): _count(v) for k, v in counts.items()},
                _count(data.get("nulls", 0)),
                _count(data.get("other", 0)),
            )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed {kind} sketch: {exc}") from None
    raise ValueError(f"unknown sketch kind {kind!r} (expected {NUMERIC!r} or {CATEGORICAL!r})")


def _count(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"a count must be a non-negative integer, not {v!r}")
    return v


def merge_sketches(a: Mapping[str, Sketch], b: Mapping[str, Sketch]) -> dict[str, Sketch]:
    """Per-name merge; a name in only one side is kept as it is."""
    out = dict(a)
    for name, s in b.items():
        out[name] = out[name].merge(s) if name in out else s
    return out


def _merge_violations(
    a: Mapping[str, Mapping[str, int]], b: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, int]]:
    out = {f: dict(rules) for f, rules in a.items()}
    for f, rules in b.items():
        mine = out.setdefault(f, {})
        for rule, n in rules.items():
            mine[rule] = mine.get(rule, 0) + n
    return out


def _segment_counts(data: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """``{"device=ios": {"positive": x, "total": n}}`` with ``0 <= x <= n`` (ValueError otherwise)."""
    out = {}
    for key, doc in data.items():
        x, n = _count(doc.get("positive", 0)), _count(doc.get("total", 0))
        if x > n:
            raise ValueError(f"segment {key!r}: {x} positive of {n} rows")
        out[str(key)] = {"positive": x, "total": n}
    return out


@dataclass(frozen=True, slots=True)
class QualityReport:
    """What one sidecar (model, variant) saw in one window: sketches and contract violations.

    ``rows`` counts input rows sketched (a request may carry a batch); ``requests`` counts requests
    checked; ``violations[feature][rule]`` counts rows that broke a rule (``type``, ``range``,
    ``allowed``, ``null``; ``output`` names for an output's ``range``). ``segments`` (optional, absent
    in older reports) counts per ``"segment=value"`` of the request's ``x-cohortgate-segment`` label
    the rows whose prediction was the positive class, ``{"positive": x, "total": n}``: the four-fifths
    rule's evidence.
    """

    model: str
    variant: str
    window_start: float
    window_end: float
    inputs: Mapping[str, Sketch] = field(default_factory=dict)
    outputs: Mapping[str, Sketch] = field(default_factory=dict)
    violations: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    route: str | None = None
    rows: int = 0
    requests: int = 0
    segments: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def merge(self, other: QualityReport) -> QualityReport:
        """The report over both windows (same model, variant and route); windows may have gaps."""
        if (self.model, self.variant, self.route) != (other.model, other.variant, other.route):
            raise SketchMismatch(
                f"reports of {self.model}/{self.variant} and {other.model}/{other.variant} do not merge"
            )
        return QualityReport(
            self.model,
            self.variant,
            min(self.window_start, other.window_start),
            max(self.window_end, other.window_end),
            merge_sketches(self.inputs, other.inputs),
            merge_sketches(self.outputs, other.outputs),
            _merge_violations(self.violations, other.violations),
            self.route,
            self.rows + other.rows,
            self.requests + other.requests,
            _merge_violations(self.segments, other.segments),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "quality",
            "version": WIRE_VERSION,
            "model": self.model,
            "variant": self.variant,
            "route": self.route,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "rows": self.rows,
            "requests": self.requests,
            "inputs": {k: s.to_json() for k, s in self.inputs.items()},
            "outputs": {k: s.to_json() for k, s in self.outputs.items()},
            "violations": {f: dict(r) for f, r in self.violations.items()},
            **({"segments": {k: dict(c) for k, c in self.segments.items()}} if self.segments else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QualityReport:
        """A report from its JSON; ValueError names what is wrong (a controller answers 400)."""
        try:
            route = data.get("route")
            violations = data.get("violations") or {}
            return cls(
                model=str(data["model"]),
                variant=str(data["variant"]),
                window_start=float(data["window_start"]),
                window_end=float(data["window_end"]),
                inputs={str(k): sketch_from_json(v) for k, v in (data.get("inputs") or {}).items()},
                outputs={str(k): sketch_from_json(v) for k, v in (data.get("outputs") or {}).items()},
                violations={str(f): {str(r): _count(n) for r, n in rules.items()} for f, rules in violations.items()},
                route=None if route is None else str(route),
                rows=_count(data.get("rows", 0)),
                requests=_count(data.get("requests", 0)),
                segments=_segment_counts(data.get("segments") or {}),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed quality report: missing or wrong field {exc}") from None
