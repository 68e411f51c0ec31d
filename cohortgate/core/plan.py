"""How many units an experiment needs, how long that takes, and what always-valid inference costs.

* **Fixed horizon** (the textbook two-sample z test, e.g. Chow, Shao & Wang 2008, §4.2):
  ``N = (z_{1-alpha/2} + z_{1-beta})^2 (s1^2 / f1 + s0^2 / f0) / delta^2`` units over both arms,
  with ``f1, f0`` their shares of the comparison and ``s^2`` the per-unit variances (``p (1 - p)``
  for a binary metric, at the baseline and at the planted rate).
* **Always valid** (the normal-mixture sequence of `cohortgate.core.lift`, tuned to be tightest at
  its own planned size): in the time scale ``s = t / N`` the scaled estimate is Brownian motion with
  drift ``theta = delta / se_N`` and the sequence is the curved boundary
  ``b(s) = sqrt(s (1 + 1/(eta s)) (2 log(1/alpha) + log(1 + eta s)))``, the same for every metric.
  The power to declare a win by ``s = 1`` when looking ``looks`` times is ``P(min_k (b(s_k) -
  W(s_k)) / s_k <= theta)``; `sequential_drift` finds the ``theta`` that gives the wanted power by
  simulating ``W`` once (seeded: the plan is deterministic). Then ``N_seq = N_fixed (theta_seq /
  (z_{1-alpha/2} + z_{1-beta}))^2``: that ratio is the **price** of being allowed to look at any
  time (and to stop early when the effect is large).

`simulate` runs whole experiments -- units arriving, every look, the sequence and the verdicts --
through exactly `lift.lift`, for the A/A and power checks (tests and ``bench/bench_outcomes.py``).
Pure numpy/scipy; every random draw takes a seed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

from cohortgate.core import lift as lift_mod
from cohortgate.core.lift import Kind


def parse_split(text: str) -> tuple[float, ...]:
    """``90/10`` or ``80/10/10``: control first, then each challenger (percentages or weights)."""
    try:
        weights = tuple(float(w) for w in text.split("/"))
    except ValueError:
        raise ValueError(f"invalid split {text!r}: use CONTROL/CHALLENGER[/...], e.g. 90/10") from None
    if len(weights) < 2 or any(w <= 0 for w in weights):
        raise ValueError(f"invalid split {text!r}: at least two positive weights, control first")
    return weights


@functools.lru_cache(maxsize=64)
def sequential_drift(alpha: float, power: float, looks: int, paths: int = 20_000, seed: int = 0) -> float:
    """The drift ``theta`` at which the sequence declares a win by its planned size with ``power``.

    Looks at ``s = k / looks``; Monte Carlo over ``paths`` Brownian paths (seeded), in chunks.
    """
    if looks < 1:
        raise ValueError("looks must be at least 1")
    rng = np.random.default_rng(seed)
    e = lift_mod.eta(alpha)
    s = np.arange(1, looks + 1) / looks
    b = np.sqrt(s * (1 + 1 / (e * s)) * (2 * math.log(1 / alpha) + np.log1p(e * s)))
    need = np.empty(paths)
    chunk = max(1, 2_000_000 // looks)
    for start in range(0, paths, chunk):
        m = min(chunk, paths - start)
        w = np.cumsum(rng.standard_normal((m, looks)) * math.sqrt(1 / looks), axis=1)
        need[start : start + m] = np.min((b - w) / s, axis=1)
    return float(np.quantile(need, power))


@dataclass(frozen=True, slots=True)
class Plan:
    kind: Kind
    baseline: float
    target: float  # the planted value: baseline (1 + mde) for a relative mde
    sd: float  # per-unit standard deviation at the baseline
    alpha: float  # per comparison (Bonferroni over challengers)
    power: float
    challengers: int
    share: float  # the comparison's share of traffic (control + one challenger)
    challenger_fraction: float  # the challenger's share within the comparison
    units_per_s: float  # units reaching the comparison per second
    units_fixed: int  # both arms, fixed horizon
    units_sequential: int  # both arms, always valid (the sequence's planned_units)
    looks: int

    @property
    def price(self) -> float:
        return self.units_sequential / self.units_fixed

    @property
    def seconds_fixed(self) -> float:
        return self.units_fixed / self.units_per_s

    @property
    def seconds_sequential(self) -> float:
        return self.units_sequential / self.units_per_s


def plan(
    baseline: float,
    mde: float,
    *,
    kind: Kind = "binary",
    sd: float | None = None,
    sd_challenger: float | None = None,
    relative: bool = True,
    rps: float = 100.0,
    split: Sequence[float] = (50.0, 50.0),
    alpha: float = 0.05,
    power: float = 0.8,
    requests_per_unit: float = 1.0,
    interval_s: float = 1.0,
    max_looks: int = 1000,
) -> Plan:
    """Sample size and duration for detecting ``mde`` (relative unless ``relative=False``).

    ``sd`` (mean and ratio metrics): the per-unit standard deviation at the baseline (for a ratio,
    of its linearisation); ``sd_challenger`` at the target, when the change moves it too.

    ``split``: control's weight first, then each challenger's; every challenger is compared with
    control at ``alpha / challengers``. The sequence is assumed looked at every ``interval_s``
    (capped at ``max_looks`` looks: more barely changes the answer).
    """
    if kind not in lift_mod.KINDS:
        raise ValueError(f"unknown metric kind {kind!r}")
    if not 0 < alpha < 1 or not 0 < power < 1 or mde == 0 or rps <= 0 or requests_per_unit <= 0:
        raise ValueError("alpha and power in (0, 1), mde non-zero, rps and requests per unit positive")
    target = baseline * (1 + mde) if relative else baseline + mde
    if kind == "binary":
        if not (0 < baseline < 1 and 0 < target < 1):
            raise ValueError("a binary metric's baseline and target must lie in (0, 1)")
        s0, s1 = math.sqrt(baseline * (1 - baseline)), math.sqrt(target * (1 - target))
    else:
        if sd is None or sd <= 0:
            raise ValueError(f"a {kind} metric needs its per-unit standard deviation (sd)")
        s0, s1 = sd, sd_challenger or sd
    weights = [float(w) for w in split]
    control, challengers = weights[0], weights[1:]
    comparison = control + min(challengers)  # the smallest challenger sets the pace
    f1 = min(challengers) / comparison
    a = lift_mod.per_challenger(alpha, len(challengers))
    zsum = special.ndtri(1 - a / 2) + special.ndtri(power)
    delta = target - baseline
    n_fixed = zsum**2 * (s1**2 / f1 + s0**2 / (1 - f1)) / delta**2
    units_per_s = rps / requests_per_unit * comparison / sum(weights)
    looks = int(min(max_looks, max(1, round(n_fixed / units_per_s / interval_s))))
    theta = sequential_drift(round(a, 12), power, looks)
    n_seq = n_fixed * (theta / zsum) ** 2
    looks_seq = int(min(max_looks, max(1, round(n_seq / units_per_s / interval_s))))
    if looks_seq != looks:  # the sequential run is longer: it is looked at more often
        theta = sequential_drift(round(a, 12), power, looks_seq)
        n_seq = n_fixed * (theta / zsum) ** 2
    return Plan(
        kind=kind,
        baseline=baseline,
        target=target,
        sd=s0,
        alpha=a,
        power=power,
        challengers=len(challengers),
        share=comparison / sum(weights),
        challenger_fraction=f1,
        units_per_s=units_per_s,
        units_fixed=math.ceil(n_fixed),
        units_sequential=math.ceil(n_seq),
        looks=looks_seq,
    )


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True, slots=True)
class Population:
    """How simulated units behave: the same in every arm except for ``lift`` on the challenger.

    Units differ: each has a propensity drawn from a Beta with mean ``base`` and concentration
    ``concentration`` (lower: more different), and an activity (exposures) drawn log-normal with
    spread ``activity_sigma`` (heavy users). The covariate is the unit's pre-exposure value of the
    same metric (as many exposures, the same propensity), so it correlates the way CUPED expects.
    """

    kind: Kind = "binary"
    base: float = 0.05
    concentration: float = 2.0
    activity_sigma: float = 1.0
    value_sigma: float = 1.0  # mean metric: log-normal spread of each converting event's value


def _draw(
    pop: Population, rng: np.random.Generator, shape: tuple[int, ...], uplift: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Per-unit (y, d, x) for ``shape`` units; ``uplift`` multiplies the propensity (arm effect)."""
    a = pop.base * pop.concentration
    p = rng.beta(a, pop.concentration - a, size=shape)
    act = np.maximum(1, np.round(np.exp(rng.normal(0.0, pop.activity_sigma, size=shape)))).astype(np.int64)
    p1 = np.clip(p * uplift, 0.0, 1.0)
    if pop.kind == "binary":  # did the unit convert at all over its exposures
        y = (rng.random(shape) < 1 - (1 - p1) ** act).astype(float)
        x = (rng.random(shape) < 1 - (1 - p) ** act).astype(float)
        return y, None, x
    hits = rng.binomial(act, p1).astype(float)
    pre = rng.binomial(act, p).astype(float)
    if pop.kind == "ratio":  # conversions per exposure
        return hits, act.astype(float), pre
    # mean: summed value of the unit's converting events (log-normal values)
    scale = np.exp(pop.value_sigma**2 / 2)
    y = hits * np.exp(rng.normal(0.0, pop.value_sigma, size=shape)) / scale
    x = pre * np.exp(rng.normal(0.0, pop.value_sigma, size=shape)) / scale
    return y, None, x


@dataclass(frozen=True, slots=True)
class SimResult:
    runs: int
    win: float  # share of runs whose sequence ever declared a win (any look)
    loss: float
    fixed_win: float  # share whose fixed-horizon interval at the last look excluded 0 upward
    fixed_loss: float
    final_width: float  # mean always-valid relative width at the last look
    final_ci_width: float  # mean fixed-horizon absolute width at the last look


def simulate(
    pop: Population,
    *,
    units: int,
    looks: int,
    runs: int,
    lift: float = 0.0,
    challenger_fraction: float = 0.5,
    alpha: float = 0.05,
    planned_units: int | None = None,
    cuped: bool = False,
    seed: int = 0,
    chunk: int = 100,
) -> SimResult:
    """Run ``runs`` experiments of ``units`` units looked at ``looks`` evenly spaced times.

    Each run assigns units at random (``challenger_fraction``), sums outcomes per unit, and calls
    `lift.lift` at every look with the cumulative per-arm moments; a verdict is sticky (the
    sequence "ever" excluded 0). ``lift`` is the relative change of the challenger's propensity.
    """
    rng = np.random.default_rng(seed)
    idx = np.unique(np.linspace(units / looks, units, looks).round().astype(int) - 1)
    planned = planned_units or units
    win = loss = fwin = floss = 0
    width = ci_width = 0.0
    done = 0
    while done < runs:
        m = min(chunk, runs - done)
        arm = rng.random((m, units)) < challenger_fraction
        y, d, x = _draw(pop, rng, (m, units), np.where(arm, 1.0 + lift, 1.0))
        mom1 = lift_mod.take(lift_mod.unit_moments(y, d, x, where=arm, cumulative=True), idx)
        mom0 = lift_mod.take(lift_mod.unit_moments(y, d, x, where=~arm, cumulative=True), idx)
        lf = lift_mod.lift(mom1, mom0, pop.kind, alpha, planned, cuped=cuped)
        win += int((lf.cs_abs[0] > 0).any(axis=-1).sum())
        loss += int((lf.cs_abs[1] < 0).any(axis=-1).sum())
        fwin += int((lf.ci_abs[0][:, -1] > 0).sum())
        floss += int((lf.ci_abs[1][:, -1] < 0).sum())
        width += float(np.sum(lf.cs_rel[1][:, -1] - lf.cs_rel[0][:, -1]))
        ci_width += float(np.sum(lf.ci_abs[1][:, -1] - lf.ci_abs[0][:, -1]))
        done += m
    return SimResult(runs, win / runs, loss / runs, fwin / runs, floss / runs, width / runs, ci_width / runs)
