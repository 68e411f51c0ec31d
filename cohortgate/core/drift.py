"""Drift statistics on sketches: how far a window of inputs (or outputs) moved from a reference.

Pure numpy, vectorised over leading axes, so the A/A simulations call exactly these functions.
The sidecar never ships payloads, only per-feature sketches (`cohortgate.core.sketch`): fixed-bin
histograms of numeric features (with null, below-range and above-range counts) and category counts.
Every statistic below compares two such count vectors ``p`` (reference) and ``q`` (current):

* **PSI**, the population stability index (Karakoulas 2004; Siddiqi 2006, *Credit Risk Scorecards*
  ch. 8): ``sum (q_i - p_i) ln(q_i / p_i)``, the symmetrised Kullback-Leibler divergence. Empty
  bins are floored at ``PSI_FLOOR`` (1e-4) before the log, the convention Evidently uses, so one
  empty bin does not make it infinite. Rule of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 shift.
* **Jensen-Shannon distance** (Lin 1991; Endres & Schindelin 2003): ``sqrt(JSD)`` with
  ``JSD = (KL(p||m) + KL(q||m)) / 2``, ``m = (p + q) / 2``, in base 2, so it lies in [0, 1] and is a
  metric; equal to ``scipy.spatial.distance.jensenshannon(p, q, base=2)``.
* **Wasserstein-1 on binned data** (the earth mover's distance, Kantorovich 1942; Vaserstein 1969):
  each bin's mass at its centre (below/above-range mass at the outer edges), ``W1 = integral
  |F_p - F_q|``, equal to ``scipy.stats.wasserstein_distance(centres, centres, p, q)``. Reported
  divided by the reference's standard deviation (Evidently's "normed" Wasserstein), so one
  threshold reads the same for a feature in metres and one in milliseconds. Numeric only.

Nulls, and values outside the histogram's range, are categories of their own for PSI and JS: a
feature that starts arriving empty, or off the profiled range, drifts.

**The multivariate summary** is the share of features that drifted (Evidently's "dataset drift")
with the mean and the maximum per-feature JS distance beside it. Why not a chi-square over
features: the sketches are per-feature marginals, so nothing here sees the joint distribution; a
chi-square summing per-feature statistics assumes independent features, and correlated inputs
(most tabular data) would make it fire on one underlying shift counted many times. The share and
the maximum make no such assumption and read directly ("3 of 12 features moved; the worst by 0.31").

**A feature drifts when it moved by more than a threshold *and* the move is not noise.** The
statistics above are effect sizes, and their sampling noise is not small: two samples of 1 000 from
one 20-bin distribution have a JS distance of ~0.08 (docs/quality.md). So each comparison also
carries **Pearson's chi-square test of homogeneity** of the 2 x k table (Pearson 1900; Cochran
1954), ``X^2 = sum (O - E)^2 / E`` with ``k - 1`` degrees of freedom, on the table with sparse bins
pooled (Cochran's rule): equal to ``scipy.stats.chi2_contingency(table, correction=False)``. Why
Pearson's and not the G-test (the likelihood-ratio chi-square, ``2 N`` times the sample-weighted
Jensen-Shannon divergence): on histograms with sparse tails the G-test's chi-square p-value is
anti-conservative at the small levels the controller tests at (alpha spent over looks and split
over features: 1e-3 to 1e-5), even with Williams' (1976) correction: measured on 2 x 10^6 A/A
tables per cell, 16-bin normal histograms with 200-1 000 values a side, it rejected 1.02-1.15x
as often as its level; Pearson's rejected 0.7-0.9x, and 0.93-1.0x (within noise) on a 3-category
feature (Larntz 1978 found the same: X^2 keeps its level with small expected counts, G^2 does
not). The controller's A/A false-trip bound is a sum of these levels, so a liberal test breaks it.
A feature counts as drifted only when a statistic is over its threshold and the test's p-value
is under ``alpha`` divided by the number of features judged (Bonferroni). With a large reference
(a profile) the test is nearly always significant and the threshold decides; with small windows
the test keeps noise out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

PSI_FLOOR = 1e-4  # a bin's share is at least this in PSI's logarithm (Evidently's convention)
POOL_BELOW = 10  # the chi-square test pools categories seen fewer times than this (both windows together)


class NumericLike(Protocol):
    """What a numeric sketch offers (`cohortgate.core.sketch.NumericSketch`)."""

    @property
    def edges(self) -> Sequence[float]: ...
    @property
    def counts(self) -> Sequence[int]: ...
    @property
    def nulls(self) -> int: ...
    @property
    def below(self) -> int: ...
    @property
    def above(self) -> int: ...


class CategoricalLike(Protocol):
    """What a categorical sketch offers (`cohortgate.core.sketch.CategoricalSketch`)."""

    @property
    def counts(self) -> Mapping[str, int]: ...


def _shares(counts: ArrayLike) -> np.ndarray:
    c = np.asarray(counts, dtype=float)
    total = c.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, c / np.where(total > 0, total, 1.0), 0.0)


def psi(reference: ArrayLike, current: ArrayLike, floor: float = PSI_FLOOR) -> np.ndarray:
    """Population stability index of two count vectors (categories on the last axis)."""
    p = np.maximum(_shares(reference), floor)
    q = np.maximum(_shares(current), floor)
    return np.asarray(((q - p) * np.log(q / p)).sum(axis=-1))


def js_distance(reference: ArrayLike, current: ArrayLike) -> np.ndarray:
    """Jensen-Shannon distance, base 2 (in [0, 1]), of two count vectors (last axis)."""
    p, q = _shares(reference), _shares(current)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0) / np.where(m > 0, m, 1.0)), 0.0)
        return np.asarray(terms.sum(axis=-1))

    return np.asarray(np.sqrt(np.maximum((kl(p) + kl(q)) / 2, 0.0)))


def homogeneity_p(reference: ArrayLike, current: ArrayLike) -> np.ndarray:
    """Pearson chi-square p-value that two count vectors (last axis) come from one distribution
    (1.0: no data); sparse categories pooled (``POOL_BELOW``)."""
    a = np.asarray(reference, dtype=float)
    b = np.asarray(current, dtype=float)
    a, b = np.broadcast_arrays(a, b)
    # Cochran's rule: categories with fewer than POOL_BELOW values in both windows together are pooled
    # into one, since the chi-square approximation is anti-conservative on sparse cells (histogram tails)
    rare = (a + b) < POOL_BELOW
    a = np.concatenate([np.where(rare, 0.0, a), (a * rare).sum(-1, keepdims=True)], axis=-1)
    b = np.concatenate([np.where(rare, 0.0, b), (b * rare).sum(-1, keepdims=True)], axis=-1)
    col = a + b
    na, nb = a.sum(-1, keepdims=True), b.sum(-1, keepdims=True)
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        ea, eb = col * na / n, col * nb / n

        def x2(o: np.ndarray, e: np.ndarray) -> np.ndarray:
            return np.where(e > 0, (o - e) ** 2 / np.where(e > 0, e, 1.0), 0.0)

        stat = (x2(a, ea) + x2(b, eb)).sum(-1)
    df = (col > 0).sum(-1) - 1
    ok = (df > 0) & (na[..., 0] > 0) & (nb[..., 0] > 0)
    return np.asarray(np.where(ok, special.chdtrc(np.maximum(df, 1), np.maximum(stat, 0.0)), 1.0))  # chi2 sf


def bin_centres(edges: ArrayLike) -> np.ndarray:
    """Where each bin's mass sits for Wasserstein: its centre, plus the outer edges for the
    below-range and above-range counts (``len(edges) + 1`` points)."""
    e = np.asarray(edges, dtype=float)
    return np.concatenate([e[:1], (e[:-1] + e[1:]) / 2, e[-1:]])


def wasserstein_binned(reference: ArrayLike, current: ArrayLike, points: ArrayLike) -> np.ndarray:
    """W1 between two histograms with their mass at ``points`` (sorted; last axis of the counts)."""
    x = np.asarray(points, dtype=float)
    cdf = np.cumsum(_shares(current), axis=-1) - np.cumsum(_shares(reference), axis=-1)
    return np.asarray((np.abs(cdf[..., :-1]) * np.diff(x)).sum(axis=-1))


def binned_std(counts: ArrayLike, points: ArrayLike) -> np.ndarray:
    """Standard deviation of a histogram with its mass at ``points``."""
    w = _shares(counts)
    x = np.asarray(points, dtype=float)
    mean = (w * x).sum(axis=-1, keepdims=True)
    return np.asarray(np.sqrt(np.maximum((w * (x - mean) ** 2).sum(axis=-1), 0.0)))


def wasserstein_normed(reference: ArrayLike, current: ArrayLike, points: ArrayLike) -> np.ndarray:
    """`wasserstein_binned` over the reference's standard deviation (inf when it has none but moved)."""
    w = wasserstein_binned(reference, current, points)
    sd = binned_std(reference, points)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.where(sd > 0, w / np.where(sd > 0, sd, 1.0), np.where(w > 0, np.inf, 0.0)))


# --------------------------------------------------------------------------- sketches


def numeric_vector(s: NumericLike) -> np.ndarray:
    """``[below, bins..., above, nulls]``: every outcome of a numeric feature as one category vector."""
    return np.asarray([s.below, *s.counts, s.above, s.nulls], dtype=float)


def categorical_vectors(ref: CategoricalLike, cur: CategoricalLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Both sketches' counts over the union of their categories (sorted, so the order is stable),
    then nulls and undeclared values (``other``) as two more categories."""
    keys = sorted(set(ref.counts) | set(cur.counts))

    def vector(s: CategoricalLike) -> np.ndarray:
        extra = [getattr(s, "nulls", 0), getattr(s, "other", 0)]
        return np.asarray([s.counts.get(k, 0) for k in keys] + extra, dtype=float)

    return vector(ref), vector(cur), keys


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    """One feature's (or output's) drift between a reference and a current window."""

    feature: str
    kind: str  # numeric | categorical
    n_reference: int
    n_current: int
    psi: float
    js: float
    wasserstein: float | None  # normed by the reference's std; None for categorical features
    p_value: float = 1.0  # chi-square test of homogeneity: could the two windows come from one distribution?

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "p_value": float(f"{self.p_value:.3g}"),
            "n_reference": self.n_reference,
            "n_current": self.n_current,
            "psi": round(self.psi, 6),
            "js": round(self.js, 6),
            "wasserstein": None if self.wasserstein is None else round(self.wasserstein, 6),
        }


class IncomparableSketches(ValueError):
    """Two sketches of one feature that cannot be compared (different kinds or bin edges)."""


def feature_drift(feature: str, reference: object, current: object) -> FeatureDrift:
    """PSI, JS and (numeric) normed Wasserstein between two sketches of one feature."""
    if hasattr(reference, "edges") and hasattr(current, "edges"):
        r: NumericLike = reference  # type: ignore[assignment]
        c: NumericLike = current  # type: ignore[assignment]
        if len(r.edges) != len(c.edges) or not np.allclose(r.edges, c.edges):
            raise IncomparableSketches(f"feature {feature!r}: the two sketches have different bin edges")
        rv, cv = numeric_vector(r), numeric_vector(c)
        points = bin_centres(r.edges)
        w = float(wasserstein_normed(rv[:-1], cv[:-1], points)) if rv[:-1].sum() and cv[:-1].sum() else 0.0
        return FeatureDrift(
            feature,
            "numeric",
            int(rv.sum()),
            int(cv.sum()),
            float(psi(rv, cv)),
            float(js_distance(rv, cv)),
            w,
            float(homogeneity_p(rv, cv)),
        )
    if hasattr(reference, "edges") or hasattr(current, "edges"):
        raise IncomparableSketches(f"feature {feature!r}: one sketch is numeric, the other categorical")
    rv, cv, _ = categorical_vectors(reference, current)  # type: ignore[arg-type]
    return FeatureDrift(
        feature,
        "categorical",
        int(rv.sum()),
        int(cv.sum()),
        float(psi(rv, cv)),
        float(js_distance(rv, cv)),
        None,
        float(homogeneity_p(rv, cv)),
    )


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a feature counts as drifted: a statistic over its threshold (None: not used) and the
    chi-square test under ``alpha`` (per feature: `summarize` divides it by the number judged)."""

    psi: float | None = 0.2
    js: float | None = 0.1
    wasserstein: float | None = 0.1
    min_samples: int = 500  # in each window; fewer and the feature is not judged
    alpha: float = 1e-3  # the chi-square test's level for one comparison of all features (Bonferroni inside)

    def exceeded(self, d: FeatureDrift, alpha: float | None = None) -> list[str]:
        """The statistics over their threshold (empty: not drifted, noise, or too few samples to say)."""
        if d.n_current < self.min_samples or d.n_reference < self.min_samples:
            return []
        if d.p_value >= (self.alpha if alpha is None else alpha):
            return []
        out = []
        for name, limit in (("psi", self.psi), ("js", self.js), ("wasserstein", self.wasserstein)):
            value = getattr(d, name)
            if limit is not None and value is not None and value > limit:
                out.append(name)
        return out


@dataclass(frozen=True, slots=True)
class DriftSummary:
    """The multivariate summary: which features drifted, their share, the mean and max JS distance."""

    features: Mapping[str, FeatureDrift]
    drifted: Mapping[str, tuple[str, ...]]  # feature -> statistics over threshold
    judged: int  # features with enough samples on both sides

    @property
    def share_drifted(self) -> float:
        return len(self.drifted) / self.judged if self.judged else 0.0

    @property
    def mean_js(self) -> float:
        return float(np.mean([d.js for d in self.features.values()])) if self.features else 0.0

    @property
    def max_js(self) -> float:
        return max((d.js for d in self.features.values()), default=0.0)

    def to_json(self) -> dict[str, object]:
        return {
            "features": {k: v.to_json() for k, v in sorted(self.features.items())},
            "drifted": {k: list(v) for k, v in sorted(self.drifted.items())},
            "judged": self.judged,
            "share_drifted": round(self.share_drifted, 6),
            "mean_js": round(self.mean_js, 6),
            "max_js": round(self.max_js, 6),
        }


def rejudge(summary: DriftSummary, thresholds: Thresholds) -> DriftSummary:
    """The same comparisons judged at other thresholds (a new ``alpha``) without recomputing them."""
    per_feature = thresholds.alpha / max(summary.judged, 1)
    drifted = {k: tuple(x) for k, d in summary.features.items() if (x := thresholds.exceeded(d, per_feature))}
    return DriftSummary(summary.features, drifted, summary.judged)


def summarize(reference: Mapping[str, object], current: Mapping[str, object], thresholds: Thresholds) -> DriftSummary:
    """Every feature both sides sketched, compared; a feature whose sketches do not fit is skipped."""
    features: dict[str, FeatureDrift] = {}
    for name in sorted(set(reference) & set(current)):
        try:
            features[name] = feature_drift(name, reference[name], current[name])
        except IncomparableSketches:
            continue
    judged = sum(1 for d in features.values() if min(d.n_current, d.n_reference) >= thresholds.min_samples)
    per_feature = thresholds.alpha / max(judged, 1)
    drifted = {k: tuple(x) for k, d in features.items() if (x := thresholds.exceeded(d, per_feature))}
    return DriftSummary(features, drifted, judged)
