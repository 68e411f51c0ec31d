"""``cohortgate models profile``: a data contract and its reference sketches, from reference data.

Reads a table (Parquet or CSV, with pyarrow), maps its columns to the model's inputs, runs the model
over it (onnxruntime) for the outputs, and writes one feature per column and per output column:

* type: a bool column is ``bool``; an integer column with at most ``MAX_CATEGORIES`` distinct values
  a ``category`` (its values allowed), a wider one ``int``; anything else ``float``;
* range: the observed [min, max] widened by ``margin`` of its span on each side (a starting point for
  a person to tighten, not a verdict: values just outside the reference are normal);
* nullable: whether the reference holds a null;
* reference: the sketch of the reference on ``bins`` quantile bins (equal mass, so PSI and
  Jensen-Shannon see every bin), or counts per category.

Columns map to inputs by name when every input is a one-column tensor named like a column, else in
table order onto a single ``[-1, k]`` input when the table has ``k`` columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cohortgate.core.sketch import NumericSketch
from sidecar.contract import ContractSpec, category_sketch
from sidecar.errors import ModelLoadError
from sidecar.protocol import DATATYPES, Signature

MAX_CATEGORIES = 20
DEFAULT_BINS = 10
DEFAULT_MARGIN = 0.1
_RUN_ROWS = 4096


@dataclass(frozen=True, slots=True)
class Table:
    """Reference data: each column as float64 (a null is NaN) and its kind: bool, int or float."""

    columns: Mapping[str, np.ndarray]
    kinds: Mapping[str, str]

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values())))


def read_table(path: str | Path) -> Table:
    """A .parquet or .csv file's numeric columns; ``ModelLoadError`` says what does not fit."""
    path = Path(path)
    try:
        import pyarrow as pa
    except ImportError:  # the demo install has no pyarrow: CSV still works, through numpy
        if path.suffix.lower() == ".csv":
            return _read_csv_numpy(path)
        raise ModelLoadError("reading Parquet needs pyarrow: pip install 'cohortgate[batch]' (or use a .csv)") from None
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif path.suffix.lower() == ".csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
        else:
            raise ModelLoadError(f"--data {path}: give a .parquet or .csv file")
    except (OSError, pa.ArrowInvalid) as exc:
        raise ModelLoadError(f"cannot read --data {path}: {exc}") from None
    columns: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        kind = column.type
        if pa.types.is_boolean(kind):
            kinds[name] = "bool"
        elif pa.types.is_integer(kind):
            kinds[name] = "int"
        elif pa.types.is_floating(kind):
            kinds[name] = "float"
        else:
            raise ModelLoadError(
                f"--data column {name!r} is {kind}: model tensors are numeric, so encode it as numbers first"
            )
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)  # a null becomes NaN
        columns[name] = np.asarray(values, dtype=np.float64)
    if not columns or table.num_rows == 0:
        raise ModelLoadError(f"--data {path} has no rows")
    return Table(columns, kinds)


def _read_csv_numpy(path: Path) -> Table:
    try:
        with path.open(encoding="utf-8") as f:
            names = [n.strip() for n in f.readline().strip().split(",")]
        data = np.genfromtxt(path, delimiter=",", skip_header=1, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read --data {path}: {exc}") from None
    if data.size == 0 or data.shape[1] != len(names):
        raise ModelLoadError(f"--data {path} has no rows, or rows that do not match its header")
    columns = {n: data[:, j] for j, n in enumerate(names)}
    kinds = {n: "int" if bool(np.all(np.mod(v[~np.isnan(v)], 1) == 0)) else "float" for n, v in columns.items()}
    return Table(columns, kinds)


def map_columns(signature: Signature, columns: Mapping[str, np.ndarray]) -> list[tuple[str, str, int | None]]:
    """(column, input tensor, tensor column) for each data column the model takes."""
    inputs = signature.inputs
    names = list(columns)
    if all(_width(s.shape) == 1 and s.name in columns for s in inputs):
        return [(s.name, s.name, None) for s in inputs]
    if len(inputs) == 1 and _width(inputs[0].shape) == len(names):
        return [(c, inputs[0].name, j) for j, c in enumerate(names)]
    expected = ", ".join(f"{s.name} {list(s.shape)}" for s in inputs)
    raise ModelLoadError(
        f"cannot map the data's {len(names)} columns to the model's inputs ({expected}): name the columns like "
        "one-column inputs, or give exactly one column per column of a single [-1, k] input, in order"
    )


def _width(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) >= 1 else 1


def feature(
    name: str, values: np.ndarray, kind: str, tensor: str, column: int | None, *, bins: int, margin: float
) -> dict[str, Any]:
    """One contract feature (with its reference sketch) describing ``values`` of ``kind`` bool, int or float."""
    xf = np.asarray(values, dtype=np.float64)
    present = xf[~np.isnan(xf)]
    doc: dict[str, Any] = {"name": name, "tensor": tensor}
    if column is not None:
        doc["column"] = column
    doc["nullable"] = bool(present.size < xf.size)
    if present.size == 0:
        raise ModelLoadError(f"column {name!r} holds only nulls: nothing to profile")
    integral = kind == "int"
    if kind == "bool":
        doc["type"] = "bool"
        doc["reference"] = NumericSketch.of(xf, (0.0, 0.5, 1.0)).to_json()
        return doc
    uniq = np.unique(present)
    if integral and uniq.size <= MAX_CATEGORIES:
        doc["type"] = "category"
        doc["allowed"] = [float(v) for v in uniq]
        doc["reference"] = category_sketch(xf, uniq.tolist()).to_json()
        return doc
    lo, hi = float(present.min()), float(present.max())
    pad = margin * (hi - lo)
    doc["type"] = "int" if integral else "float"
    doc["min"], doc["max"] = (math.floor(lo - pad), math.ceil(hi + pad)) if integral else (lo - pad, hi + pad)
    doc["reference"] = NumericSketch.of(xf, quantile_edges(present, bins)).to_json()
    return doc


def quantile_edges(values: np.ndarray, bins: int) -> tuple[float, ...]:
    """``bins`` equal-mass bins over the values (fewer where values tie); two edges at least."""
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:
        v = float(edges[0])
        return (v - 0.5, v + 0.5)
    return tuple(float(e) for e in edges)


def encode(doc: dict[str, Any]) -> bytes:
    """A contract document as its file holds it: indented JSON and a final newline."""
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


def profile(
    signature: Signature,
    run: Any,
    table: Table,
    *,
    bins: int = DEFAULT_BINS,
    margin: float = DEFAULT_MARGIN,
    mode: str = "observe",
) -> dict[str, Any]:
    """The contract document: inputs from ``columns``, outputs from ``run`` (the model) over them."""
    columns = table.columns
    mapping = map_columns(signature, columns)
    inputs = [feature(c, columns[c], table.kinds[c], t, j, bins=bins, margin=margin) for c, t, j in mapping]
    complete = np.ones(table.rows, dtype=bool)  # the model runs on rows without a null
    for c, _, _ in mapping:
        complete &= ~np.isnan(columns[c])
    tensors = []
    for spec in signature.inputs:
        dtype = DATATYPES[spec.datatype]
        parts = [(c, j) for c, t, j in mapping if t == spec.name]
        if len(parts) == 1 and parts[0][1] is None:
            block = columns[parts[0][0]][complete].reshape((-1, *spec.shape[1:]))
        else:
            block = np.stack([columns[c][complete] for c, _ in parts], axis=1)
        tensors.append(block.astype(dtype))
    kept = int(complete.sum())
    outputs_run = [run(tuple(t[i : i + _RUN_ROWS] for t in tensors)) for i in range(0, kept, _RUN_ROWS)]
    taken = {f["name"] for f in inputs}
    outputs = []
    for k, spec in enumerate(signature.outputs):
        if not outputs_run:
            break
        array = np.concatenate([o[k] for o in outputs_run])
        block = array.reshape(array.shape[0], -1)
        width = block.shape[1]
        kind = "bool" if array.dtype.kind == "b" else "int" if array.dtype.kind in "iu" else "float"
        for j in range(width):
            name = spec.name if width == 1 else f"{spec.name}[{j}]"
            if name in taken:
                name = f"output:{name}"
            outputs.append(
                feature(name, block[:, j], kind, spec.name, None if width == 1 else j, bins=bins, margin=margin)
            )
    doc = {"version": 1, "model": signature.name, "mode": mode, "inputs": inputs, "outputs": outputs}
    ContractSpec.model_validate(doc)  # what we write, the sidecar reads
    return doc
