"""The outcome ledger: attribution by token or request id, refusals by reason, duplicates once,
unit-level tallies, and the lift and verdicts `core.lift` gives on exactly those tallies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cohortgate.controller.outcomes import (
    ACCEPTED,
    DUPLICATE,
    UNKNOWN_METRIC,
    UNKNOWN_REQUEST,
    OutcomeLedger,
    append_journal,
    keys_from_env,
    read_journal,
)
from cohortgate.core import lift as L
from cohortgate.core.exposure import exposure_id, mac_key, mint

KEY = mac_key(b"controller-and-gateways-secret-01")
NOW = 1_800_000_000.0
CONVERSION = L.MetricSpec("conversion", kind="binary", planned_units=4000)
REVENUE = L.MetricSpec("revenue", kind="mean", role="guardrail", margin=0.05, planned_units=4000)
CLICKS = L.MetricSpec("clicks", kind="ratio", role="secondary", planned_units=4000)


def _ledger(*specs: L.MetricSpec, keys=(KEY,), window_s: float = 3600.0) -> OutcomeLedger:
    return OutcomeLedger(
        {"shop": specs or (CONVERSION,)}, {"shop": "control"}, keys, window_s=window_s, clock=lambda: NOW
    )


def _token(variant: str, unit: str, rid: str | None = None, t: float = NOW, key: bytes = KEY) -> str:
    return mint(key, "shop", variant, unit, t, exposure_id(rid) if rid else None)


def test_an_outcome_is_attributed_to_the_variant_in_its_token() -> None:
    ledger = _ledger()
    assert ledger.ingest({"exposure": _token("v1", "u1"), "metric": "conversion", "value": 1}) == ACCEPTED
    assert ledger.ingest({"exposure": _token("control", "u2"), "metric": "conversion", "value": 0}) == ACCEPTED
    arms = ledger._arms["shop"]
    assert set(arms) == {"v1", "control"}
    assert arms["v1"].sums["conversion"] == [1.0] and arms["control"].sums["conversion"] == [0.0]


def test_forged_altered_expired_and_junk_tokens_are_refused_and_counted_by_reason() -> None:
    ledger = _ledger()
    good = _token("control", "u1")
    records = [
        {
            "exposure": _token("v1", "u1", key=mac_key(b"an-attackers-own-secret-000")),
            "metric": "conversion",
            "value": 1,
        },
        {"exposure": good.replace(".control.", ".v1."), "metric": "conversion", "value": 1},  # altered
        {"exposure": _token("v1", "u2", t=NOW - 7200), "metric": "conversion", "value": 1},  # past the window
        {"exposure": _token("v1", "u3", t=NOW + 3600), "metric": "conversion", "value": 1},
        {"exposure": "not-a-token", "metric": "conversion", "value": 1},
        {"exposure": good, "metric": "conversion", "value": float("nan")},
        {"exposure": good, "metric": "conversion"},
    ]
    counts = ledger.ingest_many(records)
    assert counts == {"forged": 2, "expired": 1, "not_yet_valid": 1, "malformed": 1, "bad_record": 2}
    assert ledger._arms == {}  # nothing refused left a trace in the tallies


def test_duplicates_count_once_per_exposure_and_metric() -> None:
    ledger = _ledger(CONVERSION, REVENUE)
    token = _token("v1", "u1", rid="req-1")
    assert ledger.ingest({"exposure": token, "metric": "revenue", "value": 9.5}) == ACCEPTED
    assert ledger.ingest({"exposure": token, "metric": "revenue", "value": 9.5}) == DUPLICATE  # client retry
    assert ledger.ingest({"exposure": token, "metric": "conversion", "value": 1}) == ACCEPTED  # another metric
    # The same response's label imported later by request id is the same exposure: a duplicate.
    assert ledger.ingest({"kind": "exposure", "route": "shop", "variant": "v1", "unit": "u1", "t": NOW,
                          "request_id": "req-1"}) == DUPLICATE  # fmt: skip
    assert ledger.ingest({"request_id": "req-1", "metric": "revenue", "value": 9.5}) == DUPLICATE
    # A second response to the same unit is a second exposure.
    assert ledger.ingest({"exposure": _token("v1", "u1", rid="req-2"), "metric": "revenue", "value": 1}) == ACCEPTED
    arm = ledger._arms["shop"]["v1"]
    assert arm.sums["revenue"] == [10.5] and arm.exposures == [2.0]


def test_imports_by_request_id_need_the_exposure_and_respect_the_window() -> None:
    ledger = _ledger()
    assert ledger.ingest({"request_id": "req-9", "metric": "conversion", "value": 1}) == UNKNOWN_REQUEST
    ledger.ingest({"kind": "exposure", "route": "shop", "variant": "v1", "unit": "u9", "t": NOW, "request_id": "req-9"})
    assert ledger.ingest({"request_id": "req-9", "metric": "conversion", "value": 1, "t": NOW + 7200}) == "expired"
    assert ledger.ingest({"request_id": "req-9", "metric": "conversion", "value": 1, "t": NOW + 60}) == ACCEPTED
    assert ledger.ingest({"request_id": "req-9", "metric": "latency", "value": 1}) == UNKNOWN_METRIC


def test_without_keys_every_token_is_refused() -> None:
    ledger = _ledger(keys=None)
    assert ledger.ingest({"exposure": _token("v1", "u1"), "metric": "conversion", "value": 1}) == "forged"


def _experiment(
    ledger: OutcomeLedger, rng: np.random.Generator, units: int, rates: dict[str, float], first: int = 0
) -> None:
    """Units exposed (access log) 1-3 times each; some convert (tokens), some buy (revenue)."""
    variants = list(rates)
    for u in range(first, first + units):
        variant = variants[rng.integers(len(variants))]
        unit = f"{u:016x}"
        tokens = []
        for k in range(int(rng.integers(1, 4))):
            rid = f"{unit}-{k}"
            ledger.ingest({"kind": "exposure", "route": "shop", "variant": variant, "unit": unit, "t": NOW,
                           "request_id": rid})  # fmt: skip
            tokens.append(_token(variant, unit, rid=rid))
        for token in tokens:
            if rng.random() < rates[variant]:
                ledger.ingest({"exposure": token, "metric": "conversion", "value": 1})
                ledger.ingest({"exposure": token, "metric": "revenue", "value": float(rng.lognormal(3, 0.5))})
                ledger.ingest({"exposure": token, "metric": "clicks", "value": 1})


def test_results_are_core_lift_on_the_unit_tallies() -> None:
    ledger = _ledger(CONVERSION, REVENUE, CLICKS)
    rng = np.random.default_rng(5)
    _experiment(ledger, rng, 1500, {"control": 0.1, "v1": 0.1})
    results = {(r.metric, r.challenger): r for r in ledger.results("shop")}
    assert set(results) == {("conversion", "v1"), ("revenue", "v1"), ("clicks", "v1")}
    arms = ledger._arms["shop"]
    conv = {v: (np.asarray(arms[v].sums["conversion"]) > 0).astype(float) for v in arms}
    direct = L.lift(L.unit_moments(conv["v1"]), L.unit_moments(conv["control"]), "binary", 0.05, 4000)
    r = results[("conversion", "v1")]
    assert r.units_challenger == len(arms["v1"].index)  # every exposed unit, converted or not
    assert r.abs == pytest.approx(float(direct.abs)) and r.cs_rel == pytest.approx(
        (float(direct.cs_rel[0]), float(direct.cs_rel[1]))
    )
    clicks = results[("clicks", "v1")]
    d = {v: np.asarray(arms[v].exposures) for v in arms}
    y = {v: np.asarray(arms[v].sums["clicks"]) for v in arms}
    assert clicks.challenger_value == pytest.approx(y["v1"].sum() / d["v1"].sum())  # per exposure
    assert json.loads(json.dumps(r.to_json()))["verdict"] in ("pending", "inconclusive")


def test_a_winner_and_a_loser_among_two_challengers() -> None:
    ledger = _ledger(CONVERSION, REVENUE)
    _experiment(ledger, np.random.default_rng(6), 6000, {"control": 0.10, "winner": 0.16, "loser": 0.05})
    verdicts = {(r.metric, r.challenger): r.decision.verdict for r in ledger.results("shop")}
    assert verdicts[("conversion", "winner")] is L.Verdict.WIN
    assert verdicts[("conversion", "loser")] is L.Verdict.LOSS
    # revenue per unit follows conversion: the loser is worse by more than 5 %, the winner is not
    assert verdicts[("revenue", "loser")] is L.Verdict.INFERIOR
    assert verdicts[("revenue", "winner")] is L.Verdict.NON_INFERIOR
    assert all(r.alpha == pytest.approx(0.025) for r in ledger.results("shop"))  # two challengers


def test_bounds_narrow_across_looks_and_verdicts_stick() -> None:
    ledger = _ledger()
    rng = np.random.default_rng(7)
    widths = []
    for look in range(3):
        _experiment(ledger, rng, 800, {"control": 0.1, "v1": 0.1}, first=800 * look)
        (r,) = ledger.results("shop")
        widths.append(r.bounds.rel_hi - r.bounds.rel_lo)
        assert r.cs_rel[0] <= r.bounds.rel_lo < r.bounds.rel_hi <= r.cs_rel[1]  # the intersection
    assert widths[0] > widths[1] > widths[2]


def test_units_seen_in_two_arms_are_left_out() -> None:
    ledger = _ledger()
    for variant in ("control", "v1"):
        ledger.ingest({"exposure": _token(variant, "moved", rid=variant), "metric": "conversion", "value": 1})
    ledger.ingest({"exposure": _token("v1", "stayed"), "metric": "conversion", "value": 1})
    ledger.ingest({"exposure": _token("control", "other"), "metric": "conversion", "value": 0})
    (r,) = ledger.results("shop")
    assert (r.crossed_units, r.units_challenger, r.units_control) == (1, 1, 1)


def test_covariate_enables_cuped() -> None:
    spec = L.MetricSpec("revenue", kind="mean", covariate="revenue_before", planned_units=4000)
    plain, adjusted = _ledger(L.MetricSpec("revenue", kind="mean", planned_units=4000)), _ledger(spec)
    rng = np.random.default_rng(8)
    for u in range(1500):
        unit, variant = f"u{u}", ("control", "v1")[u % 2]
        before = float(rng.gamma(2.0, 10.0))
        after = before + float(rng.normal(0, 5))  # the same unit, before and after exposure
        for ledger in (plain, adjusted):
            ledger.ingest({"kind": "covariate", "route": "shop", "unit": unit, "name": "revenue_before",
                           "value": before})  # fmt: skip
            ledger.ingest({"exposure": _token(variant, unit, rid=unit), "metric": "revenue", "value": after})
    (p,), (a,) = plain.results("shop"), adjusted.results("shop")
    assert a.cuped and not p.cuped
    assert (a.cs_rel[1] - a.cs_rel[0]) < 0.5 * (p.cs_rel[1] - p.cs_rel[0])


def test_the_journal_replays_to_the_same_ledger_and_is_idempotent(tmp_path: Path) -> None:
    journal = tmp_path / "outcomes.jsonl"
    rng = np.random.default_rng(9)
    records = []
    for u in range(300):
        variant, unit = ("control", "v1")[u % 2], f"{u:016x}"
        records.append({"kind": "exposure", "route": "shop", "variant": variant, "unit": unit, "t": NOW,
                        "request_id": f"r{u}"})  # fmt: skip
        if rng.random() < 0.3:
            records.append({"request_id": f"r{u}", "metric": "conversion", "value": 1, "t": NOW + 5})
    assert append_journal(journal, records) == len(records)
    with journal.open("a") as f:
        f.write('{"kind": "outcome", "metr')  # a torn last write
    first, second = _ledger(), _ledger()
    first.ingest_many(read_journal(journal))
    second.ingest_many(read_journal(journal))
    second.ingest_many(read_journal(journal))  # replayed twice: everything the second time is a duplicate
    assert second.counts[DUPLICATE] == len(records)
    assert first.results("shop")[0].to_json() == second.results("shop")[0].to_json()


def test_keys_from_env() -> None:
    assert keys_from_env({}) is None
    assert keys_from_env({"COHORTGATE_EXPOSURE_KEY": "controller-and-gateways-secret-01"}) == (KEY,)
