"""Drift sketches: exact merges (the sketch of the parts merged is the sketch of the whole) and the wire format."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohortgate.core.sketch import (
    CategoricalSketch,
    NumericSketch,
    QualityReport,
    SketchMismatch,
    sketch_from_json,
)

EDGES = (-1.0, 0.0, 0.5, 2.0, 10.0)
CATS = ("eu", "us", "ae")

numbers = st.one_of(
    st.floats(min_value=-20, max_value=20, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, *EDGES]),
)
labels = st.one_of(st.sampled_from([*CATS, "zz", "other-value"]), st.none())


@given(st.lists(numbers, max_size=60), st.lists(numbers, max_size=60))
def test_numeric_merge_of_parts_is_the_sketch_of_the_whole(a: list[float], b: list[float]) -> None:
    merged = NumericSketch.of(a, EDGES).merge(NumericSketch.of(b, EDGES))
    assert merged == NumericSketch.of(a + b, EDGES)
    assert merged.total == len(a) + len(b)


@given(st.lists(labels, max_size=60), st.lists(labels, max_size=60))
def test_categorical_merge_of_parts_is_the_sketch_of_the_whole(a: list[str | None], b: list[str | None]) -> None:
    merged = CategoricalSketch.of(a, CATS).merge(CategoricalSketch.of(b, CATS))
    assert merged == CategoricalSketch.of(a + b, CATS)
    assert merged.total == len(a) + len(b)


@given(st.lists(st.lists(numbers, max_size=20), min_size=1, max_size=5))
def test_report_merge_over_windows_is_the_report_of_all_rows(parts: list[list[float]]) -> None:
    reports = [
        QualityReport(
            "m",
            "v",
            float(i),
            float(i + 1),
            {"x": NumericSketch.of(p, EDGES)},
            violations={"x": {"range": i}},
            rows=len(p),
            requests=1,
        )
        for i, p in enumerate(parts)
    ]
    merged = reports[0]
    for r in reports[1:]:
        merged = merged.merge(r)
    whole = [v for p in parts for v in p]
    assert merged.inputs["x"] == NumericSketch.of(whole, EDGES)
    assert (merged.window_start, merged.window_end) == (0.0, float(len(parts)))
    assert merged.rows == len(whole) and merged.requests == len(parts)
    assert merged.violations["x"]["range"] == sum(range(len(parts)))


def test_numeric_bins_follow_numpy_histogram_and_keep_nulls_and_out_of_range_apart() -> None:
    s = NumericSketch.of([-1.0, 0.0, 0.4, 0.5, 10.0, 10.5, -1.5, math.nan, math.inf, -math.inf], EDGES)
    assert s.counts == (1, 2, 1, 1)  # the last bin holds its right edge, like numpy.histogram
    assert (s.nulls, s.below, s.above) == (1, 2, 2)
    inside = [-1.0, 0.0, 0.4, 0.5, 10.0]
    assert list(s.counts) == np.histogram(inside, bins=EDGES)[0].tolist()


def test_undeclared_categories_are_counted_but_never_named() -> None:
    s = CategoricalSketch.of(["eu", "alice@example.com", None, "us", "eu"], CATS)
    assert dict(s.counts) == {"eu": 2, "us": 1, "ae": 0}
    assert (s.nulls, s.other) == (1, 1)
    assert "alice@example.com" not in str(s.to_json())


def test_report_round_trips_through_json() -> None:
    r = QualityReport(
        "fraud",
        "canary",
        100.0,
        160.0,
        {"amount": NumericSketch.of([1.0, 3.0], EDGES), "region": CategoricalSketch.of(["eu"], CATS)},
        {"score": NumericSketch.of([0.2], (0.0, 0.5, 1.0))},
        {"amount": {"range": 3}},
        route="checkout",
        rows=2,
        requests=1,
    )
    assert QualityReport.from_json(r.to_json()) == r
    assert r.to_json()["type"] == "quality"


def test_merging_mismatched_sketches_and_reports_refuses() -> None:
    with pytest.raises(SketchMismatch):
        NumericSketch.empty(EDGES).merge(NumericSketch.empty((0.0, 1.0)))
    with pytest.raises(SketchMismatch):
        NumericSketch.empty(EDGES).merge(CategoricalSketch.empty(CATS))
    with pytest.raises(SketchMismatch):
        QualityReport("m", "a", 0, 1).merge(QualityReport("m", "b", 0, 1))


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "quantile"},
        {"kind": "numeric", "edges": [1.0, 0.0], "counts": [1]},
        {"kind": "numeric", "edges": [0.0, 1.0], "counts": [1, 2]},
        {"kind": "numeric", "edges": [0.0, 1.0], "counts": [-1]},
        {"kind": "numeric", "counts": [1]},
        {"kind": "categorical", "counts": ["eu"]},
        {"kind": "categorical", "counts": {"eu": 1.5}},
    ],
)
def test_malformed_sketches_are_refused_with_a_value_error(bad: dict) -> None:
    with pytest.raises(ValueError):
        sketch_from_json(bad)


def test_malformed_report_is_refused_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="model"):
        QualityReport.from_json({"variant": "v", "window_start": 0, "window_end": 1})
