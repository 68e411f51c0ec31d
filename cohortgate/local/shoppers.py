"""The demo's shoppers, pure: who converts in an outcome experiment, at the rates the demo planted.

`cohortgate traffic --outcomes-model` plays them through the running stack (each visit a fresh unit,
its outcome posted with the response's exposure token); `up --demo` plants the rates
(`cohortgate.local.recipes.demo_outcomes`); tests/local/test_demo_outcomes.py drives the same model
through the controller's own ledger, judge and rollout table. Deterministic: a conversion is a keyed
hash of the seed and the visitor, not a draw from a shared random stream, so a rerun with the same
seed converts the same visitors whatever order their answers arrive in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cohortgate.core.policy import Policy
from cohortgate.local.plan import oip_model_name

# The demo's outcome experiment (docs/outcomes.md, README "Experiments that pick winners"): visitors
# per second and planted conversion rates. Control converts 10 %, the rollout's variant 1.5x (15 %),
# the other challengers 0.5x (5 %): at 30 visitors/s the win and the loss come in about 1-1.5 min
# (3.5 min at worst in 16 simulated runs through the controller's code; tests/local/test_demo_outcomes.py).
DEMO_VISITORS_RPS = 30.0
DEMO_CONVERSION = 0.10
DEMO_LIFT = 1.5
DEMO_DROP = 0.5


@dataclass(frozen=True, slots=True)
class OutcomeDemo:
    """The shoppers of an outcome experiment: who visits which model, and how often each variant converts."""

    model: str
    rates: Mapping[str, float]  # variant -> planted conversion probability
    rps: float = 30.0
    metric: str = "conversion"


def visitor(seed: int, n: int) -> str:
    """The ``n``-th visitor's id: a fresh unit per visit, the same for the same seed."""
    return f"visitor-{seed}-{n:08d}"


def converts(seed: int, visitor_id: str, rate: float) -> bool:
    """Whether this visitor converts at ``rate``: a keyed hash of seed and visitor read as a uniform
    draw, so a rerun with the same seed converts the same visitors (and no draw order matters)."""
    digest = hashlib.blake2b(visitor_id.encode(), key=str(seed).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < rate


def outcome_for(demo: OutcomeDemo, seed: int, visitor_id: str, variant: str, exposure: str) -> dict[str, Any] | None:
    """The outcome a visit reports (1 converted, 0 not), or None for a variant without a planted rate."""
    rate = demo.rates.get(variant)
    if rate is None or not exposure:
        return None
    return {"exposure": exposure, "metric": demo.metric, "value": 1 if converts(seed, visitor_id, rate) else 0}


def demo_outcomes(policy: Policy) -> tuple[str, OutcomeDemo] | None:
    """The demo's outcome experiment: the first route with a primary binary metric, a model and a
    rollout, with planted conversion rates -- control `DEMO_CONVERSION`, the rollout's variant
    `DEMO_LIFT` times it (a win: promoted with ``promote_on_win``), every other challenger
    `DEMO_DROP` times it (a loss: rolled back). ``(route name, demo)``, or None without such a route."""
    for route in policy.routes:
        primary = next((m for m in route.metrics if m.role == "primary" and m.kind == "binary"), None)
        model = oip_model_name(route)
        if primary is None or model is None or route.rollout is None or len(route.variants) < 2:
            continue
        good = primary.direction != "decrease"
        up, down = (DEMO_LIFT, DEMO_DROP) if good else (DEMO_DROP, DEMO_LIFT)
        rates = {route.variants[0].name: DEMO_CONVERSION}
        for v in route.variants[1:]:
            rates[v.name] = round(DEMO_CONVERSION * (up if v.name == route.rollout.variant else down), 6)
        return route.name, OutcomeDemo(model, rates, rps=DEMO_VISITORS_RPS, metric=primary.name)
    return None
