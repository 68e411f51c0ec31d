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
* **Absolute limits (guardrails): a one-sided mixture SPRT against the limit.** "The rate of bad
  requests exceeds ``p0``" is tested with Robbins' (1970) mixture of Bernoulli likelihood ratios
  ``prod (p1/p0)^x ((1-p1)/(1-p0))^(n-x)`` over alternatives ``p1 > p0`` (a grid of odds ratios).
  Each factor has mean ``<= 1`` whenever the true rate is ``<= p0``, even a rate that drifts, so
  the product is a test supermartingale and ``1 / max M`` is an always-valid p-value; the set of
  limits it does not reject is a confidence sequence for the rate (Howard et al. 2021). The p99
  guardrail is the same test on "slower than the limit" with ``p0 = 1 %``: p99 <= L exactly when
  at most 1 % of requests take longer than L. The mirrored test (``p1 < p0``) shows a rate is
  *below* a limit.
* **Users, not requests.** Assignment is per user, and users differ (a few fail often, a few send
  most requests), so request outcomes are clustered and a request-level test overstates its
  evidence. Every test's log-evidence is divided by the **design effect** (Kish 1965): the
  cluster-robust (Liang & Zeger 1986; the delta method for ratio metrics, Deng et al. 2018)
  variance of the rate over the binomial one, computed from per-unit totals -- the quasi-likelihood
  dispersion correction (Wedderburn 1974; McCullagh & Nelder 1989, ch. 9). Tempering never adds
  evidence (``M^c <= max(1, M)`` for ``0 < c <= 1``), so every test keeps its level under
  independent requests whatever the correction is; under clustering it removes the overstatement.
* **Sample-ratio mismatch**: Pearson's chi-square (scipy) for the evidence people know, gated by a
  Dirichlet-multinomial Bayes factor (Lindon & Malek 2022), which is always valid too; its
  always-valid p-value is ``1 / max BF`` (a running minimum: it never rises again).

Everything here accepts leading batch dimensions, so the A/A acceptance test can run 100
repetitions in one vectorised call through exactly the code the controller uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

# Prior over the odds ratio of "bad" (failed or slow) between a challenger and control: log-uniform
# on [1.1, 1000]. Only psi > 1 is tested, because only harm triggers a rollback.
DEFAULT_LOG_PSI = np.log(np.geomspace(1.1, 1000.0, 32))


def logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """log sum exp along ``axis`` (numpy only: scipy's array-API wrapper costs ~1 ms a call)."""
    a = np.asarray(a, dtype=float)
    m = np.max(a, axis=axis, keepdims=True)
    finite = np.isfinite(m)
    m = np.where(finite, m, 0.0)
    total = np.sum(np.exp(a - m), axis=axis, keepdims=True)
    out = np.where(finite, np.log(np.maximum(total, 1e-300)) + m, -np.inf)
    return np.squeeze(out, axis=axis)


def log_choose(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """log C(n, k), -inf outside 0 <= k <= n."""
    n = np.asarray(n, dtype=float)
    k = np.asarray(k, dtype=float)
    ok = (k >= 0) & (k <= n)
    kk = np.clip(k, 0, np.maximum(n, 0))
    out = special.gammaln(n + 1) - special.gammaln(kk + 1) - special.gammaln(n - kk + 1)
    return np.where(ok, out, -np.inf)


def fisher_log_lr(
    x: ArrayLike, n1: ArrayLike, n0: ArrayLike, f: ArrayLike, log_psi: np.ndarray = DEFAULT_LOG_PSI
) -> np.ndarray:
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
    log_norm = logsumexp(terms[..., :, None] + y[:, None] * log_psi, axis=-2)
    log_null = log_choose(n1 + n0, f)  # Vandermonde: sum_y C(n1,y) C(n0,f-y) = C(n1+n0, f)
    out = x[..., None] * log_psi - log_norm + log_null[..., None]
    # No information when nobody failed, everybody failed, or one arm is empty.
    empty = (f == 0) | (f == n1 + n0) | (n1 == 0) | (n0 == 0)
    return np.where(empty[..., None], 0.0, out)


def mixture_log(log_lr: np.ndarray) -> np.ndarray:
    """log of the mixture martingale: the average over the (uniform) grid of the likelihood ratios."""
    return logsumexp(log_lr, axis=-1) - math.log(log_lr.shape[-1])


def running_p(log_m: np.ndarray, temper: ArrayLike = 1.0) -> np.ndarray:
    """Always-valid p-values from log mixture martingales along the last axis.

    ``p_t = min(1, min_{s<=t} M_s^-c_s)`` (Ville's inequality; ``c`` the tempering in (0, 1]).
    """
    evidence = np.maximum(np.asarray(log_m, dtype=float), 0.0) * np.asarray(temper, dtype=float)
    return np.minimum(1.0, np.exp(-np.maximum.accumulate(evidence, axis=-1)))


def harm_paths(
    x: ArrayLike,
    n1: ArrayLike,
    n0: ArrayLike,
    f: ArrayLike,
    log_psi: np.ndarray = DEFAULT_LOG_PSI,
    temper: ArrayLike = 1.0,
) -> np.ndarray:
    """Always-valid p-values after each interval; the interval axis is the last input axis.

    ``p[..., t] = min(1, min_{s<=t} M_s^-c_s)``, non-increasing in t (``temper`` is c, broadcast).
    """
    log_lr = np.cumsum(fisher_log_lr(x, n1, n0, f, log_psi), axis=-2)
    return running_p(mixture_log(log_lr), temper)


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

    def update(self, x: int, n1: int, n0: int, f: int, temper: float = 1.0) -> float:
        """Add one interval (``x`` of ``f`` bad outcomes on the challenger); return the p-value.

        ``temper`` (in (0, 1]) is 1 / design effect: how far to trust request-level evidence.
        """
        if not 0 <= x <= min(f, n1) or f - x > n0:
            raise ValueError(f"inconsistent counts x={x} n1={n1} n0={n0} f={f}")
        if 0 < f < n1 + n0 and n1 and n0:  # otherwise the interval carries no information (LR = 1)
            self.log_lr = self.log_lr + fisher_log_lr(x, n1, n0, f, self.log_psi)
        self.intervals += 1
        self.p_value = _tempered_p(self.p_value, float(mixture_log(self.log_lr)), temper)
        return self.p_value

    @property
    def odds_ratio(self) -> float:
        """The grid's maximum-likelihood odds ratio so far (1.0 before any evidence)."""
        if not self.log_lr.any():
            return 1.0
        return float(np.exp(self.log_psi[int(np.argmax(self.log_lr))]))


def _tempered_p(previous: float, log_m: float, temper: float) -> float:
    if not 0.0 < temper <= 1.0:
        raise ValueError(f"temper must be in (0, 1], got {temper}")
    return min(previous, math.exp(-max(log_m, 0.0) * temper))


# --------------------------------------------------------------------------- absolute limits


def limit_log_lr(
    x: ArrayLike, n: ArrayLike, p0: float, log_psi: np.ndarray = DEFAULT_LOG_PSI, above: bool = True
) -> np.ndarray:
    """log Bernoulli likelihood ratio of ``x`` bad in ``n`` under ``p1`` against the limit ``p0``.

    The alternatives are ``odds(p1) = odds(p0) * psi`` for psi on the grid (``above``) or 1/psi (below),
    so only rates on the far side of the limit count as evidence (Robbins 1970). Inputs broadcast;
    the result has one more axis (the grid). A limit of 0 or 1 cannot be exceeded / undershot: 0.
    """
    x = np.asarray(x, dtype=float)
    n = np.asarray(n, dtype=float)
    log_psi = np.asarray(log_psi, dtype=float) * (1.0 if above else -1.0)
    if not 0.0 < p0 < 1.0:
        return np.zeros((*np.broadcast(x, n).shape, log_psi.size))
    logit0 = math.log(p0 / (1 - p0))
    log_p1 = -np.logaddexp(0.0, -(logit0 + log_psi))  # log p1
    log_q1 = -np.logaddexp(0.0, logit0 + log_psi)  # log (1 - p1)
    return np.asarray(x[..., None] * (log_p1 - math.log(p0)) + (n - x)[..., None] * (log_q1 - math.log1p(-p0)))


def limit_paths(
    x: ArrayLike,
    n: ArrayLike,
    p0: float,
    temper: ArrayLike = 1.0,
    above: bool = True,
    log_psi: np.ndarray = DEFAULT_LOG_PSI,
) -> np.ndarray:
    """Always-valid p-values of "the rate is above (below) ``p0``" after each interval (last axis)."""
    log_lr = np.cumsum(limit_log_lr(x, n, p0, log_psi, above), axis=-2)
    return running_p(mixture_log(log_lr), temper)


@dataclass(slots=True)
class LimitTest:
    """Running one-sided mixture SPRT: is the rate of bad outcomes above (or below) ``p0``?

    ``p_value < a`` means the rate is on that side of the limit with confidence 1 - a, at any time
    the controller chooses to look. Mutable: fed one interval at a time; ``p_value`` never rises.
    """

    p0: float
    above: bool = True
    log_psi: np.ndarray = field(default_factory=lambda: DEFAULT_LOG_PSI.copy())
    log_lr: np.ndarray = field(init=False)
    p_value: float = 1.0
    n: int = 0
    bad: int = 0

    _bad: np.ndarray = field(init=False, repr=False)  # log LR of one bad outcome, per alternative
    _good: np.ndarray = field(init=False, repr=False)  # ... and of one good one (the LR is linear in x)

    def __post_init__(self) -> None:
        self.log_lr = np.zeros_like(self.log_psi)
        self._bad = limit_log_lr(1, 1, self.p0, self.log_psi, self.above)
        self._good = limit_log_lr(0, 1, self.p0, self.log_psi, self.above)

    def update(self, x: int, n: int, temper: float = 1.0) -> float:
        if not 0 <= x <= n:
            raise ValueError(f"inconsistent counts x={x} n={n}")
        if n:
            self.log_lr = self.log_lr + (x * self._bad + (n - x) * self._good)
            self.n += n
            self.bad += x
        self.p_value = _tempered_p(self.p_value, float(mixture_log(self.log_lr)), temper)
        return self.p_value


# --------------------------------------------------------------------------- clustering by unit


def design_effect(n_u: ArrayLike, x_u: ArrayLike, singles: ArrayLike = 0, single_bad: ArrayLike = 0) -> np.ndarray:
    """Cluster-robust variance of a ratio ``sum x / sum n`` over its binomial variance (>= 1).

    ``n_u``, ``x_u``: per-unit requests and bad outcomes on the last axis; ``singles`` more units
    with one request each, ``single_bad`` of them bad (outcomes without a unit). The numerator is
    the Liang-Zeger sandwich (CR1, small-sample factor K/(K-1)) for the ratio estimator, i.e. the
    delta method ``sum (x_u - R n_u)^2 / N^2`` (Deng, Knoblich & Lu 2018); the denominator is
    ``R (1 - R) / N``. Kish's design effect; 1 when it cannot be estimated (no bad or no good
    outcomes, fewer than two units). Clipped below at 1: clustering never makes evidence stronger.
    """
    n_u = np.asarray(n_u, dtype=float)
    x_u = np.asarray(x_u, dtype=float)
    singles = np.asarray(singles, dtype=float)
    single_bad = np.asarray(single_bad, dtype=float)
    k = (n_u > 0).sum(-1) + singles
    n = n_u.sum(-1) + singles
    x = x_u.sum(-1) + single_bad
    with np.errstate(invalid="ignore", divide="ignore"):
        r = x / n
        ss = ((x_u - r[..., None] * n_u) ** 2).sum(-1) + single_bad * (1 - r) ** 2 + (singles - single_bad) * r**2
        deff = ss * k / (k - 1) / (r * (1 - r) * n)
    ok = (k >= 2) & (x > 0) & (x < n)
    return np.where(ok, np.maximum(np.nan_to_num(deff, nan=1.0), 1.0), 1.0)


def pooled_design_effect(deff1: ArrayLike, n1: ArrayLike, deff0: ArrayLike, n0: ArrayLike) -> np.ndarray:
    """The design effect of a difference of two arms' rates: each arm's, weighted by its 1/N."""
    deff1, n1, deff0, n0 = (np.asarray(a, dtype=float) for a in (deff1, n1, deff0, n0))
    with np.errstate(invalid="ignore", divide="ignore"):
        w1, w0 = 1 / n1, 1 / n0
        out = (deff1 * w1 + deff0 * w0) / (w1 + w0)
    return np.asarray(np.where((n1 > 0) & (n0 > 0), out, np.maximum(deff1, deff0)))


# --------------------------------------------------------------------------- sample-ratio mismatch


@dataclass(frozen=True, slots=True)
class SrmResult:
    counts: tuple[int, ...]
    expected: tuple[float, ...]  # proportions the weights promise
    chi2: float
    p_chi2: float  # Pearson, fixed-horizon: the familiar number
    p_always_valid: float  # Dirichlet-multinomial: valid under continuous monitoring
    mismatch: bool


def srm_log_bf(counts: ArrayLike, expected: ArrayLike, concentration: float = 100.0) -> np.ndarray:
    """log Bayes factor of a Dirichlet(concentration * expected) mixture against the null ``expected``.

    ``counts`` has the categories on its last axis; leading axes broadcast.
    """
    counts = np.asarray(counts, dtype=float)
    theta = np.asarray(expected, dtype=float)
    theta = theta / theta.sum()
    alpha = concentration * theta
    log_beta_post = special.gammaln(alpha + counts).sum(-1) - special.gammaln((alpha + counts).sum(-1))
    log_beta_prior = special.gammaln(alpha).sum() - special.gammaln(alpha.sum())
    return np.asarray(log_beta_post - log_beta_prior - (counts * np.log(theta)).sum(-1))


def srm_check(counts: Sequence[int], weights: Sequence[float], alpha: float = 1e-3, p_before: float = 1.0) -> SrmResult:
    """Do the assignment counts fit the weights? Mismatch only when both tests reject at ``alpha``.

    Categories with zero weight must have zero counts to be meaningful; callers leave them out.
    ``p_before`` is the always-valid p-value of earlier looks at the same count sequence: the
    result is their running minimum (``1 / max BF``), so it never rises again.
    """
    c = np.asarray(counts, dtype=float)
    w = np.asarray(weights, dtype=float)
    theta = w / w.sum()
    total = c.sum()
    if len(c) < 2 or total == 0:
        return SrmResult(tuple(int(v) for v in c), tuple(theta.tolist()), 0.0, 1.0, min(1.0, p_before), False)
    expected = total * theta
    chi2 = float(((c - expected) ** 2 / expected).sum())  # Pearson; scipy.stats.chisquare, without its overhead
    p = float(special.chdtrc(len(c) - 1, chi2))
    p_av = float(min(1.0, p_before, math.exp(-max(float(srm_log_bf(c, theta)), 0.0))))
    return SrmResult(
        counts=tuple(int(v) for v in c),
        expected=tuple(float(t) for t in theta),
        chi2=float(chi2),
        p_chi2=float(p),
        p_always_valid=p_av,
        mismatch=bool(p < alpha and p_av < alpha),
    )
