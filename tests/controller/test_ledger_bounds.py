"""The outcome ledger's memory and journal stay bounded under the access-log exposure feed (issue 19).

Every answered request of a route with metrics is an exposure. The ledger forgets what it keeps per
exposure once the attribution window has passed (an outcome for it is refused then anyway) and
journals a unit's first exposure only (plus a count line per unit per interval on a ratio route),
without moving any statistic: the same data through a ledger whose window never expires, and
through a replay of the journal, reads as the same lift.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cohortgate.controller.gating import OutcomeGate
from cohortgate.controller.outcomes import DEFAULT_BUCKET_S, OutcomeLedger, read_journal
from cohortgate.core import lift as L
from cohortgate.core.exposure import DEFAULT_SKEW_S, exposure_id, mac_key, mint
from cohortgate.core.policy import parse_policy
from cohortgate.store.state import InProcessState

SECRET = "ledger-bounds-key-0123456789abcdef"
KEY = mac_key(SECRET.encode())
WINDOW = 3600.0  # a one-hour attribution window, simulated over ten of them
T0 = 1_700_000_000.0
SPECS = {
    "shop": [L.MetricSpec("conversion", "binary"), L.MetricSpec("clicks", "ratio", role="secondary")],
    "feed": [L.MetricSpec("conversion", "binary")],
}
CONTROLS = {"shop": "control", "feed": "control"}
UNITS = 1000  # per route; even units see control, odd ones canary


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def simulate(n: int = 200_000, span: float = 10 * WINDOW, seed: int = 3) -> list[tuple[float, int, tuple]]:
    """Time-ordered events: exposures (some fed twice by the log), and outcomes within the window."""
    rng = np.random.default_rng(seed)
    times = T0 + np.sort(rng.uniform(0.0, span, n))
    routes = rng.integers(0, 2, n)
    units = rng.integers(0, UNITS, n)
    delay = rng.uniform(1.0, 0.9 * WINDOW, n)
    u = rng.random(n)
    events: list[tuple[float, int, tuple]] = []
    for k in range(n):
        route = ("shop", "feed")[routes[k]]
        unit = f"{route[0]}{units[k]:05d}"
        variant = ("control", "canary")[units[k] % 2]
        rid = f"r{k}"
        t = float(times[k])
        token = mint(KEY, route, variant, unit, t, exposure_id(rid))
        served = (token, route, variant, unit, rid)
        events.append((t, 0, served))
        if u[k] < 0.05:  # the log delivered it again (a retry, a replica read it twice)
            events.append((t + delay[k] / 2, 0, served))
        if u[k] < (0.08 if variant == "control" else 0.11):
            events.append((t + delay[k], 1, (token, "conversion", 1)))
            if u[k] < 0.02:  # the client retried the post
                events.append((t + delay[k] + 1.0, 1, (token, "conversion", 1)))
        if route == "shop" and u[k] < 0.4:
            events.append((t + delay[k] / 3, 2, (rid, "clicks", 1 + k % 3)))  # a late import by request id
    events.sort(key=lambda e: e[0])
    return events


def run(events, window: float, flush_every: float = 600.0, sample_every: int = 500):
    """Feed ``events`` through one ledger; its journal lines (flushed each interval) and peak memory."""
    clock = Clock(T0)
    ledger = OutcomeLedger(SPECS, CONTROLS, (KEY,), window_s=window, clock=clock)
    journal: list[dict] = []
    next_flush, peak = T0 + flush_every, 0
    for i, (t, what, item) in enumerate(events):
        clock.t = t
        if t >= next_flush:
            ledger.flush_exposure_counts()
            journal += ledger.unjournaled
            ledger.unjournaled.clear()
            next_flush += flush_every
        if what == 0:
            ledger.expose(*item, now=t)
        elif what == 1:
            ledger.ingest({"kind": "outcome", "exposure": item[0], "metric": item[1], "value": item[2]})
        else:
            ledger.ingest({"kind": "outcome", "request_id": item[0], "metric": item[1], "value": item[2]})
        if i % sample_every == 0:
            peak = max(peak, ledger.per_exposure_entries())
    ledger.flush_exposure_counts()
    journal += ledger.unjournaled
    ledger.unjournaled.clear()
    return ledger, journal, peak


def lifts(ledger: OutcomeLedger) -> list[dict]:
    return [r.to_json() for route in ("shop", "feed") for r in ledger.results(route)]


def test_200k_exposures_keep_memory_and_journal_bounded_with_the_unbounded_lift():
    events = simulate()
    exposures = sum(1 for e in events if e[1] == 0)
    bounded, journal, peak = run(events, WINDOW)
    unbounded, full_journal, _ = run(events, math.inf)

    # the same statistics, statuses included: nothing accepted or refused differently inside the window
    assert lifts(bounded) == lifts(unbounded)
    assert bounded.counts == unbounded.counts and bounded.exposure_counts == unbounded.exposure_counts
    assert bounded.counts["duplicate"] > 0 and bounded.exposure_counts["duplicate"] > 0  # dedup was exercised
    assert bounded.counts["accepted"] > 50_000

    # memory: per-exposure entries never exceed what one window (+ skew + a bucket) of traffic holds
    rate = exposures / (10 * WINDOW)
    per_exposure = 4  # its dedup key, its request id, an outcome key per metric (at most two here)
    bound = per_exposure * rate * (WINDOW + DEFAULT_SKEW_S + 2 * DEFAULT_BUCKET_S)
    assert peak <= bound < unbounded.per_exposure_entries() / 4, (peak, bound)
    # ... and once the window has passed, nothing of them is left but the newest exposure's
    token = mint(KEY, "feed", "control", "late", events[-1][0] + WINDOW + DEFAULT_SKEW_S + 2 * DEFAULT_BUCKET_S)
    assert bounded.expose(token, "feed", "control", "late", "r-late", now=events[-1][0] + 2 * WINDOW) == "accepted"
    assert bounded.per_exposure_entries() == 2
    assert unbounded.per_exposure_entries() > 2 * exposures

    # the journal: a unit's first exposure per route/variant (not one line per exposure) ...
    firsts = [r for r in journal if r["kind"] == "exposure"]
    assert len(firsts) == len({(r["route"], r["variant"], r["unit"]) for r in firsts}) == 2 * UNITS
    # ... and on the ratio route one count line per unit per interval, none on the binary one
    counts = [r for r in journal if r["kind"] == "exposures"]
    assert {r["route"] for r in counts} == {"shop"}
    intervals = math.ceil((events[-1][0] - T0) / 600.0) + 1
    assert len(counts) <= UNITS * intervals
    shop_accepted = len({e[2][4] for e in events if e[1] == 0 and e[2][1] == "shop"})
    assert sum(r["n"] for r in counts) == shop_accepted - UNITS  # every later exposure, counted once
    assert len(firsts) + len(counts) < exposures / 2
    assert len(full_journal) == len(journal)  # the window does not change what is journaled

    # a restart: the journal replays to the same lift
    replayed = OutcomeLedger(SPECS, CONTROLS, (KEY,), window_s=WINDOW, clock=Clock(events[-1][0]))
    statuses = replayed.ingest_many(journal, journal=False)
    assert statuses == {"accepted": len(journal)}
    assert lifts(replayed) == lifts(run(events, WINDOW)[0])  # a fresh run: its first look, as the replay's


def test_an_import_by_request_id_of_an_unjournaled_exposure_is_journaled_as_the_join():
    ledger = OutcomeLedger(SPECS, CONTROLS, (KEY,), window_s=WINDOW, clock=Clock(T0))
    for i, rid in enumerate(("first", "second")):
        token = mint(KEY, "shop", "canary", "u1", T0 + i, exposure_id(rid))
        assert ledger.expose(token, "shop", "canary", "u1", rid, now=T0 + i) == "accepted"
    journal = list(ledger.unjournaled)  # an interval's poll journals the first exposure
    ledger.unjournaled.clear()
    imported = [
        {"kind": "outcome", "metric": "clicks", "value": v, "request_id": r, "t": T0 + 5}
        for r, v in (("first", 2), ("second", 3))
    ]
    assert ledger.ingest_many(imported, journal=False) == {"accepted": 2}  # read from the journal: an import's lines
    ledger.flush_exposure_counts()
    journal += [*imported, *ledger.unjournaled]
    assert [r["kind"] for r in journal] == ["exposure", "outcome", "outcome", "outcome", "exposures"]
    replayed = OutcomeLedger(SPECS, CONTROLS, (KEY,), window_s=WINDOW, clock=Clock(T0))
    assert replayed.ingest_many(journal, journal=False) == {"accepted": 4, "unknown_request": 1}
    assert lifts(replayed) == lifts(ledger)
    clicks = replayed.unit_rewards("shop", "clicks", "ratio")["canary"]
    assert clicks[0] == ["u1"] and list(clicks[1]) == [5.0]


def test_past_the_window_an_exposure_or_its_outcome_is_refused_so_dedup_never_double_counts():
    clock = Clock(T0)
    ledger = OutcomeLedger(SPECS, CONTROLS, (KEY,), window_s=WINDOW, clock=clock)
    old = mint(KEY, "feed", "canary", "u1", T0, exposure_id("r-old"))
    assert ledger.expose(old, "feed", "canary", "u1", "r-old", now=T0) == "accepted"
    later = T0 + WINDOW + DEFAULT_SKEW_S + 2 * DEFAULT_BUCKET_S
    new = mint(KEY, "feed", "control", "u2", later)
    assert ledger.expose(new, "feed", "control", "u2", "r-new", now=later) == "accepted"
    assert ("feed", "canary", "u1", exposure_id("r-old")) not in ledger._seen_exposures  # forgotten
    # a log entry of the forgotten exposure, or an import of it dated inside its window: refused, not recounted
    record = {"kind": "exposure", "route": "feed", "variant": "canary", "unit": "u1", "t": T0, "request_id": "r-old"}
    assert ledger.ingest(record) == "expired"
    backdated = {"kind": "outcome", "exposure": old, "metric": "conversion", "value": 1, "t": T0 + 10}
    assert ledger.ingest(backdated) == "expired"
    assert ledger.ingest({"kind": "outcome", "request_id": "r-old", "metric": "conversion", "value": 1}) == (
        "unknown_request"
    )
    (conv,) = ledger.results("feed")
    assert (conv.units_challenger, conv.challenger_value) == (1, 0.0)


# ---------------------------------------------------------------------- a restart through the gate's file journal

POLICY = """
version: 1
jwt: {issuer: https://auth.test, audience: test, jwks: jwks.json}
routes:
  - name: shop
    match: {path_prefix: /v2/models/shop}
    variants:
      - {name: control, weight: 50, backends: [{url: "http://127.0.0.1:9", region: eu}]}
      - {name: canary, weight: 50, backends: [{url: "http://127.0.0.1:9", region: eu}]}
    metrics:
      - {name: conversion, kind: binary, role: primary, attribution_window_s: 3600}
      - {name: clicks, kind: ratio, role: secondary, attribution_window_s: 3600}
"""


async def test_a_restart_replays_the_compact_journal_to_the_same_lift_and_verdicts(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("COHORTGATE_EXPOSURE_KEY", SECRET)
    policy = parse_policy(POLICY, filename="ledger-bounds.yaml", base_dir=Path("/tmp"))
    journal = tmp_path / "outcomes.jsonl"
    clock = Clock(T0)
    first = OutcomeGate.from_env(policy, journal_path=journal, clock=clock)
    await first.start(InProcessState())
    rng = np.random.default_rng(11)
    served = 0
    for interval in range(6):  # 6 intervals of 10 minutes, 60 units seen ~20 times each
        for k in range(1200):
            unit = int(rng.integers(0, 60))
            variant = ("control", "canary")[unit % 2]
            clock.t = T0 + interval * 600 + k * 0.5
            rid = f"r{interval}-{k}"
            token = mint(KEY, "shop", variant, f"u{unit}", clock.t, exposure_id(rid))
            assert first.ledger.expose(token, "shop", variant, f"u{unit}", rid, clock.t) == "accepted"
            served += 1
            if rng.random() < (0.3 if variant == "canary" else 0.1):
                first.ledger.ingest({"kind": "outcome", "exposure": token, "metric": "clicks", "value": 1})
            if k % 97 == 0:
                first.ledger.ingest({"kind": "outcome", "exposure": token, "metric": "conversion", "value": 1})
        await first.poll()
    before = [r.to_json() for r in first.look("shop")]
    lines = list(read_journal(journal))
    exposure_lines = [r for r in lines if r["kind"] in ("exposure", "exposures")]
    assert len([r for r in exposure_lines if r["kind"] == "exposure"]) == 60  # one per unit
    assert len(exposure_lines) <= 60 * 7 < served / 10  # and a count line per unit per interval

    second = OutcomeGate.from_env(policy, journal_path=journal, clock=clock)
    await second.start(InProcessState())
    after = [r.to_json() for r in second.look("shop")]
    assert after == before
    assert {r["metric"]: r["units"]["challenger"] for r in after} == {"conversion": 30, "clicks": 30}
    clicks = next(r for r in after if r["metric"] == "clicks")
    assert clicks["value"]["challenger"] > clicks["value"]["control"]  # per exposure: the counts came back
