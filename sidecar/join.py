"""Joining online features into a request's model input, or saying why the fallback serves it (issue 22).

The route's ``features:`` block (`cohortgate.core.policy.Features`) names the Feast views; the gateway
passes the entity id in ``x-cohortgate-entity``. The client sends the model's input without the joined
columns; `Joiner.join` fetches the entity's row (`sidecar.features`: one pipelined round trip, under
``budget_ms``) and appends its values, in ``views`` order, as columns of one input (every row of the
request gets the same values: one entity per request). Widths come from the models, so nothing is
guessed at serving time:

* with a fallback **model**: the primary's input is ``[-1, D]``, the fallback's ``[-1, D - k]``: the
  client sends what the fallback takes, and a miss runs the fallback on it unchanged;
* with **defaults**: ``k`` is the defaults' flattened length, and a miss joins the defaults instead.

A fallback is never silent: its reason is counted (``/metrics``), answered in ``x-cohortgate-features``
and carried in the shadow report to the controller. Reasons: the reader's ``missing``, ``stale``,
``over_budget``, ``unavailable``, and here ``no_entity`` (no usable id: absent, or not an integer for
an int64 key) and ``invalid`` (a value that is not numbers of the width the model takes).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily

from cohortgate.core.contract import FEATURE_FALLBACK_REASONS
from cohortgate.core.policy import Features
from sidecar.batching import Tensors
from sidecar.errors import ModelLoadError
from sidecar.features import REASONS as STORE_REASONS
from sidecar.features import FeastRedisReader, FeatureSpec
from sidecar.metrics import LATENCY_BUCKETS, PREFIX, Histogram
from sidecar.protocol import Signature, TensorSpec

REASONS = FEATURE_FALLBACK_REASONS  # the reader's (STORE_REASONS), then no_entity and invalid
assert set(STORE_REASONS) < set(REASONS)
JOINED = "joined"
_INT64 = (-(2**63), 2**63 - 1)
_FLOATS = ("FP32", "FP64")


@dataclass(frozen=True, slots=True)
class JoinSettings:
    """What one sidecar joins: the route's ``features:`` block, as the sidecar takes it."""

    spec: FeatureSpec
    store: str = field(repr=False)  # may hold a password
    entity_type: str = "string"  # string | int64
    input: str | None = None  # the input extended (None: the first)
    fallback_model: str | None = None
    defaults: tuple[tuple[float, ...], ...] | None = None

    @classmethod
    def from_features(cls, f: Features) -> JoinSettings:
        spec = FeatureSpec(f.project, f.join_key, f.views, f.budget_ms, f.max_age_s)
        return cls(spec, f.store, f.entity_type, f.input, f.fallback_model, f.defaults)


@dataclass(frozen=True, slots=True)
class Joined:
    """A request's input for the primary (``inputs``; None: run the fallback model on the request's own),
    and the fallback reason (None when the features were joined)."""

    inputs: Tensors | None
    reason: str | None = None

    @property
    def label(self) -> str:
        """``x-cohortgate-features``: ``joined`` or ``fallback:<reason>``."""
        return JOINED if self.reason is None else f"fallback:{self.reason}"


def _join_input(signature: Signature, name: str | None) -> int:
    index = signature._inputs_by_name.get(name) if name is not None else 0
    if index is None:
        raise ModelLoadError(f"features.input {name!r} is not an input of model {signature.name!r}")
    spec = signature.inputs[index]
    if len(spec.shape) != 2 or spec.shape[0] != -1 or spec.shape[1] < 0 or spec.datatype not in _FLOATS:
        raise ModelLoadError(
            f"features are joined as columns of a [-1, D] FP32 or FP64 input; {spec.name!r} of model "
            f"{signature.name!r} is {spec.describe()}"
        )
    return index


def request_signature(settings: JoinSettings, model: Signature, fallback: Signature | None) -> tuple[Signature, int]:
    """What a client sends (the model's input less the joined columns) and how many columns are joined;
    raise `ModelLoadError` when the models and the declared features do not fit together."""
    index = _join_input(model, settings.input)
    spec = model.inputs[index]
    if fallback is not None:
        if [(s.name, s.datatype) for s in fallback.outputs] != [(s.name, s.datatype) for s in model.outputs]:
            raise ModelLoadError(
                f"the fallback model {fallback.name!r} must give the outputs of {model.name!r} "
                f"({', '.join(s.describe() for s in model.outputs)}), in that order"
            )
        if [(s.name, s.datatype) for s in fallback.inputs] != [(s.name, s.datatype) for s in model.inputs]:
            raise ModelLoadError(
                f"the fallback model {fallback.name!r} must take the inputs of {model.name!r} by name and datatype"
            )
        fb = fallback.inputs[index]
        width = spec.shape[1] - (fb.shape[1] if len(fb.shape) == 2 else -1)
        if len(fb.shape) != 2 or fb.shape[0] != -1 or width <= 0:
            raise ModelLoadError(
                f"the fallback model takes {fb.describe()}: it must take {spec.name!r} with fewer columns "
                f"than {model.name!r} ({spec.describe()}), the joined ones left out"
            )
        inputs = fallback.inputs
    else:
        width = sum(len(d) for d in settings.defaults or ())
        if width > spec.shape[1]:
            raise ModelLoadError(
                f"the features' defaults have {width} values but input {spec.name!r} of {model.name!r} "
                f"has {spec.shape[1]} columns"
            )
        inputs = tuple(
            TensorSpec(s.name, s.datatype, (-1, s.shape[1] - width)) if i == index else s
            for i, s in enumerate(model.inputs)
        )
    return replace(model, inputs=tuple(inputs)), width


class Joiner:
    """Joins one entity's features into a request's input; a prometheus collector of its counters."""

    def __init__(
        self, settings: JoinSettings, reader: FeastRedisReader, model: Signature, fallback: Signature | None
    ) -> None:
        self.settings = settings
        self.reader = reader
        self.model_name = model.name
        self.signature, self.width = request_signature(settings, model, fallback)
        self.index = _join_input(model, settings.input)
        self.dtype = np.float32 if model.inputs[self.index].datatype == "FP32" else np.float64
        self.has_fallback_model = fallback is not None
        self.defaults = (
            np.array([x for d in settings.defaults for x in d], self.dtype) if settings.defaults is not None else None
        )
        self.fallbacks = reader.stats.fallbacks  # by reason, the reader's and ours
        self.fetch_seconds = Histogram(LATENCY_BUCKETS)

    def entity(self, raw: str | None) -> str | int | None:
        if not raw:
            return None
        if self.settings.entity_type == "string":
            return raw
        try:
            value = int(raw, 10)
        except ValueError:
            return None
        return value if _INT64[0] <= value <= _INT64[1] else None

    async def join(self, raw_entity: str | None, inputs: Tensors) -> Joined:
        """The primary's input with the entity's features joined, else the fallback and its reason."""
        entity = self.entity(raw_entity)
        if entity is None:
            self.fallbacks["no_entity"] += 1
            return self._fallback(inputs, "no_entity")
        started = time.perf_counter()
        lookup = (await self.reader.fetch([entity]))[0]
        self.fetch_seconds.observe(time.perf_counter() - started)
        if lookup.reason is not None:
            return self._fallback(inputs, lookup.reason)
        row = self._row(lookup.values)  # type: ignore[arg-type]
        if row is None:
            self.fallbacks["invalid"] += 1
            self.reader.stats.served -= 1  # read, but not served
            return self._fallback(inputs, "invalid")
        return Joined(self._with(inputs, row))

    def _row(self, values: tuple[Any, ...]) -> np.ndarray | None:
        flat: list[float] = []
        for v in values:
            if isinstance(v, float):
                flat.append(v)
            elif isinstance(v, list):
                flat.extend(v)
            else:  # a string or bytes feature: not a number the model takes
                return None
        return np.array(flat, self.dtype) if len(flat) == self.width else None

    def _fallback(self, inputs: Tensors, reason: str) -> Joined:
        if self.defaults is None:
            return Joined(None, reason)
        return Joined(self._with(inputs, self.defaults), reason)

    def _with(self, inputs: Tensors, row: np.ndarray) -> Tensors:
        x = inputs[self.index]
        joined = np.concatenate([x.astype(self.dtype, copy=False), np.broadcast_to(row, (x.shape[0], row.size))], 1)
        return (*inputs[: self.index], joined, *inputs[self.index + 1 :])

    # Scrape --------------------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        m = self.model_name
        joins = CounterMetricFamily(
            f"{PREFIX}_feature_joins", "Requests served with their online features joined.", labels=["model"]
        )
        joins.add_metric([m], self.reader.stats.served)
        yield joins
        fallbacks = CounterMetricFamily(
            f"{PREFIX}_feature_fallbacks",
            "Requests whose features could not be joined (the fallback served them), by reason.",
            labels=["model", "reason"],
        )
        for reason in REASONS:
            fallbacks.add_metric([m, reason], self.fallbacks.get(reason, 0))
        yield fallbacks
        yield self.reader.stats.age_seconds.family(
            f"{PREFIX}_feature_age_seconds", "Age of the oldest feature view served (event time to now).", m
        )
        yield self.fetch_seconds.family(
            f"{PREFIX}_feature_fetch_seconds", "The online store's round trip per request.", m
        )
