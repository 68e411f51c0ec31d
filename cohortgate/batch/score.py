"""onnxruntime for batch jobs: one session per model file and process, rows grouped by backend.

Sessions are cached per process (a Spark Python worker is reused across tasks, so a partition pays
for loading a model once per worker, not once per partition). onnxruntime errors are translated
here, into `ScoreError`, the one place the batch package meets them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_SESSIONS: dict[tuple[str, int], Any] = {}

_NUMPY = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32"}


class ScoreError(RuntimeError):
    """A model file cannot be loaded or run on the rows (onnxruntime's message is kept)."""


@dataclass(frozen=True, slots=True)
class Output:
    """One tensor a model returns per row: a scalar (rank 1) or a vector (rank 2)."""

    name: str
    dtype: str  # numpy dtype name
    rank: int


@dataclass(frozen=True, slots=True)
class Signature:
    input: str
    width: int | None  # features per row, when the model fixes it
    outputs: tuple[Output, ...]


def session(path: str, threads: int = 0) -> Any:
    key = (path, threads)
    found = _SESSIONS.get(key)
    if found is None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            found = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ScoreError(f"cannot load model {path}: {exc}") from None
        _SESSIONS[key] = found
    return found


def signature(path: str) -> Signature:
    """The model's one input and its tensor outputs (batch scoring needs plain tensors)."""
    s = session(path)
    inputs = s.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 2:
        raise ScoreError(f"model {path} must take one [rows, features] input, takes {[i.name for i in inputs]}")
    width = inputs[0].shape[1] if isinstance(inputs[0].shape[1], int) else None
    outputs = []
    for o in s.get_outputs():
        if o.type not in _NUMPY or len(o.shape) not in (1, 2):
            raise ScoreError(f"model {path}: output {o.name!r} is {o.type} of rank {len(o.shape)}; batch needs tensors")
        outputs.append(Output(o.name, _NUMPY[o.type], len(o.shape)))
    return Signature(inputs[0].name, width, tuple(outputs))


def run(path: str, matrix: np.ndarray, threads: int = 0) -> dict[str, np.ndarray]:
    s = session(path, threads)
    try:
        values = s.run(None, {s.get_inputs()[0].name: matrix})
    except Exception as exc:
        raise ScoreError(f"model {path} failed on {len(matrix)} rows: {exc}") from None
    return {o.name: v for o, v in zip(s.get_outputs(), values, strict=True)}
