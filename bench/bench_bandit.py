"""Bandit allocation benchmark: regret and share of traffic on the best arm, side by side.

Three allocators see the same Bernoulli reward streams (one new unit per request, its conversion
drawn once per arm from a seeded stream, so every allocator faces the same units), updated in
batches of ``--batch`` requests (the controller recomputes weights every ``update_s``, not per request):

* ``cohortgate`` -- `cohortgate.core.bandit.allocate`, the controller's own function, with the
  policy's 5 % floor; a request's arm is drawn from the published weights (the hash layout is a
  uniform draw over units);
* ``mabwiser``  -- MABWiser 2.7 (Fidelity's bandit library) with the matching learning policy
  (ThompsonSampling, UCB1(alpha=1), EpsilonGreedy(0.1)), ``partial_fit`` once per batch and one
  ``predict`` per request; it has no floor;
* ``fixed``     -- an equal split (50/50 with two arms), what a classic A/B test does.

Scenarios: ``stationary2`` (5 % vs 7 %), ``stationary3`` (4 %, 6 %, 12 %), ``drift2`` (5 % vs 8 %,
swapped halfway). Regret is expected regret: the sum over requests of (best arm's rate - chosen
arm's rate), in conversions lost. Means over ``--runs`` runs.

    python bench/bench_bandit.py                 # every scenario, markdown table
    python bench/bench_bandit.py --runs 5 --requests 5000
    python bench/bench_bandit.py --min-share 0  # like for like with MABWiser, which keeps no floor
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cohortgate.core import bandit

SCENARIOS: dict[str, Callable[[int, int], np.ndarray]] = {
    # (requests, arms) -> per-request conversion rate of each arm
    "stationary2": lambda n, _k: np.tile([0.05, 0.07], (n, 1)),
    "stationary3": lambda n, _k: np.tile([0.04, 0.06, 0.12], (n, 1)),
    "drift2": lambda n, _k: np.vstack([np.tile([0.05, 0.08], (n // 2, 1)), np.tile([0.08, 0.05], (n - n // 2, 1))]),
}
STRATEGIES = ("thompson", "ucb", "epsilon_greedy")
MIN_SHARE = 0.05


def _mabwiser(strategy: str, k: int, seed: int):
    from mabwiser.mab import MAB, LearningPolicy

    policy = {
        "thompson": LearningPolicy.ThompsonSampling(),
        "ucb": LearningPolicy.UCB1(alpha=1.0),
        "epsilon_greedy": LearningPolicy.EpsilonGreedy(epsilon=0.1),
    }[strategy]
    return MAB(arms=list(range(k)), learning_policy=policy, seed=seed)


def simulate(
    allocator: str, strategy: str, rates: np.ndarray, batch: int, seed: int, min_share: float = MIN_SHARE
) -> tuple[np.ndarray, np.ndarray]:
    """Per request: (chosen arm, expected regret)."""
    n, k = rates.shape
    outcomes = np.random.default_rng(seed).random((n, k)) < rates  # the same units for every allocator
    rng = np.random.default_rng(seed + 1)
    chosen = np.empty(n, dtype=int)
    succ, count = np.zeros(k), np.zeros(k)
    mab = _mabwiser(strategy, k, seed) if allocator == "mabwiser" else None
    fitted = False
    step = 0
    for start in range(0, n, batch):
        end = min(n, start + batch)
        if allocator == "fixed":
            arms = rng.integers(0, k, end - start)
        elif allocator == "cohortgate":
            step += 1
            stats = {str(a): bandit.ArmStats(int(count[a]), float(succ[a]), float(succ[a])) for a in range(k)}
            w = bandit.allocate(strategy, stats, "binary", "increase", min_share, np.random.default_rng([seed, step]))
            p = np.array([w[str(a)] for a in range(k)], dtype=float) / 100
            arms = rng.choice(k, size=end - start, p=p)
        else:
            assert mab is not None
            if not fitted:
                arms = rng.integers(0, k, end - start)  # mabwiser needs data before its first predict
            else:
                arms = np.array([mab.predict() for _ in range(end - start)])
        chosen[start:end] = arms
        rewards = outcomes[np.arange(start, end), arms].astype(float)
        np.add.at(succ, arms, rewards)
        np.add.at(count, arms, 1.0)
        if mab is not None:
            if fitted:
                mab.partial_fit(list(arms), list(rewards))
            else:
                mab.fit(list(arms), list(rewards))
                fitted = True
    regret = rates.max(axis=1) - rates[np.arange(n), chosen]
    return chosen, regret


def run(scenario: str, requests: int, batch: int, runs: int, min_share: float = MIN_SHARE) -> list[dict]:
    rates = SCENARIOS[scenario](requests, 0)
    best = rates.argmax(axis=1)
    quarters = [requests // 4, requests // 2, 3 * requests // 4, requests]
    rows = []
    for strategy in STRATEGIES:
        for allocator in ("cohortgate", "mabwiser", "fixed"):
            if allocator == "fixed" and strategy != STRATEGIES[0]:
                continue
            t0 = time.process_time()
            regrets, shares = [], []
            for r in range(runs):
                chosen, regret = simulate(allocator, strategy, rates, batch, 1000 * r + 7, min_share)
                regrets.append(regret.sum())
                on_best = chosen == best
                shares.append([on_best[q - requests // 4 : q].mean() for q in quarters])
            rows.append(
                {
                    "scenario": scenario,
                    "allocator": allocator,
                    "strategy": "-" if allocator == "fixed" else strategy,
                    "regret": float(np.mean(regrets)),
                    "regret_sd": float(np.std(regrets)),
                    "best_share": [float(x) for x in np.mean(shares, axis=0)],
                    "cpu_s": time.process_time() - t0,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=200, help="requests between two weight updates")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument(
        "--min-share", type=float, default=MIN_SHARE, help="our floor (MABWiser has none; 0: like for like)"
    )
    ap.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    args = ap.parse_args(argv)
    print(
        f"{args.requests} requests, updates every {args.batch}, {args.runs} runs, min_share {args.min_share} (ours)\n"
    )
    print("| scenario | allocator | strategy | regret (conv. lost) | vs fixed | share on best arm by quarter |")
    print("|---|---|---|---|---|---|")
    for scenario in args.scenarios:
        rows = run(scenario, args.requests, args.batch, args.runs, args.min_share)
        fixed = next(r["regret"] for r in rows if r["allocator"] == "fixed")
        for r in rows:
            quarters = " / ".join(f"{s:.0%}" for s in r["best_share"])
            print(
                f"| {scenario} | {r['allocator']} | {r['strategy']} | {r['regret']:.1f} ± {r['regret_sd']:.1f} "
                f"| {r['regret'] / fixed:.2f}x | {quarters} |"
            )


if __name__ == "__main__":
    main()
