"""The lift of a challenger over control on an outcome metric, valid while people watch (pure numpy).

Everything is computed from **per-unit** totals: a unit's outcomes are summed before any test, so
a user with many events is one observation, not many (assignment is per unit; request-level
variances overstate the evidence when users differ). Each arm is summarised by `Moments`: sums
over units of the outcome ``y``, a denominator ``d`` (1 per unit for ``binary``/``mean``; the
unit's exposures for ``ratio``) and an optional pre-exposure covariate ``x``, with their squares
and cross products. Leading axes broadcast, so a simulation runs thousands of experiments and
looks in one call through exactly these functions.

* **Estimators.** ``binary``: the share of units that converted (variance ``p(1-p)``); ``mean``:
  the mean per unit of the summed value (sample variance); ``ratio``: ``sum y / sum d`` with the
  **delta method** (Deng, Knoblich & Lu 2018, "Applying the delta method in metric analytics"):
  the unit's linearisation ``(y - R d) / mean(d)`` carries the variance. ``binary`` and ``mean``
  are the ratio with ``d = 1``, so one formula serves all three.
* **CUPED** (Deng, Xu, Kohavi & Walker 2013): with a pre-exposure covariate ``x``, each arm's
  estimate becomes ``R - theta (mean_a(x) - mean(x))`` with ``theta`` the pooled within-arm
  regression slope of the linearisation on ``x``; the lift then equals the ANCOVA coefficient
  and its variance shrinks by about ``1 - rho^2``.
* **Absolute and relative lift.** ``R1 - R0`` with variance ``v1 + v0``; ``R1 / R0 - 1`` by the
  delta method, ``v1 / R0^2 + R1^2 v0 / R0^4``.
* **Fixed horizon:** Wald intervals ``lift +- z_{1-alpha/2} se`` (what statsmodels and GrowthBook's
  frequentist engine print) -- valid only if looked at once.
* **Always valid:** the two-sided normal-mixture confidence sequence of Howard, Ramdas, McAuliffe &
  Sekhon (2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences", eq. 14) in its
  asymptotic form (Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas 2021, "Time-uniform central limit
  theory and asymptotic confidence sequences"): with ``V`` the variance of the estimate after
  ``t`` units and ``t*`` the planned units, ``r = eta t / t*``,
  ``half-width^2 = V (1 + 1/r) (2 log(1/alpha) + log(1 + r))``, where
  ``eta = 2 log(1/alpha) + log(1 + 2 log(1/alpha))`` makes it tightest at ``t*``. Its dual is the
  mixture SPRT of Johari, Pekelis & Walsh (2017) with prior variance ``tau^2 = r V``; the
  always-valid p-value is ``1 / max Lambda``. The chance that it ever excludes the true lift, over
  every look, is at most alpha (asymptotically; `MIN_UNITS` per arm is the burn-in).
* **Several challengers:** Bonferroni (``alpha / k`` per challenger) for the sequences -- the union
  bound holds over all looks; Holm (1979) for fixed-horizon p-values.

Decisions (`decide`) read the sequence only; an interval that crosses nothing at the planned size
is **inconclusive**, never a win.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

Kind = Literal["binary", "mean", "ratio"]
KINDS: tuple[Kind, ...] = ("binary", "mean", "ratio")
Direction = Literal["increase", "decrease"]
Role = Literal["primary", "secondary", "guardrail"]
MIN_UNITS = 100  # per arm before a sequence says anything: the normal approximation's burn-in


def _f(a: ArrayLike) -> np.ndarray:
    return np.asarray(a, dtype=float)


@dataclass(frozen=True, slots=True)
class Moments:
    """One arm's sums over units (arrays or floats; leading axes broadcast).

    ``y``: the unit's summed outcome; ``d``: its denominator (1 for binary/mean); ``x``: its
    pre-exposure covariate (0 when there is none).
    """

    n: np.ndarray
    sy: np.ndarray
    syy: np.ndarray
    sd: np.ndarray
    sdd: np.ndarray
    syd: np.ndarray
    sx: np.ndarray
    sxx: np.ndarray
    sxy: np.ndarray
    sdx: np.ndarray


def unit_moments(
    y: ArrayLike,
    d: ArrayLike | None = None,
    x: ArrayLike | None = None,
    where: ArrayLike | None = None,
    cumulative: bool = False,
) -> Moments:
    """`Moments` of per-unit values along the last axis (units); ``where`` selects this arm's units.

    ``cumulative``: running sums over the unit axis instead (entry ``i`` summarises units ``0..i``),
    for simulations that look after every batch of arrivals.
    """
    y = _f(y)
    one = np.ones_like(y)
    d = one if d is None else np.broadcast_to(_f(d), y.shape)
    x = np.zeros_like(y) if x is None else np.broadcast_to(_f(x), y.shape)
    w = one if where is None else np.broadcast_to(np.asarray(where, dtype=float), y.shape)
    reduce = (lambda a: np.cumsum(a, axis=-1)) if cumulative else (lambda a: np.sum(a, axis=-1))
    wy, wd, wx = w * y, w * d, w * x
    return Moments(
        n=reduce(w),
        sy=reduce(wy),
        syy=reduce(wy * y),
        sd=reduce(wd),
        sdd=reduce(wd * d),
        syd=reduce(wy * d),
        sx=reduce(wx),
        sxx=reduce(wx * x),
        sxy=reduce(wx * y),
        sdx=reduce(wd * x),
    )


def take(m: Moments, index: np.ndarray | Sequence[int] | int) -> Moments:
    """The moments at some positions of the last axis (e.g. the looks of a cumulative summary)."""
    return Moments(*(np.take(getattr(m, f), index, axis=-1) for f in Moments.__slots__))


@dataclass(frozen=True, slots=True)
class _Arm:
    mean: np.ndarray  # R = mean(y) / mean(d)
    var_l: np.ndarray  # per-unit variance of the linearisation (y - R d) / mean(d)
    cov_lx: np.ndarray  # its covariance with x
    var_x: np.ndarray
    mean_x: np.ndarray
    n: np.ndarray


def _arm(m: Moments, ddof: int) -> _Arm:
    with np.errstate(invalid="ignore", divide="ignore"):
        n = _f(m.n)
        ybar, dbar, xbar = _f(m.sy) / n, _f(m.sd) / n, _f(m.sx) / n
        k = n - ddof

        def cov(sab: ArrayLike, a: np.ndarray, b: np.ndarray) -> np.ndarray:
            out: np.ndarray = (_f(sab) - n * a * b) / k
            return out

        vyy, vdd, vyd = cov(m.syy, ybar, ybar), cov(m.sdd, dbar, dbar), cov(m.syd, ybar, dbar)
        vxx, vxy, vdx = cov(m.sxx, xbar, xbar), cov(m.sxy, xbar, ybar), cov(m.sdx, dbar, xbar)
        r = ybar / dbar
        var_l = np.maximum(vyy - 2 * r * vyd + r * r * vdd, 0.0) / (dbar * dbar)
        cov_lx = (vxy - r * vdx) / dbar
    return _Arm(r, var_l, cov_lx, np.maximum(vxx, 0.0), xbar, n)


def eta(alpha: float) -> float:
    """The mixture's tuning that makes the sequence tightest at the planned size (Howard et al. 2021)."""
    a = 2 * math.log(1 / alpha)
    return a + math.log1p(a)


def cs_factor(t: ArrayLike, planned: ArrayLike, alpha: float) -> np.ndarray:
    """``(half-width / se)^2`` of the normal-mixture sequence after ``t`` of ``planned`` units."""
    r = eta(alpha) * _f(t) / _f(planned)
    with np.errstate(divide="ignore", invalid="ignore"):
        out: np.ndarray = (1 + 1 / r) * (2 * math.log(1 / alpha) + np.log1p(r))
    return out


@dataclass(frozen=True, slots=True)
class Lift:
    """Challenger vs control on one metric (arrays shaped like the inputs' leading axes)."""

    control: np.ndarray  # control's estimate (CUPED-adjusted when a covariate is used)
    challenger: np.ndarray
    abs: np.ndarray  # challenger - control
    abs_se: np.ndarray
    rel: np.ndarray  # challenger / control - 1
    rel_se: np.ndarray
    ci_abs: tuple[np.ndarray, np.ndarray]  # fixed horizon
    ci_rel: tuple[np.ndarray, np.ndarray]
    cs_abs: tuple[np.ndarray, np.ndarray]  # always valid (confidence sequence)
    cs_rel: tuple[np.ndarray, np.ndarray]
    p_fixed: np.ndarray  # two-sided Wald p-value (fixed horizon)
    p_always: np.ndarray  # always-valid p-value of this look: 1 / Lambda (take a running min)
    n_control: np.ndarray
    n_challenger: np.ndarray
    theta: np.ndarray  # CUPED slope (0 without a covariate)
    valid: np.ndarray  # enough units on both arms and a positive variance


def lift(
    challenger: Moments,
    control: Moments,
    kind: Kind,
    alpha: float,
    planned_units: float,
    cuped: bool = False,
    min_units: int = MIN_UNITS,
) -> Lift:
    """Absolute and relative lift with fixed-horizon intervals and always-valid sequences.

    ``alpha`` is this comparison's share (Bonferroni-divide it across challengers first:
    `per_challenger`); ``planned_units`` the units of both arms at the planned horizon (from
    `cohortgate.core.plan`), fixed before the experiment starts. Formulas: module docstring.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown metric kind {kind!r}: one of {', '.join(KINDS)}")
    if not 0 < alpha < 1 or planned_units <= 0:
        raise ValueError("alpha must be in (0, 1) and planned_units positive")
    ddof = 0 if kind == "binary" else 1
    a1, a0 = _arm(challenger, ddof), _arm(control, ddof)
    with np.errstate(invalid="ignore", divide="ignore"):
        if cuped:
            # Pooled within-arm slope: the ANCOVA coefficient of the covariate.
            num = a1.cov_lx * (a1.n - 1) + a0.cov_lx * (a0.n - 1)
            den = a1.var_x * (a1.n - 1) + a0.var_x * (a0.n - 1)
            theta = np.where(den > 0, num / den, 0.0)
            xbar = (a1.mean_x * a1.n + a0.mean_x * a0.n) / (a1.n + a0.n)
        else:
            theta = np.zeros(np.broadcast(a1.mean, a0.mean).shape)
            xbar = 0.0
        m1 = a1.mean - theta * (a1.mean_x - xbar)
        m0 = a0.mean - theta * (a0.mean_x - xbar)
        v1 = np.maximum(a1.var_l - 2 * theta * a1.cov_lx + theta**2 * a1.var_x, 0.0) / a1.n
        v0 = np.maximum(a0.var_l - 2 * theta * a0.cov_lx + theta**2 * a0.var_x, 0.0) / a0.n
        diff = m1 - m0
        var = v1 + v0
        se = np.sqrt(var)
        rel = m1 / m0 - 1
        rel_se = np.sqrt(v1 / m0**2 + m1**2 * v0 / m0**4)
        t = a1.n + a0.n
        valid = (a1.n >= min_units) & (a0.n >= min_units) & (var > 0) & np.isfinite(var)
        z = special.ndtri(1 - alpha / 2)
        k = np.sqrt(cs_factor(t, planned_units, alpha))
        inf = np.inf

        def band(center: np.ndarray, width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            ok = valid & np.isfinite(center) & np.isfinite(width)
            return (np.where(ok, center - width, -inf), np.where(ok, center + width, inf))

        r = eta(alpha) * t / planned_units
        log_lambda = -0.5 * np.log1p(r) + r / (1 + r) * diff**2 / (2 * var)
        p_always = np.where(valid, np.minimum(1.0, np.exp(-np.maximum(log_lambda, 0.0))), 1.0)
        p_fixed = np.where(valid, 2 * special.ndtr(-np.abs(diff) / se), 1.0)
    return Lift(
        control=m0,
        challenger=m1,
        abs=diff,
        abs_se=se,
        rel=rel,
        rel_se=rel_se,
        ci_abs=band(diff, z * se),
        ci_rel=band(rel, z * rel_se),
        cs_abs=band(diff, k * se),
        cs_rel=band(rel, k * rel_se),
        p_fixed=p_fixed,
        p_always=p_always,
        n_control=a0.n,
        n_challenger=a1.n,
        theta=theta,
        valid=valid,
    )


def per_challenger(alpha: float, challengers: int) -> float:
    """Bonferroni: each of ``challengers`` sequences gets ``alpha / challengers`` (valid at every look)."""
    return alpha / max(1, challengers)


def holm(p_values: Sequence[float], alpha: float) -> np.ndarray:
    """Holm's (1979) step-down rejections for fixed-horizon p-values (a boolean per hypothesis)."""
    p = _f(p_values)
    order = np.argsort(p)
    m = p.size
    passed = p[order] <= alpha / (m - np.arange(m))
    cut = m if passed.all() else int(np.argmin(passed))
    reject = np.zeros(m, dtype=bool)
    reject[order[:cut]] = True
    return reject


# --------------------------------------------------------------------------- decisions


class Verdict(enum.Enum):
    WIN = "win"  # the sequence lies on the good side of 0
    LOSS = "loss"  # ... on the bad side
    NON_INFERIOR = "non_inferior"  # guardrail: not worse than control by more than the margin
    INFERIOR = "inferior"  # guardrail: worse than control by more than the margin
    INCONCLUSIVE = "inconclusive"  # the planned size is reached and the sequence decides nothing
    PENDING = "pending"  # still collecting


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """How one metric is read: what the policy's metric declaration will compile to."""

    name: str
    kind: Kind = "binary"
    direction: Direction = "increase"
    role: Role = "primary"
    margin: float | None = None  # non-inferiority margin (guardrails): relative unless margin_abs
    margin_abs: bool = False
    planned_units: int = 10_000  # both arms, at the planned horizon (cohortgate experiment plan)
    covariate: str | None = None  # name of the pre-exposure covariate (CUPED), if any

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name}: unknown kind {self.kind!r}")
        if self.direction not in ("increase", "decrease") or self.role not in ("primary", "secondary", "guardrail"):
            raise ValueError(f"metric {self.name}: bad direction or role")
        if self.role == "guardrail" and self.margin is None:
            raise ValueError(f"metric {self.name}: a guardrail needs a non-inferiority margin")
        if self.margin is not None and self.margin < 0:
            raise ValueError(f"metric {self.name}: the margin is a non-negative number")


@dataclass(frozen=True, slots=True)
class Bounds:
    """A confidence sequence's running intersection (always valid too; it only ever narrows)."""

    abs_lo: float = -math.inf
    abs_hi: float = math.inf
    rel_lo: float = -math.inf
    rel_hi: float = math.inf

    def narrow(self, lf: Lift) -> Bounds:
        """Intersect with this look's sequence (a scalar `Lift`); an empty intersection keeps the old one."""
        lo_a, hi_a = max(self.abs_lo, float(lf.cs_abs[0])), min(self.abs_hi, float(lf.cs_abs[1]))
        lo_r, hi_r = max(self.rel_lo, float(lf.cs_rel[0])), min(self.rel_hi, float(lf.cs_rel[1]))
        if lo_a > hi_a or lo_r > hi_r:  # only possible through the approximation: keep what held
            return self
        return Bounds(lo_a, hi_a, lo_r, hi_r)


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str
    win: bool
    loss: bool
    non_inferior: bool | None  # None without a margin


def decide(spec: MetricSpec, bounds: Bounds, units: float, alpha: float) -> Decision:
    """The verdict a metric's always-valid bounds support (guardrails: the margin decides).

    Signs follow ``direction``: for ``decrease`` a negative lift is good. A primary or secondary
    metric wins or loses when its sequence leaves 0 behind; a guardrail passes when the sequence
    rules out "worse by more than the margin" and fails when it rules out "within the margin".
    At the planned size without such a crossing the verdict is inconclusive, never a win.
    """
    sign = 1.0 if spec.direction == "increase" else -1.0
    lo, hi = sorted((sign * bounds.abs_lo, sign * bounds.abs_hi))  # good-side-positive absolute lift
    win, loss = lo > 0, hi < 0
    ni: bool | None = None
    inferior = False
    if spec.margin is not None:
        m_lo, m_hi = (
            sorted((sign * bounds.abs_lo, sign * bounds.abs_hi))
            if spec.margin_abs
            else sorted((sign * bounds.rel_lo, sign * bounds.rel_hi))
        )
        ni, inferior = m_lo > -spec.margin, m_hi < -spec.margin
    what = f"{'absolute' if spec.margin_abs else 'relative'} margin {spec.margin:g}" if spec.margin is not None else ""
    band = f"[{bounds.rel_lo:+.2%}, {bounds.rel_hi:+.2%}] relative, always valid at alpha={alpha:g}"
    reached = units >= spec.planned_units
    if spec.role == "guardrail":
        if inferior:
            verdict, reason = Verdict.INFERIOR, f"worse than control by more than the {what}: {band}"
        elif ni:
            verdict, reason = Verdict.NON_INFERIOR, f"not worse than control by more than the {what}: {band}"
        elif reached:
            verdict, reason = Verdict.INCONCLUSIVE, f"planned {spec.planned_units} units reached, {what} not shown"
        else:
            verdict, reason = Verdict.PENDING, f"{units:.0f} of {spec.planned_units} planned units: {band}"
    elif loss:
        verdict, reason = Verdict.LOSS, f"worse than control: {band}"
    elif win:
        verdict, reason = Verdict.WIN, f"better than control: {band}"
    elif reached:
        verdict, reason = Verdict.INCONCLUSIVE, f"planned {spec.planned_units} units reached, no difference shown"
    else:
        verdict, reason = Verdict.PENDING, f"{units:.0f} of {spec.planned_units} planned units: {band}"
    return Decision(verdict, reason, bool(win), bool(loss), ni if ni is None else bool(ni))
