"""The served prediction of one request, as the sidecar reports it for accuracy once labels arrive.

Only what the model answered leaves the sidecar, never its input: for a classifier the top class
and the class probabilities (at most `MAX_CLASSES`), for a regressor the value. Which outputs are
which is read from their names and shapes:

* a probability output (``probabilities``, ``probability``, ``probs``, ``output_probability``)
  of shape ``[rows, k]``: the class probabilities, classes named ``0..k-1``; the top class is a
  ``label`` output when there is one, else the most probable class;
* else a ``label`` output alone: the top class;
* else one numeric output of shape ``[rows]`` or ``[rows, 1]``: the value.

A request of several rows has several predictions but one request id, so one label cannot be
joined to one of them: those (and outputs read none of these ways) report no prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_CLASSES = 32  # the controller's limit too (cohortgate.controller.labels)
PROBABILITY_NAMES = ("probabilities", "probability", "probs", "output_probability")
LABEL_NAMES = ("label", "output_label", "labels")


def served_prediction(names: Sequence[str], outputs: Sequence[np.ndarray]) -> dict[str, Any] | None:
    """``{"top": CLASS, "p": {CLASS: P}}``, ``{"top": CLASS}`` or ``{"value": X}`` for a one-row answer."""
    by_name = {n.lower(): np.asarray(a) for n, a in zip(names, outputs, strict=True)}
    if any(a.ndim == 0 or a.shape[0] != 1 for a in by_name.values()):
        return None  # several rows (or a scalar): no single prediction per request id
    probs = next((by_name[n] for n in PROBABILITY_NAMES if n in by_name), None)
    label = next((by_name[n] for n in LABEL_NAMES if n in by_name), None)
    if probs is not None and probs.ndim == 2 and 1 < probs.shape[1] <= MAX_CLASSES and probs.dtype.kind == "f":
        row = probs[0].astype(float)
        top = _class(label[0]) if label is not None and label.size == 1 else str(int(np.argmax(row)))
        return {"top": top, "p": {str(i): round(float(p), 6) for i, p in enumerate(row)}}
    if label is not None and label.size == 1:
        return {"top": _class(label.reshape(-1)[0])}
    if len(by_name) == 1:
        (only,) = by_name.values()
        if only.size == 1 and only.dtype.kind in "fiu":
            value = float(only.reshape(-1)[0])
            return {"value": value} if np.isfinite(value) else None
    return None


def _class(v: Any) -> str:
    """A class as the controller names it: integers as ``"1"``, strings as they are."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)
