"""Segment comparisons: is a challenger worse than control inside one segment, and are a model's
positive-prediction rates fair across a segment's values? (pure numpy/scipy)

* **Worse beyond a margin, in one segment: the conditional mixture SPRT of `stats.HarmTest`,
  shifted to the margin.** Within an interval, given both arms' request counts and the total bad
  outcomes, the challenger's bad count is Fisher-noncentral-hypergeometric with odds ratio psi.
  `MarginHarmTest` tests ``H0: psi <= psi0`` (``psi0 = 1 + margin``) against a grid of
  ``psi = psi0 * g`` (``g`` on `stats.DEFAULT_LOG_PSI`): the likelihood ratio ``P_psi / P_psi0`` is
  `stats.fisher_log_lr` at ``psi`` minus at ``psi0``. The family has a monotone likelihood ratio in
  the count, so for every true ``psi <= psi0`` each factor has mean at most 1: the mixture is a test
  supermartingale and ``1 / max M`` an always-valid p-value (Ville). ``margin = 0`` is `HarmTest`.
  The controller runs one per (challenger, segment value, metric) and rejects at
  ``alpha / (number of them)`` (Bonferroni), so the chance that *any* segment of a healthy
  challenger ever trips stays under ``alpha``.
* **The four-fifths rule** (EEOC Uniform Guidelines 1978, 29 CFR 1607.4(D)): the positive rate of
  the least-favoured value of a segment over that of the most-favoured must be at least ``floor``
  (0.8). The rates are estimates, so the rule trips only when the *upper* confidence bound of the
  ratio is under the floor. The bound is the Katz log-ratio interval (Katz et al. 1978: standard
  error ``sqrt(1/x1 - 1/n1 + 1/x2 - 1/n2)``) made always-valid by the two-sided normal-mixture
  boundary (Robbins 1970; Howard et al. 2021, eq. 14): with information ``V = 1 / se^2``, the
  half-width is ``sqrt((V + rho) log((V + rho) / (rho alpha^2))) / V``, which holds at every
  look (asymptotically, as the log-ratio is asymptotically normal), not only at a fixed horizon.
  Every pair of values is a candidate (the pair is chosen from the data), so ``alpha`` is divided
  by the number of pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from cohortgate.core.stats import DEFAULT_LOG_PSI, fisher_log_lr, mixture_log


@dataclass(slots=True)
class MarginHarmTest:
    """Running mixture SPRT of "the challenger's odds of a bad outcome exceed control's by more than
    ``margin``" (one per segment value and metric). Mutable: fed one interval at a time."""

    margin: float = 0.0
    log_lr: np.ndarray = field(init=False)
    p_value: float = 1.0
    n: int = 0  # challenger requests seen
    bad: int = 0
    n0: int = 0  # control requests seen
    bad0: int = 0
    _grid: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        self._grid = np.concatenate([[math.log1p(self.margin)], math.log1p(self.margin) + DEFAULT_LOG_PSI])
        self.log_lr = np.zeros(DEFAULT_LOG_PSI.size)

    def update(self, x: int, n1: int, n0: int, f: int) -> float:
        """One interval: ``x`` of ``f`` bad outcomes on the challenger (``n1`` requests; control ``n0``)."""
        if not 0 <= x <= min(f, n1) or f - x > n0:
            raise ValueError(f"inconsistent counts x={x} n1={n1} n0={n0} f={f}")
        self.n, self.bad, self.n0, self.bad0 = self.n + n1, self.bad + x, self.n0 + n0, self.bad0 + f - x
        if 0 < f < n1 + n0 and n1 and n0:
            lr = fisher_log_lr(x, n1, n0, f, self._grid)
            self.log_lr = self.log_lr + (lr[1:] - lr[0])
            self.p_value = min(self.p_value, math.exp(-max(float(mixture_log(self.log_lr)), 0.0)))
        return self.p_value

    def to_json(self) -> dict[str, float | int]:
        return {
            "p_value": float(f"{self.p_value:.3g}"),
            "requests": self.n,
            "bad": self.bad,
            "rate": round(self.bad / self.n, 6) if self.n else 0.0,
            "control_requests": self.n0,
            "control_bad": self.bad0,
            "control_rate": round(self.bad0 / self.n0, 6) if self.n0 else 0.0,
        }


DEFAULT_RHO = 100.0  # the normal mixture's variance (in information units): tightest near se ~ 0.1


def mixture_half_width(information: float, alpha: float, rho: float = DEFAULT_RHO) -> float:
    """Half-width of the two-sided always-valid normal-mixture interval at information ``V``."""
    v = information
    return math.sqrt((v + rho) * math.log((v + rho) / (rho * alpha**2))) / v


@dataclass(frozen=True, slots=True)
class ImpactRatio:
    """The four-fifths rule on one segment: the lowest positive rate over the highest."""

    low: str  # the value with the lowest positive rate
    high: str
    ratio: float  # point estimate
    upper: float  # always-valid upper confidence bound of the ratio
    rates: Mapping[str, float]
    counts: Mapping[str, tuple[int, int]]  # value -> (positives, total)

    def to_json(self) -> dict[str, object]:
        return {
            "low": self.low,
            "high": self.high,
            "ratio": round(self.ratio, 6),
            "upper": round(self.upper, 6),
            "rates": {k: round(v, 6) for k, v in self.rates.items()},
            "counts": {k: list(v) for k, v in self.counts.items()},
        }


def impact_ratio(counts: Mapping[str, tuple[int, int]], alpha: float, min_total: int = 100) -> ImpactRatio | None:
    """The least-favoured value's positive rate over the most-favoured's, with an always-valid upper
    bound at level ``alpha`` (split over every pair of values); None with fewer than two values having
    ``min_total`` requests and a positive each (a rate of 0 has no log-ratio: the bound is then the
    continuity-corrected one, half a positive added)."""
    usable = {k: (x, n) for k, (x, n) in counts.items() if n >= min_total}
    if len(usable) < 2:
        return None
    rates = {k: x / n for k, (x, n) in usable.items()}
    high = max(rates, key=lambda k: (rates[k], k))
    low = min(rates, key=lambda k: (rates[k], k))
    if rates[high] == 0:
        return None
    (x1, n1), (x2, n2) = usable[low], usable[high]
    c1, c2 = max(x1, 0.5), max(x2, 0.5)  # Haldane's half for an empty cell
    log_ratio = math.log((c1 / n1) / (c2 / n2))
    var = max(1 / c1 - 1 / n1 + 1 / c2 - 1 / n2, 1e-12)
    pairs = len(usable) * (len(usable) - 1) / 2
    upper = math.exp(log_ratio + mixture_half_width(1 / var, alpha / pairs))
    return ImpactRatio(low, high, rates[low] / rates[high], upper, rates, usable)
