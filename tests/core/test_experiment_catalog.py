"""The experiment catalog: a route's optional `experiment:` entry, validated with positions like the rest."""

from __future__ import annotations

import textwrap

import pytest

from cohortgate.core.errors import PolicyError
from cohortgate.core.policy import parse_policy

BASE = """\
version: 1
jwt: {issuer: iss, audience: aud, jwks: jwks.json}
routes:
  - name: shop
    match: {model: shop}
    variants:
      - {name: control, weight: 90, backends: [{url: "http://127.0.0.1:1", region: eu}]}
      - {name: v2, weight: 10, backends: [{url: "http://127.0.0.1:2", region: eu}]}
    metrics:
      - {name: conversion, kind: binary, role: primary}
      - {name: revenue, kind: mean, role: guardrail, margin: 0.01}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, filename="p.yaml")
    return list(info.value.problems)


def test_an_entry_compiles_with_its_start_as_an_iso_date():
    text = BASE + textwrap.indent(
        "experiment: {hypothesis: bigger images sell more, owner: team-shop, primary_metric: conversion, "
        "start: 2026-11-30}\n",
        "    ",
    )
    exp = parse_policy(text).by_name["shop"].experiment
    assert exp is not None
    assert (exp.hypothesis, exp.owner, exp.primary_metric, exp.start) == (
        "bigger images sell more",
        "team-shop",
        "conversion",
        "2026-11-30",
    )


def test_no_entry_is_none_and_primary_metric_is_optional():
    assert parse_policy(BASE).by_name["shop"].experiment is None
    text = BASE + "    experiment: {hypothesis: h, owner: o, start: '2026-01-02'}\n"
    exp = parse_policy(text).by_name["shop"].experiment
    assert exp is not None and exp.primary_metric is None and exp.start == "2026-01-02"


def test_an_unknown_primary_metric_is_refused_at_its_position():
    text = BASE + "    experiment: {hypothesis: h, owner: o, primary_metric: clicks, start: 2026-01-02}\n"
    problems = problems_of(text)
    assert len(problems) == 1
    assert problems[0].startswith("p.yaml:12:")
    assert "'clicks' is not one of the route's metrics (conversion, revenue)" in problems[0]


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("{owner: o, start: 2026-01-02}", "hypothesis"),
        ("{hypothesis: h, owner: o, start: yesterday}", "start"),
        ("{hypothesis: '', owner: o, start: 2026-01-02}", "hypothesis"),
        ("{hypothesis: h, owner: o, start: 2026-01-02, budget: 3}", "budget"),
    ],
)
def test_a_bad_entry_is_refused_with_its_line(entry, says):
    problems = problems_of(BASE + f"    experiment: {entry}\n")
    assert problems and all(p.startswith("p.yaml:12:") for p in problems), problems
    assert says in " ".join(problems)


def test_a_primary_metric_that_contradicts_the_declared_primary_is_refused():
    text = BASE + "    experiment: {hypothesis: h, owner: o, primary_metric: revenue, start: 2026-01-02}\n"
    (problem,) = problems_of(text)
    assert problem.startswith("p.yaml:12:") and "not the metric declared `role: primary` ('conversion')" in problem
