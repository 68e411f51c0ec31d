"""Detection benchmark: false rollbacks of healthy canaries (A/A), and how fast a failing one goes.

Everything drives the real `Controller` (windows, sequential tests, `judge`, the rollout table) with
the project's `Traffic`, on a simulated clock -- no copy of the verdict rules.

``aa``      A/A table: canary identical to control; the share of runs that rolled the canary back,
            with a 95 % Clopper-Pearson interval, per scenario (base error 0.01/0.03/0.05/0.1 against
            ``max_error_rate: 0.05``; 50 and 500 req/s; log-normal sigma 0.4 and 1.0 under
            ``max_p99_ms: 250``; users that differ). Halts (control over a limit) are counted apart:
            they are the intended answer when control itself breaches.
``detect``  the canary starts healthy and fails from a random moment ("onset"); from onset until the
            gateway applies the rollback we count the requests the failing canary served and the
            seconds. 500 req/s, canary 10 %, events reach the controller 200 ms late (Envoy's ALS
            flush). Uses only `Controller.ingest(events)` / `tick()` and `Traffic.events`, so the
            same code measures an older checkout: ``--code DIR`` (for the "before" column).
``redis``   real time against a real redis-server (stream consumer group, leader lock, Redis state).

    python bench/bench_detection.py aa --runs 200 --jobs 2
    python bench/bench_detection.py detect --seeds 20 [--code /tmp/before]
    python bench/bench_detection.py redis --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(os.environ.get("COHORTGATE_CODE") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from cohortgate.controller.loop import Controller, ControllerConfig  # noqa: E402
from cohortgate.controller.simulate import Behaviour, Traffic  # noqa: E402
from cohortgate.core.policy import parse_policy  # noqa: E402
from cohortgate.core.rollout import Phase  # noqa: E402
from cohortgate.store.events import InProcessSink, RedisStreamSink, RedisStreamSource, redis_client  # noqa: E402
from cohortgate.store.state import InProcessState, RedisState, effective_policy  # noqa: E402

POLICY = """
version: 1
jwt: {{issuer: https://auth.cohortgate.local, audience: cohortgate, jwks: jwks.json}}
routes:
  - name: tabular
    match: {{model: tabular}}
    cohorts: {{unit: {{claim: sub}}, salt: bench}}
    variants:
      - {{name: control, weight: {control}, backends: [{{url: "http://127.0.0.1:18101", region: eu}}]}}
      - {{name: canary, weight: {canary}, backends: [{{url: "http://127.0.0.1:18103", region: eu}}]}}
    guardrails: {{max_error_rate: 0.05, max_p99_ms: 250, min_samples: 200, alpha: 0.05}}
"""
RATES = (0.05, 0.30, 1.00)  # redis mode
CONTROL_ERRORS = 0.005  # redis mode
RPS = 500
WARMUP_S = 20.0
SLICE_S = 0.1
ALS_DELAY_SLICES = 2  # 200 ms: Envoy's ALS buffer flush interval


def policy(canary: int = 10):
    return parse_policy(POLICY.format(control=100 - canary, canary=canary), filename="bench.yaml", base_dir=ROOT)


# --------------------------------------------------------------------------- A/A


def aa_scenarios() -> list[dict]:
    """The audit's cases, and users that differ; the ones the old rules failed worst come first."""

    def sc(err: float, rps: int, sigma: float = 0.4, **kw) -> dict:
        name = kw.pop("name", f"error {err:g}, {rps} req/s, sigma {sigma:g}")
        return {"name": name, "error": err, "rps": rps, "sigma": sigma, **kw}

    hetero = {"population": 1500}  # ~20 requests per user in 60 s at 500 req/s: strongly clustered
    return [
        sc(0.05, 500),
        sc(0.01, 500, 1.0, name="error 0.01, 500 req/s, sigma 1.0 (p99 ~205 ms, limit 250)"),
        sc(0.01, 500, users=(0.01, 0.5, 0.0, 0.0), name="1 % of users fail 50 %, 500 req/s", **hetero),
        sc(0.03, 50),
        sc(0.10, 500),
        sc(0.01, 500, users=(0.05, 0.1, 0.0, 0.0), name="5 % of users fail 10 %, 500 req/s", **hetero),
        sc(0.01, 500),
        sc(0.03, 500),
        sc(0.01, 50),
        sc(0.05, 50),
        sc(0.10, 50),
        sc(0.01, 50, 1.0, name="error 0.01, 50 req/s, sigma 1.0 (p99 ~205 ms, limit 250)"),
        sc(0.01, 500, 1.0, users=(0.01, 0.5, 1.5, 0.5), name="1 % fail 50 % + heavy users + per-user latency",
           **hetero),
    ]  # fmt: skip


def _aa_chunk(args: tuple[dict, list[int], float]) -> list[tuple]:
    from cohortgate.controller.simulate import Users, run_controller

    logging.disable(logging.CRITICAL)  # control-breach alerts are counted, not printed
    sc, seeds, seconds = args
    pol = policy(10)
    same = Behaviour(sc["error"], median_ms=20.0, sigma=sc["sigma"])
    users = Users(*sc["users"]) if "users" in sc else None

    async def go():
        out = []
        for seed in seeds:
            o = await run_controller(
                pol,
                {"control": same, "canary": same},
                seconds=seconds,
                rps=sc["rps"],
                seed=seed,
                users=users,
                population=sc.get("population", 20_000),
            )
            out.append((o.rolled_back_at, o.halted_at, o.reason))
        return out

    return asyncio.run(go())


def aa_table(runs: int, seconds: float, jobs: int, only: list[int] | None = None) -> list[dict]:
    from scipy import stats as sps

    rows = []
    scenarios = aa_scenarios()
    with ProcessPoolExecutor(jobs) as pool:
        for sc in [scenarios[i - 1] for i in only] if only else scenarios:
            chunks = [list(range(i, runs, jobs * 4)) for i in range(jobs * 4)]
            results = [r for part in pool.map(_aa_chunk, [(sc, c, seconds) for c in chunks]) for r in part]
            rolled = sum(r[0] is not None for r in results)
            halted = sum(r[1] is not None for r in results)
            ci = sps.binomtest(rolled, len(results), 0.05).proportion_ci(0.95, method="exact")
            reasons = sorted({r[2].split(" (")[0][:60] for r in results if r[0] is not None})
            rows.append(
                {
                    "scenario": sc["name"],
                    "runs": len(results),
                    "rolled_back": rolled,
                    "rate": rolled / len(results),
                    "ci95": (round(ci.low, 4), round(ci.high, 4)),
                    "halted": halted,
                    "reasons": reasons,
                }
            )
            print(_aa_line(rows[-1]), flush=True)
    return rows


def _aa_line(r: dict) -> str:
    lo, hi = r["ci95"]
    return (
        f"  {r['scenario']:<58} {r['rolled_back']:>3}/{r['runs']:<4} {100 * r['rate']:5.1f} %  "
        f"[{100 * lo:4.1f}, {100 * hi:4.1f}]  halted {r['halted']}"
    )


# --------------------------------------------------------------------------- detection


DETECT = {
    "errors 0.02 vs 0.01": Behaviour(0.02),
    "errors 0.05 vs 0.01": Behaviour(0.05),
    "errors 0.31 vs 0.01": Behaviour(0.31),
    "latency 1.5x": Behaviour(0.01, median_ms=30.0),
}


async def sim_once(after: Behaviour, seed: int, interval_s: float = 1.0, max_s: float = 300.0) -> tuple | str | None:
    """One detection run through `Controller.ingest` / `tick` (APIs an older checkout has too)."""
    pol = policy(10)
    now = 1_000.0
    store = InProcessState()
    controller = Controller(
        pol, store, InProcessSink(), clock=lambda: now, config=ControllerConfig(interval_s=interval_s)
    )
    await controller.start()
    healthy = Behaviour(0.01)
    traffic = Traffic(pol, "tabular", {"control": healthy, "canary": healthy}, seed=seed)
    store.watch(lambda states: traffic.set_policy(effective_policy(pol, states)))
    onset = now + WARMUP_S + float(np.random.default_rng(seed + 7).uniform(0, interval_s))
    per_slice = int(RPS * SLICE_S)
    in_flight: list[list] = []
    next_tick = now + interval_s
    served_at_onset = None
    while now < onset + max_s:
        if served_at_onset is None and now >= onset:
            traffic.behaviours["canary"] = after
            served_at_onset = traffic.served.get("canary", 0)
        in_flight.append(traffic.events(per_slice, now, now + SLICE_S))
        if len(in_flight) > ALS_DELAY_SLICES:
            controller.ingest(in_flight.pop(0), now)
        now = round(now + SLICE_S, 6)
        if now >= next_tick:
            next_tick += interval_s
            await controller.tick()
            if controller.states["tabular"].variants["canary"].phase is Phase.ROLLED_BACK:
                if served_at_onset is None:
                    return "false alarm"  # rolled back before the failure began
                return traffic.served["canary"] - served_at_onset, now - onset
    return None


def _detect_chunk(args: tuple[str, list[int]]) -> list:
    name, seeds = args

    async def go():
        return [await sim_once(DETECT[name], seed) for seed in seeds]

    return asyncio.run(go())


def detect_table(seeds: int, jobs: int) -> dict[str, dict]:
    out = {}
    with ProcessPoolExecutor(jobs) as pool:
        for name in DETECT:
            chunks = [list(range(i, seeds, jobs)) for i in range(jobs)]
            results = [r for part in pool.map(_detect_chunk, [(name, c) for c in chunks]) for r in part]
            out[name] = summarize(results)
            print(f"  {name:<22} {_detect_line(out[name])}", flush=True)
    return out


def _detect_line(s: dict) -> str:
    if not s.get("detected"):
        return f"not detected in {s['runs']} runs ({s.get('false_alarms', 0)} false alarms)"
    alarms = f", {s['false_alarms']} rolled back before onset" if s["false_alarms"] else ""
    return (
        f"requests median {s['requests_median']:>6}, max {s['requests_max']:>6}; seconds median "
        f"{s['seconds_median']:>6}, max {s['seconds_max']:>6}  ({s['detected']}/{s['runs']} detected{alarms})"
    )


# --------------------------------------------------------------------------- real Redis, wall clock


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def redis_once(url: str, rate: float, seed: int, interval_s: float = 1.0) -> tuple | str | None:
    pol = policy()
    client = redis_client(url)
    await client.flushall()
    traffic = Traffic(
        pol, "tabular", {"control": Behaviour(CONTROL_ERRORS), "canary": Behaviour(CONTROL_ERRORS)}, seed=seed
    )
    gw_state = RedisState(url)
    applied: dict[str, float] = {}

    def apply(states):
        eff = effective_policy(pol, states)
        traffic.set_policy(eff)
        if not eff.by_name["tabular"].variants[1].enabled:
            applied.setdefault("at", time.time())

    await gw_state.start()
    gw_state.watch(apply)
    sink = RedisStreamSink(url)
    await sink.start()
    reader = redis_client(url, timeout_s=interval_s + 2)
    from cohortgate.controller.leader import RedisLeader

    controller = Controller(
        pol,
        RedisState(url),
        RedisStreamSource(reader, consumer="bench"),
        leader=RedisLeader(client),
        config=ControllerConfig(interval_s=interval_s),
        name="bench",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    onset = time.time() + 5.0
    served_at_onset = None
    per_slice = int(RPS * SLICE_S)
    result = None
    try:
        while time.time() < onset + 60:
            now = time.time()
            if served_at_onset is None and now >= onset:
                traffic.behaviours["canary"] = Behaviour(rate)
                served_at_onset = traffic.served.get("canary", 0)
            # Envoy's ALS delivers in ~200 ms batches; emitting per 100 ms slice is close enough
            for e in traffic.events(per_slice, now, now + SLICE_S):
                sink.emit(e)
            if "at" in applied:
                if served_at_onset is not None:
                    audit = [r for r in await controller.store.audit("tabular") if r["action"] == "rollback"]
                    propagation = applied["at"] - audit[0]["ts"] if audit else float("nan")
                    result = (traffic.served["canary"] - served_at_onset, applied["at"] - onset, propagation)
                else:
                    result = "false alarm"
                break
            await asyncio.sleep(max(0.0, now + SLICE_S - time.time()))
    finally:
        stop.set()
        await task
        await sink.close()
        await gw_state.close()
        await controller.store.close()
        await reader.aclose()
        await client.aclose()
    return result


async def redis_runs(runs: int) -> dict[float, list]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            url = f"redis://127.0.0.1:{port}/0"
            return {rate: [await redis_once(url, rate, seed) for seed in range(runs)] for rate in RATES}
        finally:
            proc.terminate()
            proc.wait(5)


# --------------------------------------------------------------------------- report


def summarize(results: list) -> dict:
    ok = [r for r in results if isinstance(r, tuple)]
    false_alarms = sum(r == "false alarm" for r in results)
    if not ok:
        return {"runs": len(results), "detected": 0, "false_alarms": false_alarms}
    reqs = [r[0] for r in ok]
    secs = [r[1] for r in ok]
    out = {
        "runs": len(results),
        "detected": len(ok),
        "false_alarms": false_alarms,
        "requests_median": statistics.median(reqs),
        "requests_max": max(reqs),
        "seconds_median": round(statistics.median(secs), 2),
        "seconds_max": round(max(secs), 2),
    }
    if len(ok[0]) > 2:
        out["propagation_ms_max"] = round(1000 * max(r[2] for r in ok), 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("aa", "detect", "redis"), nargs="?", default="detect")
    ap.add_argument("--runs", type=int, default=200, help="A/A runs per scenario (redis: runs per rate)")
    ap.add_argument("--seconds", type=float, default=240.0, help="length of one A/A run (simulated)")
    ap.add_argument("--seeds", type=int, default=20, help="detection runs per case")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--only", help="A/A: comma-separated scenario numbers (1-based), default all")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args()
    print(f"code: {ROOT}")
    if args.mode == "aa":
        print(
            f"A/A: {args.runs} runs of {args.seconds:g} s per scenario, canary 10 %, alpha 0.05, "
            "max_error_rate 0.05, max_p99_ms 250; rolled back / runs, rate, 95 % interval"
        )
        only = [int(i) for i in args.only.split(",")] if args.only else None
        result: object = aa_table(args.runs, args.seconds, args.jobs, only)
    elif args.mode == "detect":
        print(f"detection: {RPS} req/s, canary 10 %, control errors 1 %, ALS delay 200 ms, {args.seeds} runs each")
        result = detect_table(args.seeds, args.jobs)
    else:
        results = asyncio.run(redis_runs(args.runs))
        result = {f"{int(rate * 100)}%": summarize(r) for rate, r in results.items()}
        for rate, s in result.items():
            print(f"  {rate:>5}: {_detect_line(s)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
