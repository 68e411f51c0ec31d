"""The OIP v2 codec, without sockets: requests as tritonclient builds them, every bad input."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sidecar.errors import BadRequest
from sidecar.protocol import (
    DATATYPES,
    InferRequest,
    Signature,
    TensorSpec,
    decode_infer_request,
    encode_infer_response,
)

TABULAR = Signature(
    "tabular",
    (TensorSpec("input", "FP32", (-1, 30)),),
    (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2))),
)


def triton_body(arrays: dict[str, np.ndarray], binary: bool = True, **kwargs) -> tuple[bytes, str | None]:
    """A request body exactly as tritonclient.http builds it."""
    inputs = []
    for name, array in arrays.items():
        datatype = next(k for k, v in DATATYPES.items() if v == array.dtype)
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    body, header_length = triton.InferenceServerClient.generate_request_body(inputs, **kwargs)
    return body, None if header_length is None else str(header_length)


def rows(n: int) -> np.ndarray:
    return np.arange(n * 30, dtype=np.float32).reshape(n, 30) / 7


# Decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_decodes_what_tritonclient_sends(binary: bool) -> None:
    x = rows(3)
    body, header_length = triton_body({"input": x}, binary=binary, request_id="r-1")
    request = decode_infer_request(TABULAR, body, header_length)
    assert request.id == "r-1"
    assert request.rows == 3
    np.testing.assert_array_equal(request.inputs[0], x)
    assert request.outputs == (0, 1)
    # tritonclient asks for binary outputs when it names none
    assert request.binary == (True, True)


def test_json_data_may_be_nested_or_flat() -> None:
    x = rows(2)
    for data in (x.reshape(-1).tolist(), x.tolist()):
        doc = {"inputs": [{"name": "input", "shape": [2, 30], "datatype": "FP32", "data": data}]}
        request = decode_infer_request(TABULAR, json.dumps(doc).encode(), None)
        np.testing.assert_array_equal(request.inputs[0], x)
        assert request.binary == (False, False)


def test_uint64_json_data_beyond_int64_is_exact_and_fractions_are_refused() -> None:
    sig = Signature("u", (TensorSpec("x", "UINT64", (-1,)),), (TensorSpec("y", "UINT64", (-1,)),))
    big = [2**63, 2**64 - 1, 0]
    doc = {"inputs": [{"name": "x", "shape": [3], "datatype": "UINT64", "data": big}]}
    request = decode_infer_request(sig, json.dumps(doc).encode(), None)
    assert request.inputs[0].dtype == np.uint64 and request.inputs[0].tolist() == big
    for bad in ([1.5, 2**63, 0], [-1, 2**63, 0]):
        doc["inputs"][0]["data"] = bad
        with pytest.raises(BadRequest, match="must be a list of UINT64 values"):
            decode_infer_request(sig, json.dumps(doc).encode(), None)


def test_outputs_selection_and_binary_flags() -> None:
    doc = {
        "inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}],
        "outputs": [{"name": "probabilities"}, {"name": "label", "parameters": {"binary_data": True}}],
    }
    request = decode_infer_request(TABULAR, json.dumps(doc).encode(), None)
    assert request.outputs == (1, 0)
    assert request.binary == (False, True)


def _json(inputs: list, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


GOOD = {"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}


@pytest.mark.parametrize(
    ("body", "header_length", "needle"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b"{}", None, "'inputs' must be a non-empty list"),
        (_json([{**GOOD, "name": "x"}]), None, "unknown input 'x'; the model expects input FP32 [-1,30]"),
        (_json([{**GOOD, "datatype": "FP64"}]), None, "input 'input': expected datatype FP32, got 'FP64'"),
        (_json([{**GOOD, "shape": [1, 3]}]), None, "input 'input': expected shape [-1,30], got [1,3]"),
        (_json([{**GOOD, "shape": [30]}]), None, "expected shape [-1,30], got [30]"),
        (_json([{**GOOD, "shape": [1, -30]}]), None, "'shape' must be a list of non-negative integers"),
        (_json([{**GOOD, "shape": [2, 30]}]), None, "shape [2,30] needs 60 values, got 30"),
        (_json([{**GOOD, "data": ["a"] * 30}]), None, "'data' must be a list of FP32 values"),
        (_json([{**GOOD, "data": [[1.0], [1.0, 2.0]]}]), None, "'data' must be a list of FP32 values"),
        (_json([{**GOOD, "data": None}]), None, "neither 'data' nor parameters.binary_data_size"),
        (_json([GOOD, GOOD]), None, "input 'input' is given twice"),
        (_json([GOOD], outputs=[{"name": "nope"}]), None, "unknown output 'nope'; the model has outputs: label"),
        (
            _json([GOOD], outputs=[{"name": "label", "parameters": {"classification": 2}}]),
            None,
            "classification extension is not supported",
        ),
        (_json([GOOD], id=7), None, "'id' must be a string"),
        (_json([GOOD]), "abc", "Inference-Header-Content-Length must be an integer"),
        (_json([GOOD]), "100000", "Inference-Header-Content-Length is 100000 but the body has"),
    ],
)
def test_bad_requests_name_the_tensor_and_what_was_expected(body: bytes, header_length, needle: str) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_infer_request(TABULAR, body, header_length)
    assert needle in caught.value.message
    assert caught.value.status == 400


def test_missing_input_is_named() -> None:
    signature = Signature(
        "two", (TensorSpec("a", "FP32", (-1,)), TensorSpec("b", "INT64", (-1,))), (TensorSpec("y", "FP32", (-1,)),)
    )
    with pytest.raises(BadRequest, match=r"missing input 'b'; expected INT64 \[-1\]"):
        decode_infer_request(signature, _json([{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]), None)


def test_inputs_must_agree_on_rows() -> None:
    signature = Signature(
        "two", (TensorSpec("a", "FP32", (-1,)), TensorSpec("b", "FP32", (-1,))), (TensorSpec("y", "FP32", (-1,)),)
    )
    body = _json(
        [
            {"name": "a", "shape": [2], "datatype": "FP32", "data": [1, 2]},
            {"name": "b", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]},
        ]
    )
    with pytest.raises(BadRequest, match="input 'b' has 3 rows but 'a' has 2"):
        decode_infer_request(signature, body, None)


def test_binary_size_must_match_shape() -> None:
    body, header_length = triton_body({"input": rows(2)})
    head = json.loads(body[: int(header_length)])
    head["inputs"][0]["shape"] = [3, 30]
    new_head = json.dumps(head).encode()
    with pytest.raises(BadRequest, match=r"binary_data_size is 240 but FP32 \[3,30\] needs 360 bytes"):
        decode_infer_request(TABULAR, new_head + body[int(header_length) :], str(len(new_head)))


def test_binary_data_past_the_end_and_unclaimed_bytes() -> None:
    body, header_length = triton_body({"input": rows(2)})
    with pytest.raises(BadRequest, match="runs past the end of the body"):
        decode_infer_request(TABULAR, body[:-4], header_length)
    with pytest.raises(BadRequest, match="4 bytes that no input claims"):
        decode_infer_request(TABULAR, body + b"\0" * 4, header_length)


def test_binary_input_without_header_length_is_refused() -> None:
    body, header_length = triton_body({"input": rows(1)})
    with pytest.raises(BadRequest, match="no Inference-Header-Content-Length"):
        decode_infer_request(TABULAR, body[: int(header_length)], None)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), header_length=st.one_of(st.none(), st.integers(-5, 400).map(str)))
def test_any_body_decodes_or_raises_bad_request(body: bytes, header_length: str | None) -> None:
    try:
        request = decode_infer_request(TABULAR, body, header_length)
    except BadRequest as exc:
        assert exc.message
    else:
        assert request.inputs[0].shape[1:] == (30,)


@settings(max_examples=300, deadline=None)
@given(
    doc=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    )
)
def test_any_json_decodes_or_raises_bad_request(doc) -> None:
    body = json.dumps({"inputs": [doc]} if isinstance(doc, dict) else doc).encode()
    with contextlib.suppress(BadRequest):
        decode_infer_request(TABULAR, body, None)


# Round trips ----------------------------------------------------------------------------------

NUMERIC = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64"]


@st.composite
def tensors(draw) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from(NUMERIC))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
    elements = None
    if DATATYPES[datatype].kind == "f":
        elements = st.floats(allow_nan=False, allow_infinity=False, width=DATATYPES[datatype].itemsize * 8)
    return datatype, draw(hnp.arrays(DATATYPES[datatype], shape, elements=elements))


@settings(max_examples=200, deadline=None)
@given(tensor=tensors(), binary_in=st.booleans(), binary_out=st.booleans())
def test_round_trip_through_tritonclient(tensor: tuple[str, np.ndarray], binary_in: bool, binary_out: bool) -> None:
    """Any numeric tensor survives tritonclient -> decode -> encode -> tritonclient, JSON or binary."""
    datatype, array = tensor
    spec_shape = (-1, *array.shape[1:])
    signature = Signature("echo", (TensorSpec("x", datatype, spec_shape),), (TensorSpec("y", datatype, spec_shape),))
    outputs = [triton.InferRequestedOutput("y", binary_data=binary_out)]
    body, header_length = triton_body({"x": array}, binary=binary_in, outputs=outputs, request_id="rt")
    request = decode_infer_request(signature, body, header_length)
    np.testing.assert_array_equal(request.inputs[0], array)
    payload, response_length = encode_infer_response(signature, request, request.inputs)
    result = triton.InferenceServerClient.parse_response_body(payload, header_length=response_length)
    assert result.get_response()["id"] == "rt"
    returned = result.as_numpy("y")
    assert returned.dtype == array.dtype
    assert returned.shape == array.shape
    np.testing.assert_array_equal(returned, array)


def test_response_header_length_is_absent_for_json_outputs() -> None:
    request = InferRequest(None, (rows(1),), 1, (0, 1), (False, False))
    payload, header_length = encode_infer_response(
        TABULAR, request, (np.array([1], np.int64), np.array([[0.25, 0.75]], np.float32))
    )
    assert header_length is None
    doc = json.loads(payload)
    assert "id" not in doc
    assert doc["outputs"][0] == {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]}
    assert doc["outputs"][1]["data"] == [0.25, 0.75]
