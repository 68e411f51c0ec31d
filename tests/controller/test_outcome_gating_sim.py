"""The outcome gate's error rates, simulated through the controller's own path (ledger -> gate -> judge).

`cohortgate.controller.outcome_sim` feeds each run's records to `OutcomeLedger.ingest`, looks with
`OutcomeGate` after every batch and asks the pure `judge`, as `Controller.tick` does. A few hundred
seeded runs here (about 8 s of CPU); `bench/bench_outcomes.py gate` runs 1 000
for the figures in docs/outcomes.md.
"""

from __future__ import annotations

from cohortgate.controller.outcome_sim import simulate
from cohortgate.core.plan import plan

ALPHA = 0.05


def test_aa_false_win_and_false_loss_stay_under_alpha_while_looking_every_interval():
    # A/A: the canary is control; 10 looks over 1 000 units, a guardrail metric on revenue too
    r = simulate(200, units=1000, looks=10, base=0.3, guardrail_margin=0.05, seed=11)
    assert r.win <= ALPHA  # a false promotion (promote_on_win)
    assert r.primary_win <= ALPHA  # the primary metric claiming a win, whatever the guardrail says
    assert r.loss <= ALPHA  # a false rollback: primary loss or guardrail inferior
    assert r.loss_guardrail <= r.loss


def test_power_for_a_planted_lift_matches_the_plan():
    # +40 % on a 30 % conversion, the plan's always-valid units (80 % power: 884), 10 looks
    p = plan(0.3, 0.4, kind="binary", alpha=ALPHA, power=0.8)
    r = simulate(200, units=p.units_sequential, looks=10, base=0.3, lift=0.4, seed=12)
    assert abs(r.win - 0.8) <= 0.1, r  # within 10 points of the plan's promise
    assert r.loss == 0.0  # a better canary is never rolled back here
    assert r.median_win_units is not None and r.median_win_units < p.units_sequential  # stops early when it can


def test_delayed_labels_keep_the_level_and_the_decision_still_comes():
    """Labels that arrive up to 3 looks after the exposure (a purchase days later, a warehouse
    import): meanwhile the unit counts as exposed without a conversion in both arms, so A/A stays
    under alpha while looking every interval, and a planted lift still wins once the labels are in."""
    aa = simulate(200, units=1000, looks=10, base=0.3, seed=21, label_delay_looks=3)
    assert aa.win <= ALPHA and aa.primary_win <= ALPHA and aa.loss <= ALPHA, aa
    p = plan(0.3, 0.4, kind="binary", alpha=ALPHA, power=0.8)
    prompt = simulate(200, units=p.units_sequential, looks=10, base=0.3, lift=0.4, seed=22)
    late = simulate(200, units=p.units_sequential, looks=10, base=0.3, lift=0.4, seed=22, label_delay_looks=3)
    assert late.loss == 0.0 and late.win >= prompt.win - 0.1, (prompt, late)  # the labels catch up
