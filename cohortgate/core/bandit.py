"""Adaptive allocation: from each arm's rewards to the weights new units are assigned by (pure).

Three strategies, each a function of per-arm reward tallies (`ArmStats`) to shares of new units:

* **thompson** -- probability matching (Thompson 1933; batched as in Kaufmann, Korda & Munos 2012
  and Chapelle & Li 2011): each arm's share is the posterior probability that it is the best,
  estimated from ``draws`` joint posterior draws. Binary rewards: Beta(1 + successes, 1 + failures);
  mean rewards: Normal(mean, s^2 / n) (the large-sample posterior under a flat prior, s^2 from the
  arm's units, pooled while an arm has fewer than two);
* **ucb** -- UCB1 (Auer, Cesa-Bianchi & Fischer 2002): index = mean + c * sqrt(2 ln N / n), c = 1 for
  binary rewards and the pooled standard deviation for mean rewards; the arm with the highest index
  takes what the floors leave (an arm without units first);
* **epsilon_greedy** -- ``epsilon`` spread evenly, the rest to the best empirical mean (Sutton & Barto
  2018, section 2.2).

Every strategy's shares then pass `floor`: each live arm keeps ``min_share`` of new units, so the
experiment keeps exploring and the data stay valid for inference; `to_weights` turns shares into
the integer percentages the cohort layout takes. "Best" follows the metric's direction.

Bandit-allocated data are not a randomised split at fixed odds: an arm's units were admitted with a
propensity that moved over time, so plain per-arm means are biased toward early luck. `ipw` gives
the inverse-propensity-weighted (Hajek) estimate of each arm's mean reward, with its standard error.

Randomness comes only from the ``numpy.random.Generator`` the caller passes (seeded by the policy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("thompson", "ucb", "epsilon_greedy")
Floats = Sequence[float] | np.ndarray  # numbers in, as a list or an array
DRAWS = 4000  # joint posterior draws per Thompson update: P(best) to about +-0.8 points


@dataclass(frozen=True, slots=True)
class ArmStats:
    """One arm's reward tallies over its units: count, sum and sum of squares of per-unit rewards."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    @classmethod
    def of(cls, values: Iterable[float]) -> ArmStats:
        y = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
        return cls(int(y.size), float(y.sum()), float((y * y).sum()))

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def var(self) -> float:
        """Sample variance of the per-unit rewards (nan below two units)."""
        if self.n < 2:
            return math.nan
        return max(0.0, (self.total_sq - self.total * self.total / self.n) / (self.n - 1))


def _pooled_sd(stats: Sequence[ArmStats]) -> float:
    n = sum(s.n for s in stats)
    if n < 2:
        return 1.0
    total = sum(s.total for s in stats)
    total_sq = sum(s.total_sq for s in stats)
    var = max(0.0, (total_sq - total * total / n) / (n - 1))
    return math.sqrt(var) if var > 0 else 1.0


def _sign(direction: str) -> float:
    return -1.0 if direction == "decrease" else 1.0


def thompson(
    stats: Sequence[ArmStats], kind: str, direction: str, rng: np.random.Generator, draws: int = DRAWS
) -> np.ndarray:
    """P(arm is best) under the posterior, by ``draws`` joint draws (ties broken at random)."""
    k = len(stats)
    if kind == "binary":
        a = np.array([1.0 + s.total for s in stats])
        b = np.array([1.0 + max(0.0, s.n - s.total) for s in stats])
        samples = rng.beta(a, b, size=(draws, k))
    else:
        sd = _pooled_sd(stats)
        means = np.array([s.mean if s.n else 0.0 for s in stats])
        scale = np.array(
            [
                (math.sqrt(s.var if s.n >= 2 and s.var > 0 else sd * sd) / math.sqrt(s.n)) if s.n else 1e6 * sd
                for s in stats
            ]
        )
        samples = rng.normal(means, scale, size=(draws, k))
    samples = _sign(direction) * samples + rng.random((draws, k)) * 1e-12  # random tie-break
    best = np.argmax(samples, axis=1)
    return np.bincount(best, minlength=k) / draws


def ucb(stats: Sequence[ArmStats], kind: str, direction: str) -> np.ndarray:
    """All share to the arm with the highest UCB1 index (split evenly among ties; untried arms first)."""
    k = len(stats)
    untried = [i for i, s in enumerate(stats) if s.n == 0]
    if untried:
        return _split(k, untried)
    n_total = sum(s.n for s in stats)
    c = 1.0 if kind == "binary" else _pooled_sd(stats)
    index = np.array([_sign(direction) * s.mean + c * math.sqrt(2 * math.log(n_total) / s.n) for s in stats])
    return _split(k, list(np.flatnonzero(index >= index.max() - 1e-12)))


def epsilon_greedy(stats: Sequence[ArmStats], direction: str, epsilon: float) -> np.ndarray:
    """``epsilon`` evenly, the rest to the best empirical mean (ties split; untried arms count as best)."""
    k = len(stats)
    untried = [i for i, s in enumerate(stats) if s.n == 0]
    if untried:
        best = untried
    else:
        means = np.array([_sign(direction) * s.mean for s in stats])
        best = list(np.flatnonzero(means >= means.max() - 1e-12))
    return epsilon / k + (1 - epsilon) * _split(k, best)


def _split(k: int, winners: Sequence[int]) -> np.ndarray:
    out = np.zeros(k)
    out[list(winners)] = 1.0 / len(winners)
    return out


def floor(shares: Floats, min_share: float) -> np.ndarray:
    """Every arm keeps ``min_share``; the rest is split in proportion to ``shares``."""
    s = np.asarray(shares, dtype=float)
    k = s.size
    if min_share * k > 1:
        raise ValueError(f"min_share {min_share} leaves nothing for {k} arms")
    total = s.sum()
    s = s / total if total > 0 else np.full(k, 1.0 / k)
    return min_share + (1 - min_share * k) * s


def to_weights(shares: Floats, min_share: float) -> list[int]:
    """Integer percentages summing to 100, each at least ``ceil(100 * min_share)`` (largest remainder)."""
    s = np.asarray(shares, dtype=float)
    k = s.size
    low = math.ceil(min_share * 100 - 1e-9)
    spare = 100 - low * k
    if spare < 0:
        raise ValueError(f"min_share {min_share} leaves nothing for {k} arms")
    extra = np.clip(s - low / 100, 0, None)
    extra = extra / extra.sum() * spare if extra.sum() > 0 else np.full(k, spare / k)
    whole = np.floor(extra).astype(int)
    order = np.argsort(-(extra - whole), kind="stable")
    whole[order[: spare - int(whole.sum())]] += 1
    return [int(low + w) for w in whole]


def shares(
    strategy: str,
    stats: Sequence[ArmStats],
    kind: str,
    direction: str,
    rng: np.random.Generator,
    *,
    epsilon: float = 0.1,
) -> np.ndarray:
    """The strategy's raw shares of new units (before the floor)."""
    if strategy == "thompson":
        return thompson(stats, kind, direction, rng)
    if strategy == "ucb":
        return ucb(stats, kind, direction)
    if strategy == "epsilon_greedy":
        return epsilon_greedy(stats, direction, epsilon)
    raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")


def allocate(
    strategy: str,
    stats: Mapping[str, ArmStats],
    kind: str,
    direction: str,
    min_share: float,
    rng: np.random.Generator,
    *,
    epsilon: float = 0.1,
) -> dict[str, int]:
    """Weights (percent, summing to 100) for the live arms in ``stats``, every one at least the floor."""
    names = list(stats)
    if not names:
        return {}
    if len(names) == 1:
        return {names[0]: 100}
    raw = shares(strategy, [stats[n] for n in names], kind, direction, rng, epsilon=epsilon)
    return dict(zip(names, to_weights(floor(raw, min_share), min_share), strict=True))


def allocate_segments(
    strategy: str,
    stats: Mapping[str, Mapping[str, ArmStats]],
    kind: str,
    direction: str,
    min_share: float,
    rng: np.random.Generator,
    *,
    epsilon: float = 0.1,
    min_units: int = 20,
    segments: Iterable[str] = (),
    pooled: Mapping[str, ArmStats] | None = None,
) -> dict[str, dict[str, int]]:
    """Per segment (a contextual bandit over declared segments): segment -> arm -> weight.

    ``stats`` maps segment -> arm -> tallies; ``segments`` names more segments to weigh (those with no
    units yet); ``pooled`` the route's tallies per live arm (default: all segments summed; its arms
    are the arms weighed). A segment whose arms have fewer than ``min_units`` units in all borrows the
    pooled tallies, so a thin segment starts from what the route as a whole knows instead of from nothing.
    """
    if pooled is None:
        arms = sorted({a for seg in stats.values() for a in seg})
        pooled = {
            a: ArmStats(
                sum(seg.get(a, ArmStats()).n for seg in stats.values()),
                sum(seg.get(a, ArmStats()).total for seg in stats.values()),
                sum(seg.get(a, ArmStats()).total_sq for seg in stats.values()),
            )
            for a in arms
        }
    arms = list(pooled)
    out: dict[str, dict[str, int]] = {}
    for segment in sorted(set(stats) | set(segments)):
        seg = stats.get(segment, {})
        own = {a: seg.get(a, ArmStats()) for a in arms}
        use = own if sum(s.n for s in own.values()) >= min_units else pooled
        out[segment] = allocate(strategy, use, kind, direction, min_share, rng, epsilon=epsilon)
    return out


@dataclass(frozen=True, slots=True)
class Estimate:
    """An arm's mean reward two ways: naive (biased under adaptive allocation) and IPW (Hajek)."""

    arm: str
    units: int
    naive: float
    ipw: float
    ipw_se: float
    ci: tuple[float, float]  # ipw +- z * se (normal approximation)


def ipw(arm: str, rewards: Floats, propensities: Floats, z: float = 1.959963984540054) -> Estimate:
    """The Hajek estimator of an arm's mean reward: sum(y/p) / sum(1/p) over its units, where p is
    the share the arm had when the unit was assigned (Hajek 1971; Horvitz & Thompson 1952), with the
    linearised standard error sqrt(sum(w^2 (y - mu)^2)) / sum(w), w = 1/p."""
    y = np.asarray(rewards, dtype=float)
    p = np.asarray(propensities, dtype=float)
    if y.size == 0:
        return Estimate(arm, 0, math.nan, math.nan, math.nan, (math.nan, math.nan))
    if np.any(p <= 0) or np.any(p > 1):
        raise ValueError("propensities must lie in (0, 1]")
    w = 1.0 / p
    mu = float((w * y).sum() / w.sum())
    se = float(math.sqrt(float((w * w * (y - mu) ** 2).sum())) / w.sum()) if y.size > 1 else math.nan
    return Estimate(arm, int(y.size), float(y.mean()), mu, se, (mu - z * se, mu + z * se))
