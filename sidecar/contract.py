"""Data contracts: what a model's inputs and outputs may hold, checked per request over the batch.

A contract is JSON (``M.contract.json`` beside ``M.onnx``, a store version's manifest, the policy's
``contract:`` or ``--contract``), written by ``cohortgate models profile`` and edited by hand::

    {"version": 1, "mode": "observe" | "enforce",
     "inputs":  [{"name": "mean radius", "tensor": "input", "column": 0, "type": "float",
                  "min": 6.0, "max": 30.0, "nullable": false, "reference": {<NumericSketch>}}, ...],
     "outputs": [{"name": "p_malignant", "tensor": "probabilities", "column": 1, "min": 0, "max": 1}, ...]}

A *feature* is one column of a model tensor (``column`` of a ``[-1, k]`` tensor; none for a ``[-1]``
or ``[-1, 1]`` tensor). Rules, each counted per feature in rows that break it:

    null     NaN where ``nullable`` is false (only float tensors can hold a null)
    type     float: +-inf; int: not a whole number; bool: neither 0 nor 1
    range    a finite value below ``min`` or above ``max``
    allowed  a ``category`` value outside ``allowed``

``enforce`` refuses a request whose inputs break a rule (422, naming the first feature and rule);
``observe`` serves it and counts. Outputs are only counted, in both modes: the client did not send
them, and a refusal would punish it for the model; the controller's quality guardrails act on them.

Pure and vectorised: per tensor, one comparison of the whole ``(rows, columns)`` block against
precomputed bound vectors answers the common case (every value fine); only a failing block pays
for the per-rule breakdown. ``reference`` sketches give the bin edges of the live sketches
(``cohortgate.core.sketch``), so the controller compares like with like.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from cohortgate.core.datacontract import ContractSpec, FeatureSpec, is_inline
from cohortgate.core.sketch import CategoricalSketch, NumericSketch, Sketch, sketch_from_json
from sidecar.errors import ModelLoadError, SidecarError
from sidecar.protocol import Signature, TensorSpec

CONTRACT_SUFFIX = ".contract.json"
MODES = ("observe", "enforce")
TYPES = ("float", "int", "bool", "category")
RULES = ("null", "type", "range", "allowed")
_BIG = float(np.finfo(np.float64).max)


class ContractViolation(SidecarError):
    """Inputs that break the model's contract in ``enforce`` mode: 422, naming the feature and rule."""

    status = 422

    def __init__(self, message: str, feature: str, rule: str) -> None:
        super().__init__(message)
        self.feature = feature
        self.rule = rule

    @property
    def details(self) -> dict[str, str]:
        return {"code": "contract_violation", "feature": self.feature, "rule": self.rule}


# -- The file format (`cohortgate.core.datacontract`: a bad contract is refused with the field that is wrong)


def parse(doc: Any, where: str = "the data contract") -> ContractSpec:
    """Validate a contract document; ``ModelLoadError`` names the first bad field."""
    try:
        return ContractSpec.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ModelLoadError(f"{where}: {loc}: {err['msg']}") from None


# -- Compiled: resolved against the model's signature, bounds as vectors ---------------------------


@dataclass(frozen=True, slots=True)
class Feature:
    """One checked column: where it lives and what it may hold."""

    name: str
    tensor: str
    column: int | None
    type: str
    min: float | None
    max: float | None
    allowed: tuple[float, ...]
    nullable: bool
    reference: Sketch | None

    @property
    def edges(self) -> tuple[float, ...]:
        """The bin edges of this feature's live sketches: the reference's, else `default_edges`."""
        return self.reference.edges if isinstance(self.reference, NumericSketch) else self.default_edges()

    def sketch(self, values: np.ndarray) -> Sketch:
        """The live sketch of ``values`` on the reference's edges (or counts per allowed value)."""
        if self.type == "category":
            return category_sketch(values, self.allowed)
        return NumericSketch.of(values, self.edges)

    def default_edges(self) -> tuple[float, ...]:
        """Ten equal bins over [min, max] when the contract has no reference (or [0, 1] for bool)."""
        if self.type == "bool":
            return (0.0, 0.5, 1.0)
        lo = self.min if self.min is not None else 0.0
        hi = self.max if self.max is not None else lo + 1.0
        if hi <= lo:
            hi = lo + 1.0
        return tuple(float(v) for v in np.linspace(lo, hi, 11))


def label(value: float) -> str:
    """The category key of a numeric value: ``3`` for 3.0, ``0.5`` for 0.5."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def category_sketch(values: np.ndarray, allowed: Sequence[float]) -> CategoricalSketch:
    """Counts per allowed value (NaN is a null; other values counted, never named)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    nan = np.isnan(x)
    uniq, n = np.unique(x[~nan], return_counts=True)
    seen = dict(zip(uniq.tolist(), n.tolist(), strict=True))
    counts = {label(a): int(seen.pop(float(a), 0)) for a in allowed}
    return CategoricalSketch(counts, int(nan.sum()), int(sum(seen.values())))


@dataclass(frozen=True, slots=True)
class Findings:
    """What one check found: rows per feature and rule, and the first broken (feature, rule)."""

    counts: Mapping[str, Mapping[str, int]]
    first: tuple[Feature, str, int]  # feature, rule, rows

    def message(self, side: str) -> str:
        f, rule, rows = self.first
        where = f"{side} '{f.tensor}'" + (f" column {f.column}" if f.column is not None else "")
        what = {
            "null": "is null (NaN) but the contract says it is not nullable",
            "type": f"is not a valid {f.type} value" + (" (infinite)" if f.type == "float" else ""),
            "range": f"is outside its range [{_fmt(f.min, '-inf')}, {_fmt(f.max, 'inf')}]",
            "allowed": f"is not one of its allowed values ({', '.join(label(a) for a in f.allowed[:10])}"
            + (", ...)" if len(f.allowed) > 10 else ")"),
        }[rule]
        return f"feature '{f.name}' ({where}) {what} in {rows} row(s); rule '{rule}' of the model's data contract"


def _fmt(v: float | None, unbounded: str) -> str:
    return unbounded if v is None else f"{v:g}"


class _TensorRules:
    """The rules of every feature of one tensor, as vectors over its selected columns."""

    __slots__ = (
        "bins",
        "bool_pos",
        "cats",
        "cols",
        "fast32",
        "fast_hi",
        "fast_lo",
        "features",
        "hi",
        "index",
        "int_pos",
        "lo",
        "not_nullable",
        "whole",
    )

    def __init__(self, index: int, features: list[Feature]) -> None:
        self.index = index
        self.features = tuple(features)
        cols = [f.column or 0 for f in features]
        self.cols = np.asarray(cols, dtype=np.intp)
        self.whole = cols == list(range(len(cols)))
        self.lo = np.array([-math.inf if f.min is None else f.min for f in features])
        self.hi = np.array([math.inf if f.max is None else f.max for f in features])
        # The fast check: every value finite and inside these bounds, nothing else to look at.
        fast_lo = [(-_BIG if f.min is None else f.min) for f in features]
        fast_hi = [(_BIG if f.max is None else f.max) for f in features]
        for i, f in enumerate(features):
            if f.type == "bool":
                fast_lo[i], fast_hi[i] = 0.0, 1.0
        self.fast_lo, self.fast_hi = np.array(fast_lo), np.array(fast_hi)
        self.fast32 = _float32_bounds(self.fast_lo, self.fast_hi)
        self.not_nullable = np.array([not f.nullable for f in features])
        self.int_pos = np.array([i for i, f in enumerate(features) if f.type in ("int", "bool")], dtype=np.intp)
        self.bool_pos = np.array([i for i, f in enumerate(features) if f.type == "bool"], dtype=np.intp)
        self.cats = tuple((i, np.asarray(f.allowed)) for i, f in enumerate(features) if f.type == "category")
        self.bins = _Binning([(i, f.edges) for i, f in enumerate(features) if f.type != "category"])

    def block(self, array: np.ndarray) -> np.ndarray:
        x = array.reshape(array.shape[0], math.prod(array.shape[1:])) if array.ndim else array.reshape(1, 1)
        if x.dtype.kind == "b":
            x = x.view(np.uint8)
        return x if self.whole and x.shape[1] == len(self.cols) else x[:, self.cols]

    def clean(self, x: np.ndarray) -> bool:
        """The common case in a few vector operations: True when no rule is broken."""
        lo, hi = self.fast32 if x.dtype == np.float32 else (self.fast_lo, self.fast_hi)
        if not (bool((x >= lo).all()) and bool((x <= hi).all())):
            return False  # NaN compares false: nulls, like infinities, take the slow path
        if self.int_pos.size and x.dtype.kind == "f":
            xi = x[:, self.int_pos]
            if not bool((xi == np.floor(xi)).all()):
                return False
        return all(bool(np.isin(x[:, i], allowed).all()) for i, allowed in self.cats)

    def breakdown(self, x: np.ndarray) -> np.ndarray:
        """Rows breaking each rule, shape (len(RULES), features)."""
        out = np.zeros((len(RULES), len(self.features)), dtype=np.int64)
        xf = x.astype(np.float64, copy=False)
        nan = np.isnan(xf)
        finite = np.isfinite(xf)
        out[0] = (nan & self.not_nullable).sum(axis=0)
        bad_type = ~finite & ~nan  # infinities, for every type
        if self.int_pos.size:
            xi = xf[:, self.int_pos]
            bad_type[:, self.int_pos] |= finite[:, self.int_pos] & (xi != np.floor(xi))
        if self.bool_pos.size:
            xb = xf[:, self.bool_pos]
            bad_type[:, self.bool_pos] |= finite[:, self.bool_pos] & (xb != 0) & (xb != 1)
        out[1] = bad_type.sum(axis=0)
        out[2] = (finite & ((xf < self.lo) | (xf > self.hi))).sum(axis=0)
        for i, allowed in self.cats:
            out[3, i] = int((finite[:, i] & ~np.isin(xf[:, i], allowed)).sum())
        return out


def _float32_bounds(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds a float32 block compares against without a cast, deciding exactly as the float64 ones:
    x >= lo  <=>  x >= (the least float32 >= lo); x <= hi  <=>  x <= (the greatest float32 <= hi);
    clipped to the finite float32 range, so an infinity still fails."""
    big = np.finfo(np.float32).max
    lo32 = np.clip(lo, -big, big).astype(np.float32)
    up = lo32 < np.clip(lo, -big, big)
    lo32[up] = np.nextafter(lo32[up], np.float32(np.inf))
    hi32 = np.clip(hi, -big, big).astype(np.float32)
    down = hi32 > np.clip(hi, -big, big)
    hi32[down] = np.nextafter(hi32[down], np.float32(-np.inf))
    lo32[lo > big] = np.inf  # beyond every finite float32: nothing passes
    hi32[hi < -big] = -np.inf
    return lo32, hi32


class _Binning:
    """Histograms of many columns at once, each on its own edges, branch-free over the whole block.

    Edges are padded at the front with -inf to a common length E, so a value's bin is the number of
    edges it reaches (``>=``; ``>`` for the last edge: the last bin holds its right edge, as in
    numpy.histogram) minus the padding: 0 is below, E_j is above. That is E vector comparisons
    accumulated in place (about 4x cheaper here than a binary search per value), then one
    ``bincount`` over ``column * (E + 1) + bin``. NaN reaches no edge: it is moved up by its column's
    padding to bin 0, then taken back out of ``below``. Rows go through in chunks to bound memory.
    """

    __slots__ = ("columns", "edges", "edges32", "n_edges", "pad", "width")
    _CHUNK_CELLS = 1 << 20

    def __init__(self, columns: Sequence[tuple[int, tuple[float, ...]]]) -> None:
        self.columns = np.array([c for c, _ in columns], dtype=np.intp)
        self.n_edges = [len(e) for _, e in columns]
        self.width = max(self.n_edges, default=2)
        self.pad = np.array([self.width - n for n in self.n_edges], dtype=np.int64)
        self.edges = np.full((self.width, len(columns)), -math.inf)  # row i: every column's i-th edge
        for j, (_, e) in enumerate(columns):
            self.edges[self.width - len(e) :, j] = e
        # For float32 blocks (most models), float32 edges that decide exactly as the float64 ones do:
        # v >= e  <=>  v >= (the least float32 >= e);  v > e  <=>  v > (the greatest float32 <= e).
        big = np.finfo(np.float32).max
        clipped = np.clip(self.edges, -big, big)  # an edge beyond float32 decides like the largest one
        up = clipped.astype(np.float32)
        low = up < self.edges
        up[low] = np.nextafter(up[low], np.float32(np.inf))
        last = clipped[-1].astype(np.float32)
        high = last > self.edges[-1]
        last[high] = np.nextafter(last[high], np.float32(-np.inf))
        up[-1] = last
        infinite = np.isinf(self.edges)  # +-inf (the padding among them) decides the same in float32
        up[infinite] = self.edges[infinite]
        self.edges32 = up

    def counts(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per column, the counts of ``x`` in each bin (shape (k, width + 1): below, the bins, above,
        padded at the front like the edges) and its nulls. Counts add, so a window keeps these
        tables and builds its sketches once (``sketches_of``)."""
        k = len(self.columns)
        stride = self.width + 1
        counts = np.zeros(k * stride, dtype=np.int64)
        nulls = np.zeros(k, dtype=np.int64)
        if not k:
            return counts.reshape(k, stride), nulls
        step = max(1, self._CHUNK_CELLS // k)
        base = np.arange(k, dtype=np.int64) * stride - self.pad
        acc_type = np.int16 if self.width < 32000 else np.int64
        pad = self.pad.astype(acc_type)
        padded = bool(pad.any())
        whole = len(self.columns) == x.shape[1] and bool((self.columns == np.arange(k)).all())
        for start in range(0, x.shape[0], step):
            chunk = x[start : start + step]
            v = chunk if whole else chunk[:, self.columns]
            edges = self.edges32 if v.dtype == np.float32 else self.edges
            if v.dtype != np.float32:
                v = v.astype(np.float64, copy=False)
            acc = np.zeros(v.shape, dtype=acc_type)
            hit = np.empty(v.shape, dtype=bool)
            for i in range(self.width - 1):
                np.greater_equal(v, edges[i], out=hit)
                acc += hit
            np.greater(v, edges[-1], out=hit)
            acc += hit
            nan = np.isnan(v)
            nulls += nan.sum(axis=0)
            if padded:  # NaN reaches no edge, not even a padding one: put it back at bin 0
                acc += nan * pad
            counts += np.bincount((acc + base).ravel(), minlength=k * stride)
        table = counts.reshape(k, stride)
        table[:, 0] -= nulls
        return table, nulls

    def sketches_of(self, table: np.ndarray, nulls: np.ndarray) -> list[tuple[int, NumericSketch]]:
        """The sketches of counts that ``counts`` returned (or their sum)."""
        out = []
        for j, col in enumerate(self.columns.tolist()):
            n = self.n_edges[j]
            row = table[j]
            edges = tuple(self.edges[self.width - n :, j].tolist())
            out.append((col, NumericSketch(edges, tuple(row[1:n].tolist()), int(nulls[j]), int(row[0]), int(row[n]))))
        return out

    def sketches(self, x: np.ndarray) -> list[tuple[int, NumericSketch]]:
        return self.sketches_of(*self.counts(x))


class Tally:
    """One side's live sketches over a window, kept as count tables: adding a block costs numpy work
    only; the per-feature sketch objects are built once, when the window closes (``sketches``)."""

    __slots__ = ("_cats", "_rules", "_tables")

    def __init__(self, rules: Sequence[_TensorRules]) -> None:
        self._rules = rules
        self._tables: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(rules)
        self._cats: dict[str, Sketch] = {}

    def add(self, arrays: Mapping[int, np.ndarray] | Sequence[np.ndarray]) -> None:
        for n, r in enumerate(self._rules):
            x = r.block(arrays[r.index])
            if r.bins.columns.size:
                table, nulls = r.bins.counts(x)
                seen = self._tables[n]
                self._tables[n] = (table, nulls) if seen is None else (seen[0] + table, seen[1] + nulls)
            for i, _ in r.cats:
                f = r.features[i]
                sketch = f.sketch(x[:, i])
                seen_cat = self._cats.get(f.name)
                self._cats[f.name] = sketch if seen_cat is None else seen_cat.merge(sketch)

    def sketches(self) -> dict[str, Sketch]:
        """Per feature, its sketch of everything added (empty when nothing was)."""
        out: dict[str, Sketch] = {}
        for r, seen in zip(self._rules, self._tables, strict=True):
            if r.bins.columns.size:
                table, nulls = seen if seen is not None else r.bins.counts(np.empty((0, len(r.cols))))
                for i, sketch in r.bins.sketches_of(table, nulls):
                    out[r.features[i].name] = sketch
            for i, _ in r.cats:
                f = r.features[i]
                out[f.name] = self._cats.get(f.name) or f.sketch(np.empty(0))
        return out


class Contract:
    """A contract compiled against a model's signature: ``check_inputs`` / ``check_outputs``."""

    def __init__(self, spec: ContractSpec, signature: Signature, mode: str | None = None) -> None:
        self.spec = spec
        self.mode = mode or spec.mode
        if self.mode not in MODES:
            raise ModelLoadError(f"the contract mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        self.enforce = self.mode == "enforce"
        self.inputs = tuple(_resolve(f, signature.inputs, "input") for f in spec.inputs)
        self.outputs = tuple(_resolve(f, signature.outputs, "output") for f in spec.outputs)
        self._input_rules = _group(self.inputs, signature.inputs)
        self._output_rules = _group(self.outputs, signature.outputs)
        self.positive = _positive(spec, signature)

    def count_positive(self, outputs: Sequence[np.ndarray]) -> int | None:
        """Rows whose prediction is the positive class (None: the contract names no positive class)."""
        if self.positive is None:
            return None
        index, column, value = self.positive
        x = np.asarray(outputs[index])
        x = x.reshape(x.shape[0], -1)[:, column or 0] if x.ndim else x.reshape(1)
        return int(np.count_nonzero(x == value))

    @property
    def features(self) -> tuple[Feature, ...]:
        return (*self.inputs, *self.outputs)

    def check_inputs(self, arrays: Sequence[np.ndarray]) -> Findings | None:
        return _check(self._input_rules, arrays)

    def check_outputs(self, arrays: Sequence[np.ndarray]) -> Findings | None:
        return _check(self._output_rules, arrays)

    def refuse(self, findings: Findings) -> ContractViolation:
        f, rule, _ = findings.first
        return ContractViolation(findings.message("input"), f.name, rule)

    def sketches(self, arrays: Mapping[int, np.ndarray] | Sequence[np.ndarray], side: str) -> dict[str, Sketch]:
        """Per feature, the sketch of these arrays (rows stacked) on the contract's edges."""
        tally = self.tally(side)
        tally.add(arrays)
        return tally.sketches()

    def tally(self, side: str) -> Tally:
        """An empty running tally of ``side``'s ("inputs" or "outputs") sketches."""
        return Tally(self._input_rules if side == "inputs" else self._output_rules)

    def empty_sketches(self, side: str) -> dict[str, Sketch]:
        feats = self.inputs if side == "inputs" else self.outputs
        return {f.name: f.sketch(np.empty(0)) for f in feats}


def _check(rules: Sequence[_TensorRules], arrays: Sequence[np.ndarray]) -> Findings | None:
    found: dict[str, dict[str, int]] = {}
    first: tuple[Feature, str, int] | None = None
    for r in rules:
        x = r.block(arrays[r.index])
        if not x.shape[0] or r.clean(x):
            continue
        table = r.breakdown(x)
        for j, f in enumerate(r.features):
            for k, rule in enumerate(RULES):
                n = int(table[k, j])
                if n:
                    found.setdefault(f.name, {})[rule] = n
                    if first is None:
                        first = (f, rule, n)
    return None if first is None else Findings(found, first)


def _positive(spec: ContractSpec, signature: Signature) -> tuple[int, int | None, float] | None:
    """Where the positive class is read: (output tensor index, column, value). Declared by an output's
    ``positive``; by default the one category output allowing exactly 0 and 1 (a binary classifier's
    label), positive 1."""
    if any(f.positive is not None for f in spec.inputs):
        raise ModelLoadError("data contract: `positive` is for an output (the predicted class), not an input")
    declared = [f for f in spec.outputs if f.positive is not None]
    if len(declared) > 1:
        raise ModelLoadError("data contract: at most one output may declare a `positive` class")
    if declared:
        f, value = declared[0], float(declared[0].positive)  # type: ignore[arg-type]
    else:
        binary = [f for f in spec.outputs if f.type == "category" and sorted(f.allowed or ()) == [0.0, 1.0]]
        if len(binary) != 1:
            return None
        f, value = binary[0], 1.0
    names = [t.name for t in signature.outputs]
    tensor = f.tensor if f.tensor is not None else names[0]
    return names.index(tensor), f.column, value


def _resolve(f: FeatureSpec, specs: Sequence[TensorSpec], side: str) -> Feature:
    names = [s.name for s in specs]
    if f.tensor is None:
        if len(specs) != 1:
            raise ModelLoadError(
                f"data contract: feature {f.name!r} must name its {side} tensor; the model has {', '.join(names)}"
            )
        spec = specs[0]
    elif f.tensor in names:
        spec = specs[names.index(f.tensor)]
    else:
        raise ModelLoadError(
            f"data contract: feature {f.name!r} names {side} {f.tensor!r}; the model has {', '.join(names)}"
        )
    width = math.prod(spec.shape[1:]) if len(spec.shape) >= 1 else 1
    if len(spec.shape) > 2:
        raise ModelLoadError(f"data contract: {side} '{spec.name}' {list(spec.shape)} is not a [-1] or [-1, k] tensor")
    if f.column is None and width != 1:
        raise ModelLoadError(
            f"data contract: feature {f.name!r} needs a `column` of {side} '{spec.name}' {list(spec.shape)}"
        )
    if f.column is not None and (width < 0 or f.column >= width):
        raise ModelLoadError(
            f"data contract: feature {f.name!r}: column {f.column} is not within {side} '{spec.name}' "
            f"{list(spec.shape)} (its width must be fixed)"
        )
    reference = None
    if f.reference is not None:
        try:
            reference = sketch_from_json(f.reference)
        except ValueError as exc:
            raise ModelLoadError(f"data contract: feature {f.name!r}: reference: {exc}") from None
        want = CategoricalSketch if f.type == "category" else NumericSketch
        if not isinstance(reference, want):
            raise ModelLoadError(f"data contract: feature {f.name!r}: a {f.type} feature needs a {want.__name__}")
    return Feature(
        f.name,
        spec.name,
        f.column,
        f.type,
        f.min,
        f.max,
        tuple(f.allowed or ()),
        f.nullable,
        reference,
    )


def _group(features: Sequence[Feature], specs: Sequence[TensorSpec]) -> tuple[_TensorRules, ...]:
    names = [s.name for s in specs]
    by_tensor: dict[int, list[Feature]] = {}
    for f in features:
        by_tensor.setdefault(names.index(f.tensor), []).append(f)
    return tuple(_TensorRules(i, fs) for i, fs in sorted(by_tensor.items()))


# -- Where a model's contract comes from -----------------------------------------------------------


def beside(model_path: str) -> Path:
    """``M.contract.json`` beside ``M.onnx`` (or ``M.sealed``)."""
    p = Path(model_path)
    return p.with_name(p.stem + CONTRACT_SUFFIX)


def read_file(path: str | Path) -> Any:
    try:
        return orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ModelLoadError(f"cannot read the data contract {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ModelLoadError(f"the data contract {path} is not valid JSON: {exc}") from None


def find(explicit: str | None, manifest: Any, local_model: str | None) -> tuple[Any, str] | None:
    """The contract document and where it came from: ``--contract`` (a file, or the JSON itself, as
    ``cohortgate up`` passes a policy's inline ``contract:``) first,
    then the store version's manifest, then ``M.contract.json`` beside a local model file."""
    if explicit and is_inline(explicit):  # a policy's `contract:` written in place
        try:
            return orjson.loads(explicit), "the inline data contract"
        except orjson.JSONDecodeError as exc:
            raise ModelLoadError(f"the inline data contract is not valid JSON: {exc}") from None
    if explicit:
        return read_file(explicit), explicit
    if manifest is not None:
        return manifest, "the model's manifest"
    if local_model is not None:
        path = beside(local_model)
        if path.is_file():
            return read_file(path), str(path)
    return None


def local_path(url: str, scheme: str) -> str | None:
    """The local file a parsed model reference names, if any (a path or file:// URL)."""
    if scheme == "path":
        return url
    if scheme == "file":
        return urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    return None


def load(
    signature: Signature, *, explicit: str | None, manifest: Any, local_model: str | None, mode: str | None
) -> Contract | None:
    """The compiled contract of a model, or None when it has none; ``ModelLoadError`` when it is bad."""
    found = find(explicit, manifest, local_model)
    if found is None:
        return None
    doc, where = found
    return Contract(parse(doc, where), signature, mode)
