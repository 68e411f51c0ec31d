"""Model accuracy from late labels: the prediction a variant served, joined with the label that came later.

A sidecar started with ``--report-predictions`` adds the served prediction of each one-row request
to its report (`sidecar.prediction`: the top class with the class probabilities, or the value;
never the input). The controller hands it to the outcome ledger as a record

    {"kind": "prediction", "request_id", "route", "variant", "prediction", "t"}

and the ledger keeps it here (journaled like every record it accepts). A label arrives later as an
outcome whose metric is `LABEL_METRIC` -- ``cohortgate outcomes import`` with ``request_id``,
``metric=label``, ``value=<the true class or value>``, or a client's exposure token -- and is
joined by the request's exposure id (`cohortgate.core.exposure.exposure_id`, which the token
carries too). Each label counts once; a label older than the attribution window after its
prediction is ``expired``; one with no prediction is ``unknown_request``.

Per route and variant: **accuracy** (Wilson interval) and **log-loss** (of the probability the model
gave the true class, clipped at `EPS`) for classifiers, **MAE** and **RMSE** for regressors, each
with a normal interval; and each challenger's difference from control (fixed horizon: for reading,
not a gate). Status codes are the ledger's.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from statsmodels.stats.proportion import proportion_confint  # type: ignore[import-untyped]

from cohortgate.core.exposure import ExposureRefused, exposure_id, verify

LABEL_METRIC = "label"  # an outcome with this metric is a label, not a business metric
MAX_PREDICTIONS = 200_000  # kept for joining, oldest dropped first (counted)
MAX_CLASSES = 32
EPS = 1e-15  # log-loss clip, as scikit-learn's log_loss
Z95 = 1.959963984540054
# the ledger's status codes (cohortgate.controller.outcomes), returned as they are
ACCEPTED, DUPLICATE, UNKNOWN_REQUEST, EXPIRED, BAD_RECORD = (
    "accepted",
    "duplicate",
    "unknown_request",
    "expired",
    "bad_record",
)


@dataclass(frozen=True, slots=True)
class Served:
    """What a variant answered for one request: a class (with probabilities when known) or a value."""

    route: str
    variant: str
    t: float
    top: str | None = None
    probs: tuple[tuple[str, float], ...] = ()
    value: float | None = None


def served(record: Mapping[str, Any]) -> Served:
    """A prediction record's content, checked; ValueError says what is wrong."""
    p = record["prediction"]
    if not isinstance(p, Mapping):
        raise ValueError("prediction must be an object")
    route, variant, t = str(record["route"]), str(record["variant"]), float(record["t"])
    if "value" in p:
        value = float(p["value"])
        if not math.isfinite(value):
            raise ValueError("prediction value must be finite")
        return Served(route, variant, t, value=value)
    top = p.get("top")
    if top is None:
        raise ValueError("prediction needs top (a class) or value")
    probs = p.get("p") or {}
    if not isinstance(probs, Mapping) or len(probs) > MAX_CLASSES:
        raise ValueError(f"prediction p must map at most {MAX_CLASSES} classes to probabilities")
    pairs = tuple((str(k), float(v)) for k, v in probs.items())
    if any(not 0.0 <= v <= 1.0 for _, v in pairs):
        raise ValueError("probabilities must lie in [0, 1]")
    return Served(route, variant, t, top=str(top), probs=pairs)


def class_name(label: float) -> str:
    """A numeric label as a class name: 1.0 -> "1" (classes travel as strings)."""
    return str(int(label)) if float(label).is_integer() else repr(float(label))


@dataclass(slots=True)
class _Tally:
    """Running sums for one route/variant (means and variances without keeping every label)."""

    n: int = 0
    correct: int = 0
    ll_n: int = 0
    ll: float = 0.0
    ll2: float = 0.0
    reg_n: int = 0
    abs_: float = 0.0
    sq: float = 0.0  # squared errors: the RMSE, and the second moment of |error| for the MAE's interval

    def add(self, s: Served, label: float) -> None:
        self.n += 1
        if s.value is not None:
            err = s.value - label
            self.reg_n += 1
            self.abs_ += abs(err)
            self.sq += err * err
            return
        name = class_name(label)
        self.correct += s.top == name
        if s.probs:
            p = dict(s.probs).get(name, 0.0)
            loss = -math.log(min(max(p, EPS), 1.0 - EPS))
            self.ll_n += 1
            self.ll += loss
            self.ll2 += loss * loss


def _mean(total: float, total2: float, n: int) -> tuple[float, float]:
    """Mean and the variance of that mean (sample variance / n)."""
    mean = total / n
    var = max(0.0, (total2 - n * mean * mean) / (n - 1)) if n > 1 else math.inf
    return mean, var / n


def _stat(value: float, var: float) -> dict[str, Any]:
    half = Z95 * math.sqrt(var) if math.isfinite(var) else math.inf
    lo, hi = value - half, value + half
    return {"value": round(value, 8), "interval": [_num(lo), _num(hi)]}


def _num(v: float) -> float | None:
    return round(v, 8) if math.isfinite(v) else None


def summary(t: _Tally) -> dict[str, Any]:
    """One variant's figures (only those its predictions allow)."""
    out: dict[str, Any] = {"labels": t.n}
    classified = t.n - t.reg_n
    if classified:
        lo, hi = proportion_confint(t.correct, classified, alpha=0.05, method="wilson")
        acc = t.correct / classified
        out["accuracy"] = {"value": round(acc, 8), "interval": [round(float(lo), 8), round(float(hi), 8)]}
        out["_acc"] = (acc, acc * (1 - acc) / classified)
    if t.ll_n:
        mean, var = _mean(t.ll, t.ll2, t.ll_n)
        out["log_loss"] = _stat(mean, var)
        out["_ll"] = (mean, var)
    if t.reg_n:
        mean, var = _mean(t.abs_, t.sq, t.reg_n)
        out["mae"] = _stat(mean, var)
        out["rmse"] = round(math.sqrt(t.sq / t.reg_n), 8)
        out["_mae"] = (mean, var)
    return out


class LabelBook:
    """Served predictions by exposure id, labels joined to them, tallies per route and variant."""

    def __init__(self, max_predictions: int = MAX_PREDICTIONS) -> None:
        self.max_predictions = max_predictions
        self.counts: Counter[str] = Counter()  # evicted predictions, labels by status
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._labelled: OrderedDict[str, None] = OrderedDict()
        self._tallies: dict[tuple[str, str], _Tally] = {}

    def predict(self, record: Mapping[str, Any]) -> str:
        """Keep one served prediction (a ``kind: prediction`` record)."""
        s = served(record)  # ValueError/KeyError/TypeError: the ledger answers bad_record
        eid = exposure_id(str(record["request_id"]))
        if eid in self._served or eid in self._labelled:
            return DUPLICATE
        self._served[eid] = s
        while len(self._served) > self.max_predictions:
            self._served.popitem(last=False)
            self.counts["predictions_evicted"] += 1
        return ACCEPTED

    def label(self, record: Mapping[str, Any], t: float, keys: tuple[bytes, ...], window_s: float) -> str:
        """Join one label (an outcome with metric `LABEL_METRIC`) to its prediction."""
        value = float(record["value"])
        if record.get("exposure"):
            try:
                eid = verify(str(record["exposure"]), keys, t, window_s).eid
            except ExposureRefused as exc:
                return exc.code
        elif record.get("request_id"):
            eid = exposure_id(str(record["request_id"]))
        else:
            return BAD_RECORD
        if eid in self._labelled:
            return DUPLICATE
        s = self._served.get(eid)
        if s is None:
            return UNKNOWN_REQUEST
        if t - s.t > window_s:
            return EXPIRED
        del self._served[eid]
        self._labelled[eid] = None
        while len(self._labelled) > self.max_predictions:
            self._labelled.popitem(last=False)
        self._tallies.setdefault((s.route, s.variant), _Tally()).add(s, value)
        return ACCEPTED

    def results(self, route: str, control: str | None = None) -> list[dict[str, Any]]:
        """Per variant of ``route`` with labels (control first): its figures, and a challenger's
        difference from control with a 95 % normal interval (fixed horizon)."""
        variants = sorted((v for r, v in self._tallies if r == route), key=lambda v: (v != control, v))
        rows = {v: summary(self._tallies[(route, v)]) for v in variants}
        base = rows.get(control) if control is not None else None
        out = []
        for v in variants:
            row = rows[v]
            doc = {"route": route, "variant": v, **{k: x for k, x in row.items() if not k.startswith("_")}}
            if base is not None and v != control:
                diff = {}
                for key, name in (("_acc", "accuracy"), ("_ll", "log_loss"), ("_mae", "mae")):
                    if key in row and key in base:
                        (m1, v1), (m0, v0) = row[key], base[key]
                        diff[name] = _stat(m1 - m0, v1 + v0)
                doc["vs_control"] = diff
            out.append(doc)
        return out

    def pending(self) -> int:
        """Predictions still waiting for their label."""
        return len(self._served)
