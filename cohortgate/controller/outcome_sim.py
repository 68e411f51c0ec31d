"""Simulated experiments through the controller's own outcome path: ledger -> gate -> judge.

For the A/A and power figures of docs/outcomes.md (tests/controller/test_outcome_gating.py and
`bench/bench_outcomes.py`). Each run is one experiment: units arrive in ``looks`` equal batches,
each is exposed to control or the canary (50/50) with a request id, converts with its arm's
probability (the primary metric, binary) and, with a guardrail, spends a log-normal revenue (a
mean metric, its margin relative). The records go through `OutcomeLedger.ingest` exactly as the
access-log feed and the imports send them; after every batch the `OutcomeGate` looks, and the pure
`judge` is asked for the canary's signal with healthy harm evidence, as `Controller.tick` does.
A run counts as a (false) win when any look said ``win``, a (false) loss when any said ``loss``.
The state is not advanced, so "ever" means over every look of the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cohortgate.controller.gating import OutcomeGate
from cohortgate.controller.judge import Evidence, judge
from cohortgate.controller.windows import Summary
from cohortgate.core.policy import Policy, parse_policy
from cohortgate.core.rollout import Phase, Signal, VariantState

ROUTE = "shop"


def sim_policy(planned_units: int, guardrail_margin: float | None, alpha: float = 0.05) -> Policy:
    """The simulated route: control + canary, a binary primary, optionally a guardrail on revenue."""
    metrics = [f"      - {{name: conversion, kind: binary, role: primary, planned_units: {planned_units}}}"]
    if guardrail_margin is not None:
        metrics.append(
            f"      - {{name: revenue, kind: mean, role: guardrail, margin: {guardrail_margin}, "
            f"planned_units: {planned_units}}}"
        )
    text = "\n".join(
        [
            "version: 1",
            "jwt: {issuer: https://auth.cohortgate.local, audience: cohortgate, jwks: jwks.json}",
            "routes:",
            f"  - name: {ROUTE}",
            "    match: {model: shop}",
            "    cohorts: {unit: {claim: sub}, salt: sim}",
            "    variants:",
            "      - {name: control, weight: 50, backends: [{url: 'http://127.0.0.1:18101', region: eu}]}",
            "      - {name: canary, weight: 50, backends: [{url: 'http://127.0.0.1:18102', region: eu}]}",
            f"    guardrails: {{alpha: {alpha}, min_samples: 1}}",
            "    rollout: {variant: canary, steps: [50, 100], interval_s: 1, promote_on_win: true}",
            "    metrics:",
            *metrics,
        ]
    )
    return parse_policy(text + "\n", filename="sim.yaml", base_dir=Path("/tmp"))


@dataclass(frozen=True, slots=True)
class SimResult:
    runs: int
    win: float  # share of runs where some look said win (promote)
    primary_win: float  # ... where the primary metric's verdict was win at some look (promoted or not)
    loss: float  # ... said loss (rollback), primary or guardrail
    loss_guardrail: float  # ... where the guardrail metric was the reason
    held_at_end: float  # share whose guardrail metric was still not non-inferior at the last look
    median_win_units: float | None  # units (both arms) at the first win, over the runs that won


def simulate(
    runs: int,
    *,
    units: int,
    looks: int,
    base: float = 0.3,
    lift: float = 0.0,
    planned_units: int | None = None,
    guardrail_margin: float | None = None,
    revenue_lift: float = 0.0,
    revenue_sigma: float = 1.0,
    seed: int = 0,
    label_delay_looks: int = 0,
) -> SimResult:
    """``runs`` experiments of ``units`` units looked at ``looks`` times (module docstring).

    ``label_delay_looks``: a delayed-label scenario. Each unit's outcomes arrive a uniformly drawn
    0..N looks after its exposure (labels that come later: a purchase days after the page, a label
    from a warehouse import); the looks go on until every outcome is in. Until then the unit counts
    as exposed without a conversion, as the live ledger counts it."""
    policy = sim_policy(planned_units or units, guardrail_margin)
    route = policy.by_name[ROUTE]
    healthy = Summary(10_000, 0, 20.0, 30.0, 40.0)
    base_ev = Evidence(window=healthy, step=healthy, control=healthy)
    state = VariantState(Phase.PROMOTING, 0, since=0.0)
    rng = np.random.default_rng(seed)
    cuts = np.linspace(0, units, looks + 1).round().astype(int)
    wins = primary_wins = losses = losses_g = held = 0
    win_units: list[int] = []
    for run in range(runs):
        canary = rng.random(units) < 0.5
        converts = rng.random(units) < np.where(canary, base * (1 + lift), base)
        revenue = rng.lognormal(0.0, revenue_sigma, units) * np.where(canary, 1 + revenue_lift, 1.0)
        gate = OutcomeGate(policy, keys=None, clock=lambda: 0.0)
        ingest = gate.ledger.ingest
        won = lost = lost_g = primary_won = False
        verdict = None
        delay = rng.integers(0, label_delay_looks + 1, units) if label_delay_looks else np.zeros(units, int)
        due: dict[int, list[dict[str, Any]]] = {}
        for k in range(looks + label_delay_looks):
            for record in due.pop(k, []):
                ingest(record)
            for i in range(cuts[k], cuts[k + 1]) if k < looks else ():
                rid = f"{run}-{i}"
                variant = "canary" if canary[i] else "control"
                ingest(
                    {
                        "kind": "exposure",
                        "route": ROUTE,
                        "variant": variant,
                        "unit": f"u{i}",
                        "t": 0.0,
                        "request_id": rid,
                    }
                )
                records = []
                outcome = {"kind": "outcome", "request_id": rid, "t": 0.0}
                if converts[i]:
                    records.append({**outcome, "metric": "conversion", "value": 1})
                if guardrail_margin is not None:
                    records.append({**outcome, "metric": "revenue", "value": float(revenue[i])})
                if delay[i]:
                    due.setdefault(k + int(delay[i]), []).extend(records)
                else:
                    for record in records:
                        ingest(record)
            gate.look(ROUTE)
            ev = gate.with_outcomes(ROUTE, "canary", base_ev)
            verdict = judge("canary", state, route.guardrails, route.rollout, 1e9, ev)
            if verdict.signal is Signal.WIN and not won:
                won = True
                win_units.append(int(cuts[min(k + 1, looks)]))
            primary_won = primary_won or any(o.role == "primary" and o.verdict == "win" for o in ev.outcomes)
            if verdict.signal is Signal.LOSS:
                lost = True
                lost_g = lost_g or "guardrail" in verdict.reason
        wins += won
        primary_wins += primary_won
        losses += lost
        losses_g += lost_g
        if guardrail_margin is not None and verdict is not None:
            held += any(o.role == "guardrail" and o.verdict != "non_inferior" for o in ev.outcomes)
    return SimResult(
        runs=runs,
        win=wins / runs,
        primary_win=primary_wins / runs,
        loss=losses / runs,
        loss_guardrail=losses_g / runs,
        held_at_end=held / runs,
        median_win_units=float(np.median(win_units)) if win_units else None,
    )
