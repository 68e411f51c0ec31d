"""Statistics that stay valid while the controller looks every second (pure numpy/scipy).

A fixed-horizon test peeked at every interval rejects a healthy canary sooner or later; these do not.

* **Harm test (error rate, slow-request rate): a mixture SPRT on the conditional likelihood.**
  Within one interval, given how many requests each arm served and how many failed in total, the
  number that failed on the canary is hypergeometric when both arms share one failure rate, and
  Fisher-noncentral-hypergeometric with odds ratio ψ when they do not. The product of these
  likelihood ratios over intervals, averaged over a prior on ψ > 1 (a grid), is a non-negative
  martingale under "no harm", so by Ville's inequality ``P(ever >= 1/alpha) <= alpha``: the
  always-valid p-value is ``min(1, 1 / max_t M_t)``. Conditioning makes it exact for tiny counts
  and zero failures (where the usual normal mSPRT breaks), and valid when the split or the base
  rate changes between intervals (a rollout step, an incident hitting every arm).
* **Latency** uses the same test on "slow" indicators: a request is slow when it exceeds a threshold
  fixed *before* the interval (the control's recent p95), so the threshold is predictable.
* **Sample-ratio mismatch**: Pearson's chi-square (scipy) for the evidence people know, gated by a
  Dirichlet-multinomial Bayes factor (Lindon & Malek 2022), which is always valid too.

Everything here accepts leading batch dimensions, so the A/A acceptance test can run 100
repetitions in one vectorised call through exactly the code the controller uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import special
from scipy import stats as sps

# Prior over the odds ratio of "bad" (failed or slow) between a challenger and control: log-uniform
# on [1.1, 1000]. Only psi > 1 is tested, because only harm triggers a rollback.
DEFAULT_LOG_PSI = np.log(np.geomspace(1.1, 1000.0, 32))


def log_choose(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """log C(n, k), -inf outside 0 <= k <= n."""
    n = np.asarray(n, dtype=float)
    k = np.asarray(k, dtype=float)
    ok = (k >= 0) & (k <= n)
    with np.errstate(invalid="ignore"):
        out = special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(np.maximum(n - k, 0) + 1)
    return np.where(ok, out, -np.inf)


def fisher_log_lr(x, n1, n0, f, log_psi: np.ndarray = DEFAULT_LOG_PSI) -> np.ndarray:
    """log [P_psi(X = x) / P_1(X = x)] for Fisher's noncentral hypergeometric distribution.

    ``x`` bad outcomes on the challenger out of ``n1`` requests, ``f`` bad outcomes in total, ``n0``
    control requests. Inputs broadcast together; the result has one more axis (the psi grid).
    """
    x, n1, n0, f = (np.asarray(a, dtype=np.int64) for a in (x, n1, n0, f))
    x, n1, n0, f = np.broadcast_arrays(x, n1, n0, f)
    log_psi = np.asarray(log_psi, dtype=float)
    y_max = int(np.minimum(f, n1).max(initial=0))
    y = np.arange(y_max + 1, dtype=float)  # support, padded; masked by log_choose's -inf
    terms = log_choose(n1[..., None], y) + log_choose(n0[..., None], f[..., None] - y)  # (..., Y)
    # log sum_y C(n1,y) C(n0,f-y) psi^y, for every psi: (..., G)
    log_norm = special.logsumexp(terms[..., :, None] + y[:, None] * log_psi, axis=-2)
    log_null = log_choose(n1 + n0, f)  # Vandermonde: sum_y C(n1,y) C(n0,f-y) = C(n1+n0, f)
    out = x[..., None] * log_psi - log_norm + log_null[..., None]
    # No information when nobody failed, everybody failed, or one arm is empty.
    empty = (f == 0) | (f == n1 + n0) | (n1 == 0) | (n0 == 0)
    return np.where(empty[..., None], 0.0, out)


def mixture_log(log_lr: np.ndarray) -> np.ndarray:
    """log of the mixture martingale: the average over the (uniform) grid of the likelihood ratios."""
    return special.logsumexp(log_lr, axis=-1) - math.log(log_lr.shape[-1])


def harm_paths(x, n1, n0, f, log_psi: np.ndarray = DEFAULT_LOG_PSI) -> np.ndarray:
    """Always-valid p-values after each interval; the interval axis is the last input axis.

    ``p[..., t] = min(1, min_{s<=t} 1 / M_s)``, non-increasing in t.
    """
    log_lr = np.cumsum(fisher_log_lr(x, n1, n0, f, log_psi), axis=-2)
    log_m = mixture_log(log_lr)
    return np.minimum(1.0, np.exp(-np.maximum.accumulate(np.maximum(log_m, 0.0), axis=-1)))


@dataclass(slots=True)
class HarmTest:
    """Running mixture SPRT for "the challenger is worse than control" (one per metric and variant).

    Mutable on purpose: the controller feeds it one interval at a time. ``p_value`` never rises.
    """

    log_psi: np.ndarray = field(default_factory=lambda: DEFAULT_LOG_PSI.copy())
    log_lr: np.ndarray = field(init=False)
    p_value: float = 1.0
    intervals: int = 0

    def __post_init__(self) -> None:
        self.log_lr = np.zeros_like(self.log_psi)

    def update(self, x: int, n1: int, n0: int, f: int) -> float:
        """Add one interval (``x`` of ``f`` bad outcomes on the challenger); return the p-value."""
        if not 0 <= x <= min(f, n1) or f - x > n0:
            raise ValueError(f"inconsistent counts x={x} n1={n1} n0={n0} f={f}")
        self.log_lr = self.log_lr + fisher_log_lr(x, n1, n0, f, self.log_psi)
        self.intervals += 1
        log_m = float(mixture_log(self.log_lr))
        self.p_value = min(self.p_value, math.exp(-max(log_m, 0.0)))
        return self.p_value

    @property
    def odds_ratio(self) -> float:
        """The grid's maximum-likelihood odds ratio so far (1.0 before any evidence)."""
        if not self.log_lr.any():
            return 1.0
        return float(np.exp(self.log_psi[int(np.argmax(self.log_lr))]))


# --------------------------------------------------------------------------- sample-ratio mismatch


@dataclass(frozen=True, slots=True)
class SrmResult:
    counts: tuple[int, ...]
    expected: tuple[float, ...]  # proportions the weights promise
    chi2: float
    p_chi2: float  # Pearson, fixed-horizon: the familiar number
    p_always_valid: float  # Dirichlet-multinomial: valid under continuous monitoring
    mismatch: bool


def srm_log_bf(counts, expected, concentration: float = 100.0) -> np.ndarray:
    """log Bayes factor of a Dirichlet(concentration * expected) mixture against the null ``expected``.

    ``counts`` has the categories on its last axis; leading axes broadcast.
    """
    counts = np.asarray(counts, dtype=float)
    theta = np.asarray(expected, dtype=float)
    theta = theta / theta.sum()
    alpha = concentration * theta
    log_beta_post = special.gammaln(alpha + counts).sum(-1) - special.gammaln((alpha + counts).sum(-1))
    log_beta_prior = special.gammaln(alpha).sum() - special.gammaln(alpha.sum())
    return log_beta_post - log_beta_prior - (counts * np.log(theta)).sum(-1)


def srm_check(counts: Sequence[int], weights: Sequence[float], alpha: float = 1e-3) -> SrmResult:
    """Do the assignment counts fit the weights? Mismatch only when both tests reject at ``alpha``.

    Categories with zero weight must have zero counts to be meaningful; callers leave them out.
    """
    c = np.asarray(counts, dtype=float)
    w = np.asarray(weights, dtype=float)
    theta = w / w.sum()
    total = c.sum()
    if len(c) < 2 or total == 0:
        return SrmResult(tuple(int(v) for v in c), tuple(theta.tolist()), 0.0, 1.0, 1.0, False)
    chi2, p = sps.chisquare(c, total * theta)
    p_av = float(min(1.0, math.exp(-max(float(srm_log_bf(c, theta)), 0.0))))
    return SrmResult(
        counts=tuple(int(v) for v in c),
        expected=tuple(float(t) for t in theta),
        chi2=float(chi2),
        p_chi2=float(p),
        p_always_valid=p_av,
        mismatch=bool(p < alpha and p_av < alpha),
    )
