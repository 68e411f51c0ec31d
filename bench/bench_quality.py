"""Quality guardrails benchmark (issue 20): A/A false trips and detection delays, through the controller's own code.

``aa``      A/A runs, the share that tripped any quality signal, with a 95 % Clopper-Pearson interval:
            * drift: control and canary report inputs (one numeric, one categorical feature) and
              outputs from one distribution, 100 rows a second each, 15 looks (``min_samples: 200``,
              a 10 s window) -- `QualityMonitor.verdicts`, as the loop calls it;
            * segments: 3 device values (ios, android, other), 5 % errors on both arms, 100 requests
              a second per arm split over the values, 120 one-second intervals, the segment tests
              fed the same `SegmentWindows` batches the loop feeds them.
``detect``  planted scenarios through the whole `Controller` (tests/controller/quality_sim.py):
            a canary worse only on android (8 % vs 4.5 %, 1 % on ios: equal on average), a canary whose
            input mean moves by 0.5 sd at t, a control whose input mean moves by 1 sd at t (fallback
            named), a canary whose android positive rate is half its ios one. Per seed: canary
            requests (or reports) from the onset until the signal.

    python bench/bench_quality.py aa --runs 1000
    python bench/bench_quality.py detect --seeds 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import beta

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cohortgate.controller.quality import QualityMonitor
from cohortgate.controller.windows import Counts, bins_of
from cohortgate.core.rollout import initial_state
from cohortgate.core.sketch import CategoricalSketch, NumericSketch, QualityReport
from tests.controller.quality_sim import EDGES, SEGMENTS, Behaviour, QualitySim, quality_policy


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    lo = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
    return lo, hi


def aa_drift(runs: int, seed: int = 1) -> int:
    policy = quality_policy(quality="{min_samples: 200}")
    route = policy.by_name["tabular"]
    state = initial_state(route)
    rng = np.random.default_rng(seed)
    trips = 0
    for _ in range(runs):
        monitor = QualityMonitor(policy, window_s=10)
        for t in range(15):
            for name in ("control", "canary"):
                c = rng.choice(["a", "b", "c"], size=100, p=[0.5, 0.3, 0.2])
                inputs = {"x": NumericSketch.of(rng.normal(0, 1, 100), EDGES), "c": CategoricalSketch.of(c, "abc")}
                outputs = {"y": NumericSketch.of(rng.normal(0, 1, 100), EDGES)}
                monitor.add_report(QualityReport("tabular", name, t, t + 1, inputs, outputs, route="tabular"))
            if monitor.verdicts(route, state, None, t + 1):
                trips += 1
                break
    return trips


def aa_segments(runs: int, seed: int = 2, intervals: int = 120, per_arm: int = 100, error: float = 0.05) -> int:
    policy = quality_policy(quality=SEGMENTS)
    route = policy.by_name["tabular"]
    state = initial_state(route)
    rng = np.random.default_rng(seed)
    trips = 0
    latency_bin = int(bins_of(np.array([5.0]))[0])
    for _ in range(runs):
        monitor = QualityMonitor(policy)
        sw = monitor.routes["tabular"].segments
        keys = list(sw.batch)
        for t in range(intervals):
            for name in ("control", "canary"):
                n = rng.multinomial(per_arm, [1 / len(keys)] * len(keys))
                for key, nk in zip(keys, n, strict=True):
                    hist = np.zeros_like(sw.batch[key][name].hist)
                    hist[latency_bin] = nk
                    sw.batch[key][name].merge(Counts(int(nk), int(rng.binomial(nk, error)), hist))
            if monitor.verdicts(route, state, None, float(t)):
                trips += 1
                break
    return trips


async def detect_one(kind: str, seed: int) -> float | None:
    onset = 1_010.0
    if kind == "segment":
        control = Behaviour(error=lambda t, d: 0.045)
        canary = Behaviour(error=lambda t, d: 0.045 if t < onset else 0.08 if d == "android" else 0.01)
        sim = QualitySim(quality_policy(quality=SEGMENTS), {"control": control, "canary": canary}, seed=seed)
        sim.rows = 10
    elif kind == "input_drift":
        canary = Behaviour(input_mean=lambda t: 0.5 if t >= onset else 0.0)
        sim = QualitySim(quality_policy(), {"control": Behaviour(), "canary": canary}, seed=seed)
    elif kind == "control_drift":
        moving = Behaviour(input_mean=lambda t: 1.0 if t >= onset else 0.0)
        sim = QualitySim(
            quality_policy((100, 0), "{fallback: canary}"), {"control": moving, "canary": moving}, seed=seed
        )
    else:
        zero = lambda t, d: 0.0  # noqa: E731
        canary = Behaviour(error=zero, positive=lambda t, d: 0.25 if d == "android" and t >= onset else 0.5)
        sim = QualitySim(
            quality_policy(quality=SEGMENTS), {"control": Behaviour(error=zero), "canary": canary}, seed=seed
        )
    await sim.start()
    base = 0
    while sim.now < onset:
        await sim.run(1)
        base = sim.requests.get("canary", 0) if kind != "control_drift" else int(sim.now)
    if sim.changes:
        return None  # a trip before the onset: counted by the A/A table, not here
    await sim.run(300, until=lambda s: bool(s.changes))
    if not sim.changes:
        return float("inf")
    if kind in ("input_drift", "control_drift"):
        return sim.now - onset  # one-second reports after the onset
    return float(sim.requests.get("canary", 0) - base)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["aa", "detect"])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    if args.mode == "aa":
        for name, fn, level in (("drift", aa_drift, 0.05 / 4), ("segments", aa_segments, 0.05 / 2)):
            t0 = time.perf_counter()
            k = fn(args.runs)
            lo, hi = clopper_pearson(k, args.runs)
            print(
                f"A/A {name:9s} runs={args.runs} trips={k} rate={k / args.runs:.4f} "
                f"95% CI [{lo:.4f}, {hi:.4f}]  (its alpha share {level:.4f}, route alpha 0.05)  "
                f"{time.perf_counter() - t0:.0f} s"
            )
        return
    units = {
        "segment": "canary requests",
        "input_drift": "reports",
        "control_drift": "reports",
        "impact": "canary requests",
    }
    for kind in ("segment", "input_drift", "control_drift", "impact"):
        delays = [asyncio.run(detect_one(kind, 1000 + s)) for s in range(args.seeds)]
        got = sorted(d for d in delays if d is not None)
        missed = sum(1 for d in got if d == float("inf"))
        finite = [d for d in got if d != float("inf")]
        print(
            f"{kind:14s} seeds={args.seeds} caught={len(finite)} missed={missed} early={args.seeds - len(got)}  "
            f"median {statistics.median(finite):.0f}  max {max(finite):.0f} {units[kind]} after the onset"
        )


if __name__ == "__main__":
    main()
