"""Data contracts, pure: every rule, both modes, bad contracts refused, windows that sketch exactly what was served,
and `cohortgate models profile` on a Parquet file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cohortgate.cli import main as cli_main
from cohortgate.core.sketch import CategoricalSketch, NumericSketch
from sidecar import contract as C
from sidecar.errors import ModelLoadError
from sidecar.model import OnnxModel
from sidecar.protocol import Signature, TensorSpec
from sidecar.quality import QualityGate

SIG = Signature(
    "m",
    (
        TensorSpec("x", "FP32", (-1, 4)),
        TensorSpec("code", "INT64", (-1,)),
        TensorSpec("flag", "BOOL", (-1, 1)),
    ),
    (TensorSpec("p", "FP32", (-1, 2)), TensorSpec("label", "INT64", (-1,))),
)

DOC = {
    "mode": "observe",
    "inputs": [
        {"name": "age", "tensor": "x", "column": 0, "type": "int", "min": 18, "max": 99},
        {"name": "income", "tensor": "x", "column": 1, "type": "float", "min": 0, "nullable": True},
        {"name": "score", "tensor": "x", "column": 2, "type": "float", "min": -1, "max": 1},
        {"name": "region_code", "tensor": "x", "column": 3, "type": "category", "allowed": [1, 2, 3]},
        {"name": "device", "tensor": "code", "type": "category", "allowed": [0, 1]},
        {"name": "opted_in", "tensor": "flag", "type": "bool"},
    ],
    "outputs": [{"name": "p_yes", "tensor": "p", "column": 1, "min": 0, "max": 1}],
}


def good(rows: int = 3) -> tuple[np.ndarray, ...]:
    x = np.tile(np.array([[30, 1000.0, 0.5, 2]], dtype=np.float32), (rows, 1))
    return x, np.zeros(rows, dtype=np.int64), np.ones((rows, 1), dtype=bool)


def contract(mode: str | None = None, doc: dict | None = None) -> C.Contract:
    return C.Contract(C.parse(doc or DOC), SIG, mode)


def test_clean_inputs_pass_every_rule() -> None:
    assert contract().check_inputs(good()) is None
    assert contract().check_inputs(good(0)) is None  # an empty batch breaks nothing


@pytest.mark.parametrize(
    ("column", "value", "feature", "rule"),
    [
        (0, 30.5, "age", "type"),  # an int feature with a fraction
        (0, 17, "age", "range"),
        (0, 100, "age", "range"),
        (0, math.nan, "age", "null"),  # not nullable
        (2, math.inf, "score", "type"),  # a float must be finite
        (2, 1.5, "score", "range"),
        (3, 4, "region_code", "allowed"),
        (3, math.nan, "region_code", "null"),
        (1, -5.0, "income", "range"),  # min only
    ],
)
def test_each_rule_names_the_feature_and_counts_rows(column: int, value: float, feature: str, rule: str) -> None:
    x, code, flag = good(4)
    x[1, column] = value
    x[3, column] = value
    found = contract().check_inputs((x, code, flag))
    assert found is not None
    assert found.counts == {feature: {rule: 2}}
    f, first_rule, rows = found.first
    assert (f.name, first_rule, rows) == (feature, rule, 2)
    assert feature in found.message("input") and f"'{rule}'" in found.message("input")


def test_nullable_feature_accepts_nan_and_other_tensors_are_checked() -> None:
    x, code, flag = good(2)
    x[0, 1] = math.nan  # income is nullable
    assert contract().check_inputs((x, code, flag)) is None
    code[1] = 7
    flag_bad = np.array([[2]], dtype=np.uint8)  # not a bool value (a BOOL tensor cannot hold it; the check can)
    found = contract().check_inputs((x[:1], code[1:], flag_bad))
    assert found is not None
    assert found.counts == {"device": {"allowed": 1}, "opted_in": {"type": 1}}


def test_one_row_may_break_several_rules_each_counted() -> None:
    x, code, flag = good(3)
    x[:, 0] = [17.5, 200, 30]  # age: a fraction below the range (type and range), one above
    found = contract().check_inputs((x, code, flag))
    assert found is not None and found.counts == {"age": {"type": 1, "range": 2}}


def test_outputs_are_checked_too() -> None:
    p = np.array([[0.2, 0.8], [0.5, 1.5]], dtype=np.float32)
    found = contract().check_outputs((p, np.zeros(2, dtype=np.int64)))
    assert found is not None and found.counts == {"p_yes": {"range": 1}}


def test_enforce_refuses_with_422_naming_the_feature_and_observe_serves_and_counts() -> None:
    x, code, flag = good(2)
    x[0, 2] = 9.0
    enforcing = QualityGate(contract("enforce"), model="m", variant="v")
    with pytest.raises(C.ContractViolation) as caught:
        enforcing.check_inputs((x, code, flag), 2)
    assert caught.value.status == 422
    assert caught.value.details == {"code": "contract_violation", "feature": "score", "rule": "range"}
    observing = QualityGate(contract("observe"), model="m", variant="v")
    sketch = observing.check_inputs((x, code, flag), 2)  # served
    observing.observe_outputs((np.array([[0.5, 0.5]] * 2, np.float32), np.zeros(2, np.int64)), 2, sketch)
    report = observing.take()
    assert report.violations == {"score": {"range": 1}}
    assert (report.rows, report.requests) == (2, 1)
    # a refused request is counted, but its rows are not sketched (the model never saw them)
    refused = enforcing.take()
    assert refused.violations == {"score": {"range": 1}} and refused.rows == 0
    assert refused.inputs["score"].total == 0


def test_the_mode_override_wins_over_the_contract() -> None:
    assert contract().enforce is False
    assert contract("enforce").enforce is True
    assert contract(doc={**DOC, "mode": "enforce"}).enforce is True


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"inputs": [{"name": "a", "tensor": "nope", "column": 0}]}, "names input 'nope'"),
        ({"inputs": [{"name": "a", "tensor": "x"}]}, "needs a `column`"),
        ({"inputs": [{"name": "a", "tensor": "x", "column": 4}]}, "column 4 is not within"),
        ({"inputs": [{"name": "a", "column": 0}]}, "must name its input tensor"),
        ({"inputs": [{"name": "a", "tensor": "x", "column": 0, "min": 2, "max": 1}]}, "above max"),
        ({"inputs": [{"name": "a", "tensor": "x", "column": 0, "type": "category"}]}, "needs its `allowed`"),
        ({"inputs": [{"name": "a", "tensor": "x", "column": 0, "colour": "red"}]}, "colour"),
        ({"mode": "strict"}, "mode"),
        (
            {"inputs": [{"name": "a", "tensor": "x", "column": 0}], "outputs": [{"name": "a", "tensor": "label"}]},
            "unique",
        ),
        (
            {"inputs": [{"name": "a", "tensor": "x", "column": 0, "reference": {"kind": "categorical", "counts": {}}}]},
            "needs a NumericSketch",
        ),
    ],
)
def test_a_bad_contract_refuses_the_model_with_a_sentence(doc: dict, says: str) -> None:
    with pytest.raises(ModelLoadError, match=says):
        contract(doc=doc)


def test_contract_sources_in_order(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    assert C.find(None, None, str(model)) is None
    C.beside(str(model)).write_text(json.dumps({"mode": "enforce"}))
    assert C.beside(str(model)).name == "m.contract.json"
    assert C.find(None, None, str(model)) == ({"mode": "enforce"}, str(tmp_path / "m.contract.json"))
    assert C.find(None, {"mode": "observe"}, str(model))[0] == {"mode": "observe"}  # the manifest's first
    explicit = tmp_path / "other.json"
    explicit.write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        C.find(str(explicit), {"mode": "observe"}, str(model))
    assert C.local_path("file:///srv/m.onnx", "file") == "/srv/m.onnx"
    assert C.local_path("s3://b/m.onnx", "s3") is None


values = st.one_of(st.floats(-10, 130, allow_nan=False), st.just(math.nan))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(values, min_size=1, max_size=6), min_size=1, max_size=6), st.integers(1, 16))
def test_a_window_sketches_exactly_the_served_rows_however_it_buffers(
    requests: list[list[float]], buffer_rows: int
) -> None:
    """The sketch of a window equals the sketch of all its rows at once, whatever the buffer flushes."""
    doc = {"inputs": [{"name": "age", "tensor": "x", "column": 0, "nullable": True, "min": 0, "max": 120}]}
    c = contract(doc=doc)
    gate = QualityGate(c, model="m", variant="v", max_buffer_rows=buffer_rows)
    for ages in requests:
        x = np.zeros((len(ages), 4), dtype=np.float32)
        x[:, 0] = ages
        sketch = gate.check_inputs((x, np.zeros(len(ages), np.int64), np.ones((len(ages), 1), bool)), len(ages))
        outputs = (np.full((len(ages), 2), 0.5, np.float32), np.zeros(len(ages), np.int64))
        gate.observe_outputs(outputs, len(ages), sketch)
    report = gate.take()
    every = np.array([a for r in requests for a in r], dtype=np.float32)
    assert report.inputs["age"] == NumericSketch.of(every, c.inputs[0].default_edges())
    assert report.rows == len(every) and report.requests == len(requests)
    assert gate.take().rows == 0  # a fresh window


def test_categorical_sketch_counts_declared_values_and_never_names_others() -> None:
    s = C.category_sketch(np.array([1.0, 2.0, 2.0, 9.0, math.nan]), [1, 2, 3])
    assert s == CategoricalSketch({"1": 1, "2": 2, "3": 0}, nulls=1, other=1)


# -- cohortgate models profile ----------------------------------------------------------------


def test_profile_writes_a_contract_the_sidecar_reads(models: Path, tmp_path: Path, capsys) -> None:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    table = pa.table({name: x[:, j] for j, name in enumerate(data.feature_names)})
    parquet = tmp_path / "reference.parquet"
    pq.write_table(table, parquet)
    out = tmp_path / "tc.contract.json"
    model_path = models / "tabular-control.onnx"
    assert cli_main(["models", "profile", str(model_path), "--data", str(parquet), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [f["name"] for f in doc["inputs"]] == list(data.feature_names)
    radius = doc["inputs"][0]
    assert (radius["tensor"], radius["column"], radius["type"], radius["nullable"]) == ("input", 0, "float", False)
    span = float(x[:, 0].max() - x[:, 0].min())
    assert radius["min"] == pytest.approx(float(x[:, 0].min()) - 0.1 * span)
    assert radius["max"] == pytest.approx(float(x[:, 0].max()) + 0.1 * span)
    ref = NumericSketch.of(x[:, 0], radius["reference"]["edges"])
    assert radius["reference"]["counts"] == list(ref.counts) and ref.total == len(x)
    assert max(ref.counts) - min(ref.counts) <= 5  # equal-mass bins
    outputs = {f["name"]: f for f in doc["outputs"]}
    assert outputs["label"]["type"] == "category" and outputs["label"]["allowed"] == [0.0, 1.0]
    assert sum(outputs["label"]["reference"]["counts"].values()) == len(x)
    assert outputs["probabilities[1]"]["column"] == 1
    # the sidecar compiles it against the real model, and the reference data itself is clean
    model = OnnxModel(model_path, device="cpu", intra_op_threads=1)
    compiled = C.Contract(C.parse(doc), model.signature)
    assert compiled.check_inputs((x,)) is None
    assert compiled.check_outputs(model.run((x,))) is None
    assert "30 input and 3 output features" in capsys.readouterr().out


def test_profile_refuses_data_that_does_not_fit(models: Path, tmp_path: Path, capsys) -> None:
    csv = tmp_path / "three.csv"
    csv.write_text("a,b,c\n1,2,3\n")
    code = cli_main(["models", "profile", str(models / "tabular-control.onnx"), "--data", str(csv)])
    assert code == 2
    assert "cannot map the data's 3 columns" in capsys.readouterr().err
    words = tmp_path / "words.csv"
    words.write_text("a\nx\n")
    assert cli_main(["models", "profile", str(models / "tabular-control.onnx"), "--data", str(words)]) == 2
    assert "encode it as numbers" in capsys.readouterr().err


edge_lists = st.lists(st.floats(-5, 5, allow_nan=False, width=64), min_size=1, max_size=12, unique=True).map(sorted)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(edge_lists, min_size=1, max_size=4),
    st.lists(st.one_of(st.floats(-6, 6, width=32), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=40),
    st.sampled_from([np.float32, np.float64]),
)
def test_the_vectorised_binning_equals_numpy_histogram_per_column(edges, values, dtype) -> None:
    """Many columns on their own edges at once (float32 edges rounded so they decide as float64 ones do)."""
    edges = [e if len(e) > 1 else [e[0], e[0] + 1.0] for e in edges]
    k = len(edges)
    sig = Signature("m", (TensorSpec("x", "FP32", (-1, k)),), ())
    ref = [NumericSketch.empty(e).to_json() for e in edges]
    doc = {"inputs": [{"name": f"c{j}", "tensor": "x", "column": j, "reference": ref[j]} for j in range(k)]}
    c = C.Contract(C.parse(doc), sig)
    # every value, its float32 neighbours and the edges themselves, in every column
    pool = list(values) + [v for e in edges for v in e]
    pool += [float(np.nextafter(np.float32(v), np.float32(d))) for v in pool[:20] for d in (-np.inf, np.inf)]
    x = np.array([[p] * k for p in pool] or np.empty((0, k)), dtype=dtype).reshape(-1, k)
    got = c.sketches({0: x}, "inputs")
    for j in range(k):
        assert got[f"c{j}"] == NumericSketch.of(x[:, j], c.inputs[j].edges)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=0, max_size=5), st.randoms(use_true_random=False))
def test_a_window_tally_of_blocks_equals_the_sketches_of_all_their_rows(sizes, rnd) -> None:
    """The gate keeps count tables and builds sketches once per window: counts add, so the tally of
    several blocks must be exactly the sketch of their rows stacked (numeric and categorical alike)."""
    c = contract()
    blocks = []
    for n in sizes:
        x, code, flag = good(n)
        for i in range(n):
            x[i] = [rnd.choice([17, 30, 99, 120]), rnd.choice([math.nan, -1.0, 5e3]), rnd.uniform(-2, 2),
                    rnd.choice([1, 2, 3, 7, math.nan])]  # fmt: skip
            code[i] = rnd.choice([0, 1, 5])
        blocks.append((x, code, flag))
    tally = c.tally("inputs")
    for b in blocks:
        tally.add(b)
    whole = tuple(np.concatenate([b[i] for b in blocks]) for i in range(3)) if blocks else good(0)
    assert tally.sketches() == c.sketches(whole, "inputs")
    assert c.tally("inputs").sketches() == c.empty_sketches("inputs")


def test_sketching_samples_one_request_in_k_but_checks_every_one() -> None:
    gate = QualityGate(contract(), model="m", variant="v", sketch_every=3)
    sampled = []
    for i in range(7):
        x, code, flag = good(1)
        x[0, 2] = 5.0 if i == 0 else 0.1 * i  # the first request breaks `score`: counted though not sketched
        sketched = gate.check_inputs((x, code, flag), 1)
        gate.observe_outputs((np.array([[0.5, 0.5]], np.float32), np.zeros(1, np.int64)), 1, sketched)
        sampled.append(sketched is not None)
    assert sampled == [False, False, True, False, False, True, False]
    report = gate.take()
    assert report.requests == 7 and report.rows == 2
    assert report.violations == {"score": {"range": 1}}
    assert report.inputs["score"].total == 2 and report.outputs["p_yes"].total == 2
    wide = {"inputs": [{"name": f"c{j}", "tensor": "x", "column": j % 4} for j in range(130)]}
    assert QualityGate(contract(doc=wide), model="m", variant="v").sketch_every == 3  # ceil(130 / 64)
    assert QualityGate(contract(), model="m", variant="v").sketch_every == 1


@pytest.mark.parametrize("bound", [0.1, 1 / 3, 2.0, 1e-45, 1e39])
def test_float32_bounds_decide_exactly_as_float64(bound: float) -> None:
    """The fast path compares float32 blocks against float32 bounds; the answer must not change."""
    sig = Signature("m", (TensorSpec("x", "FP32", (-1, 2)),), ())
    doc = {
        "inputs": [
            {"name": "lo", "tensor": "x", "column": 0, "min": bound},
            {"name": "hi", "tensor": "x", "column": 1, "max": bound},
        ]
    }
    c = C.Contract(C.parse(doc), sig)
    near = np.float32(min(bound, 3e38))
    for v in (np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))):
        x = np.array([[v, v]], dtype=np.float32)
        found = c.check_inputs((x,))
        want = {}
        if float(v) < bound:
            want["lo"] = {"range": 1}
        if float(v) > bound:
            want["hi"] = {"range": 1}
        assert (found.counts if found else {}) == want, (bound, float(v))
