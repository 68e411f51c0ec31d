"""Detection benchmark: how many requests a failing canary serves, and how long, before rollback.

For canary error rates of 5 %, 30 % and 100 % (control fails 0.5 %), at a realistic load (500
requests/s through one route, canary at 10 %), the canary starts healthy, fails from a random
moment on ("onset"), and we measure, from onset until the gateway applies the rollback:

* requests the failing canary served, and
* seconds.

Two modes, both drive the real `Controller` with synthetic outcome events (no Envoy, no models):

``sim``    in-process with a simulated clock (fast, many seeds). Events reach the controller 200 ms
           after the request, as Envoy's access-log buffer flushes (``buffer_flush_interval``), and
           the gateway applies a rollback at the tick that decides it.
``redis``  real time against a real redis-server: "gateway" = a RedisStreamSink emitting at the
           load + a RedisState watcher applying weights; controller = `Controller.run` with the
           stream consumer group, leader lock and Redis state. Wall-clock seconds.

    python bench/bench_detection.py                      # sim, 20 seeds per rate
    python bench/bench_detection.py --mode redis --runs 3
    python bench/bench_detection.py --mode both --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cohortgate.controller.loop import Controller, ControllerConfig  # noqa: E402
from cohortgate.controller.simulate import Behaviour, Traffic  # noqa: E402
from cohortgate.core.policy import parse_policy  # noqa: E402
from cohortgate.core.rollout import Phase  # noqa: E402
from cohortgate.store.events import InProcessSink, RedisStreamSink, RedisStreamSource  # noqa: E402
from cohortgate.store.redis import redis_client  # noqa: E402
from cohortgate.store.state import InProcessState, RedisState, effective_policy  # noqa: E402

POLICY = """
version: 1
jwt: {issuer: https://auth.cohortgate.local, audience: cohortgate, jwks: jwks.json}
routes:
  - name: tabular
    match: {model: tabular}
    cohorts: {unit: {claim: sub}, salt: bench}
    variants:
      - {name: control, weight: 90, backends: [{url: "http://127.0.0.1:18101", region: eu}]}
      - {name: canary, weight: 10, backends: [{url: "http://127.0.0.1:18103", region: eu}]}
    guardrails: {max_error_rate: 0.05, max_p99_ms: 250, min_samples: 200, alpha: 0.05}
"""
RATES = (0.05, 0.30, 1.00)
CONTROL_ERRORS = 0.005
RPS = 500
WARMUP_S = 20.0
SLICE_S = 0.1
ALS_DELAY_SLICES = 2  # 200 ms: Envoy's ALS buffer flush interval in gateway/envoyconf.py


def policy():
    return parse_policy(POLICY, filename="bench.yaml", base_dir=ROOT)


# --------------------------------------------------------------------------- simulated clock


async def sim_once(rate: float, seed: int, interval_s: float = 1.0, max_s: float = 300.0) -> tuple | str | None:
    pol = policy()
    now = 1_000.0
    store = InProcessState()
    controller = Controller(
        pol, store, InProcessSink(), clock=lambda: now, config=ControllerConfig(interval_s=interval_s)
    )
    await controller.start()
    traffic = Traffic(
        pol, "tabular", {"control": Behaviour(CONTROL_ERRORS), "canary": Behaviour(CONTROL_ERRORS)}, seed=seed
    )
    store.watch(lambda states: traffic.set_policy(effective_policy(pol, states)))
    import numpy as np

    onset = now + WARMUP_S + float(np.random.default_rng(seed + 7).uniform(0, interval_s))
    per_slice = int(RPS * SLICE_S)
    in_flight: list[list] = []
    next_tick = now + interval_s
    served_at_onset = None
    while now < onset + max_s:
        if served_at_onset is None and now >= onset:
            traffic.behaviours["canary"] = Behaviour(rate)
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
                    return "false alarm"  # rolled back before the failure began (an A/A false positive)
                return traffic.served["canary"] - served_at_onset, now - onset
    return None


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
    ap.add_argument("--mode", choices=("sim", "redis", "both"), default="sim")
    ap.add_argument("--seeds", type=int, default=20, help="simulated runs per error rate")
    ap.add_argument("--runs", type=int, default=3, help="real-time Redis runs per error rate")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report: dict[str, dict] = {}
    if args.mode in ("sim", "both"):

        async def sims():
            return {rate: [await sim_once(rate, seed) for seed in range(args.seeds)] for rate in RATES}

        report["sim"] = {f"{int(rate * 100)}%": summarize(r) for rate, r in asyncio.run(sims()).items()}
    if args.mode in ("redis", "both"):
        results = asyncio.run(redis_runs(args.runs))
        report["redis"] = {f"{int(rate * 100)}%": summarize(r) for rate, r in results.items()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"load {RPS} req/s, canary 10 %, control errors {CONTROL_ERRORS:.1%}, interval 1 s, alpha 0.05, min_samples 200"
    )
    for mode, rows in report.items():
        print(f"\n[{mode}]  canary error rate: requests served by the failing canary / seconds, onset -> rollback")
        for rate, s in rows.items():
            if not s.get("detected"):
                print(f"  {rate:>5}: not detected in {s['runs']} runs")
                continue
            extra = f", pub/sub propagation <= {s['propagation_ms_max']} ms" if "propagation_ms_max" in s else ""
            alarms = f", {s['false_alarms']} rolled back before onset" if s["false_alarms"] else ""
            print(
                f"  {rate:>5}: requests median {s['requests_median']}, max {s['requests_max']}; "
                f"seconds median {s['seconds_median']}, max {s['seconds_max']}  "
                f"(detected in {s['detected']}/{s['runs']} runs{alarms}){extra}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
