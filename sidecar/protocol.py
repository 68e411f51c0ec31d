"""The Open Inference Protocol v2 (REST) and its binary tensor extension, as pure functions.

No sockets and no onnxruntime here: bytes and a model ``Signature`` in, numpy arrays and bytes out,
or a ``BadRequest`` that names the tensor and what was expected. The server adapter only moves
bytes; this module decides what they mean, so every rule is testable without an event loop.

Binary tensor extension (what ``tritonclient`` sends by default): the request header
``Inference-Header-Content-Length: N`` says the first N bytes are the JSON header; each input whose
``parameters.binary_data_size`` is set takes that many bytes, in input order, from what follows.
Outputs are returned the same way when the request sets ``parameters.binary_data_output`` or an
output's ``parameters.binary_data``.

System shared memory extension (``sidecar/shm.py``, off unless ``--shared-memory``): an input whose
parameters name ``shared_memory_region`` and ``shared_memory_byte_size`` (and optionally
``shared_memory_offset``) has no ``data``; its bytes are read from that registered region. An
output asking the same is written into its region, and its answer carries those parameters and no
data. The regions come in as a ``TensorStore``; the default, ``shm.OFF``, refuses every reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from sidecar import shm
from sidecar.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

#: OIP datatype -> numpy dtype (little-endian, as the binary extension prescribes).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

# Which numpy kinds JSON ``data`` may arrive as, per datatype kind (bool 'b', int 'iu', float 'f').
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "fiu"}
_ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model; ``-1`` in ``shape`` means any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {format_shape(self.shape)}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class Signature:
    """What a model takes and returns, as OIP metadata describes it."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    version: str = "1"
    platform: str = "onnxruntime_onnx"
    _inputs_by_name: dict[str, int] = field(init=False, repr=False, compare=False)
    _outputs_by_name: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inputs_by_name", {s.name: i for i, s in enumerate(self.inputs)})
        object.__setattr__(self, "_outputs_by_name", {s.name: i for i, s in enumerate(self.outputs)})

    @property
    def batchable(self) -> bool:
        """Rows of different requests can be stacked: every tensor's first axis is free."""
        return all(len(s.shape) >= 1 and s.shape[0] == -1 for s in (*self.inputs, *self.outputs))

    def metadata(self, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }
        if parameters:
            doc["parameters"] = parameters
        return doc


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded, validated request: one array per model input, in signature order."""

    id: str | None
    inputs: tuple[np.ndarray, ...]
    rows: int
    outputs: tuple[int, ...]  # indices into Signature.outputs, in the order the client asked
    binary: tuple[bool, ...]  # per entry of ``outputs``: answer as binary data?
    shm: tuple[shm.Reference | None, ...] = ()  # per entry of ``outputs`` (or empty: none): write it there


def format_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def error_body(message: str, details: dict[str, Any] | None = None) -> bytes:
    """OIP's error shape, ``{"error": sentence}``; ``details`` (a stable ``code`` and its facts) beside it."""
    return orjson.dumps({"error": message, **details} if details else {"error": message})


def decode_infer_request(
    signature: Signature, body: bytes, header_length: str | None, regions: shm.TensorStore = shm.OFF
) -> InferRequest:
    """Parse and validate an infer request body against ``signature``; raise ``BadRequest``
    (or a ``shm.SharedMemoryError`` for a tensor sent by reference that ``regions`` refuses)."""
    size = len(body)
    if header_length is None:
        json_end = size
        head: bytes | memoryview = body
    else:
        try:
            json_end = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= json_end <= size:
            raise BadRequest(f"{HEADER_LENGTH} is {json_end} but the body has {size} bytes")
        head = memoryview(body)[:json_end]
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError:
        raise BadRequest("the request body is not valid JSON") from None
    if type(doc) is not dict:
        raise BadRequest("the request body must be a JSON object with an 'inputs' list")
    tensors = doc.get("inputs")
    if type(tensors) is not list or not tensors:
        raise BadRequest(f"'inputs' must be a non-empty list of tensors; the model expects {_expect(signature)}")
    params = doc.get("parameters")
    if params is not None and type(params) is not dict:
        raise BadRequest("'parameters' must be a JSON object")
    request_id = doc.get("id")
    if request_id is not None and type(request_id) is not str:
        raise BadRequest("'id' must be a string")

    arrays: list[np.ndarray | None] = [None] * len(signature.inputs)
    offset = json_end
    for tensor in tensors:
        if type(tensor) is not dict:
            raise BadRequest("every entry of 'inputs' must be a JSON object")
        name = tensor.get("name")
        index = signature._inputs_by_name.get(name) if type(name) is str else None
        if index is None:
            raise BadRequest(f"unknown input {name!r}; the model expects {_expect(signature)}")
        if arrays[index] is not None:
            raise BadRequest(f"input '{name}' is given twice")
        spec = signature.inputs[index]
        datatype = tensor.get("datatype")
        if datatype != spec.datatype:
            raise BadRequest(f"input '{name}': expected datatype {spec.datatype}, got {datatype!r}")
        shape = _checked_shape(spec, tensor.get("shape"))
        dtype = DATATYPES[datatype]
        count = math.prod(shape)
        tparams = tensor.get("parameters")
        nbytes = tparams.get("binary_data_size") if type(tparams) is dict else None
        ref = shm.reference(tparams, f"input '{name}'") if tparams else None
        if ref is not None:
            if nbytes is not None or "data" in tensor:
                raise BadRequest(f"input '{name}' is in shared memory: it takes neither 'data' nor binary_data_size")
            array = regions.read(ref, name, dtype, shape)
        elif nbytes is not None:
            if header_length is None:
                raise BadRequest(f"input '{name}' has binary_data_size but the request has no {HEADER_LENGTH}")
            if type(nbytes) is not int or nbytes != count * dtype.itemsize:
                raise BadRequest(
                    f"input '{name}': binary_data_size is {nbytes!r} but {datatype} "
                    f"{format_shape(shape)} needs {count * dtype.itemsize} bytes"
                )
            if offset + nbytes > size:
                raise BadRequest(f"input '{name}': binary data runs past the end of the body")
            array = np.frombuffer(body, dtype, count, offset).reshape(shape)
            offset += nbytes
        else:
            array = _from_json(spec, tensor.get("data"), shape, count, dtype)
        arrays[index] = array
    if offset != size:
        raise BadRequest(f"the body has {size - offset} bytes that no input claims")
    inputs, rows = complete_inputs(signature, arrays)
    binary_default = params is not None and params.get("binary_data_output") is True
    outputs, binary, refs = _requested_outputs(signature, doc.get("outputs"), binary_default)
    if refs:
        for ref, index in zip(refs, outputs, strict=True):
            if ref is not None:
                regions.check(ref, f"output '{signature.outputs[index].name}'")
    return InferRequest(request_id, inputs, rows, outputs, binary, refs)


def encode_infer_response(
    signature: Signature,
    request: InferRequest,
    outputs: Sequence[np.ndarray],
    regions: shm.TensorStore = shm.OFF,
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length; outputs asked in
    shared memory are written to their regions here."""
    entries = []
    blobs = []
    refs = request.shm or (None,) * len(request.outputs)
    for index, binary, ref in zip(request.outputs, request.binary, refs, strict=True):
        spec = signature.outputs[index]
        array = outputs[index]
        entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape)}
        if ref is not None:
            written = regions.write(ref, spec.name, array.astype(DATATYPES[spec.datatype], copy=False))
            entry["parameters"] = shm_parameters(ref, written)
        elif binary:
            # bytes.join reads the array's buffer directly: one copy, not two.
            raw = array if array.flags.c_contiguous else np.ascontiguousarray(array)
            entry["parameters"] = {"binary_data_size": raw.nbytes}
            blobs.append(raw)
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": signature.name, "model_version": signature.version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = entries
    head = orjson.dumps(doc, option=_ORJSON_OPTS)
    if not blobs:
        return head, None
    blobs.insert(0, head)
    return b"".join(blobs), len(head)


def shm_parameters(ref: shm.Reference, written: int) -> dict[str, Any]:
    """An output answered in shared memory: where it went and how many bytes (no data)."""
    params: dict[str, Any] = {shm.PARAM_REGION: ref.region, shm.PARAM_BYTE_SIZE: written}
    if ref.offset:
        params[shm.PARAM_OFFSET] = ref.offset
    return params


def _expect(signature: Signature) -> str:
    return ", ".join(s.describe() for s in signature.inputs)


def _checked_shape(spec: TensorSpec, shape: Any) -> tuple[int, ...]:
    if type(shape) is not list:
        raise BadRequest(f"input '{spec.name}': 'shape' must be a list of non-negative integers, got {shape!r}")
    expected = spec.shape
    fits = len(shape) == len(expected)
    for d, e in zip(shape, expected, strict=False):  # a plain loop: this runs per tensor per request
        if type(d) is not int or d < 0:
            raise BadRequest(f"input '{spec.name}': 'shape' must be a list of non-negative integers, got {shape!r}")
        if e != -1 and e != d:
            fits = False
    if not fits:
        if not all(type(d) is int and d >= 0 for d in shape):
            raise BadRequest(f"input '{spec.name}': 'shape' must be a list of non-negative integers, got {shape!r}")
        raise BadRequest(f"input '{spec.name}': expected shape {format_shape(expected)}, got {format_shape(shape)}")
    return tuple(shape)


def _from_json(spec: TensorSpec, data: Any, shape: tuple[int, ...], count: int, dtype: np.dtype) -> np.ndarray:
    if data is None:
        raise BadRequest(f"input '{spec.name}' has neither 'data' nor parameters.binary_data_size")
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError):
        raw = None
    if raw is not None and raw.dtype.kind == "f" and dtype.kind == "u":
        raw = _large_unsigned(data, raw)
    if raw is None or (raw.size and raw.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]):
        raise BadRequest(f"input '{spec.name}': 'data' must be a list of {spec.datatype} values")
    if raw.size != count:
        raise BadRequest(f"input '{spec.name}': shape {format_shape(shape)} needs {count} values, got {raw.size}")
    return raw.astype(dtype, copy=False).reshape(shape)


def _large_unsigned(data: Any, parsed: np.ndarray) -> np.ndarray:
    """UINT64 values above 2**63 - 1 make numpy infer float64 (losing digits): read them as uint64,
    unless some value really was fractional or negative (then the float array is refused as usual)."""
    try:
        exact = np.asarray(data, dtype=np.uint64)
    except (ValueError, TypeError, OverflowError):
        return parsed
    return exact if np.array_equal(exact.astype(np.float64), parsed) else parsed


def _requested_outputs(
    signature: Signature, requested: Any, binary_default: bool
) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[shm.Reference | None, ...]]:
    """Indices, binary flags and shared-memory references (an empty tuple when none asks for one)."""
    if requested is None:
        count = len(signature.outputs)
        return tuple(range(count)), (binary_default,) * count, ()
    if type(requested) is not list:
        raise BadRequest("'outputs' must be a list of {\"name\": ...} objects")
    indices = []
    binary = []
    refs: list[shm.Reference | None] = []
    for entry in requested:
        name = entry.get("name") if type(entry) is dict else None
        index = signature._outputs_by_name.get(name) if type(name) is str else None
        if index is None:
            known = ", ".join(s.name for s in signature.outputs)
            raise BadRequest(f"unknown output {name!r}; the model has outputs: {known}")
        params = entry.get("parameters")
        flag = binary_default
        ref = None
        if type(params) is dict:
            if params.get("classification"):
                raise BadRequest(f"output '{name}': the classification extension is not supported")
            ref = shm.reference(params, f"output '{name}'")
            if "binary_data" in params:
                flag = params["binary_data"] is True
        indices.append(index)
        binary.append(flag)
        refs.append(ref)
    return tuple(indices), tuple(binary), (tuple(refs) if any(r is not None for r in refs) else ())


def complete_inputs(signature: Signature, arrays: list[np.ndarray | None]) -> tuple[tuple[np.ndarray, ...], int]:
    """Every input of the signature present, with one row count when the model batches (REST and gRPC)."""
    for spec, array in zip(signature.inputs, arrays, strict=True):
        if array is None:
            raise BadRequest(f"missing input '{spec.name}'; expected {spec.datatype} {format_shape(spec.shape)}")
    inputs: tuple[np.ndarray, ...] = tuple(arrays)  # type: ignore[arg-type]
    rows = inputs[0].shape[0] if inputs[0].ndim else 1
    if len(inputs) > 1 and signature.batchable:
        for spec, array in zip(signature.inputs, inputs, strict=True):
            if array.shape[0] != rows:
                raise BadRequest(
                    f"input '{spec.name}' has {array.shape[0]} rows but "
                    f"'{signature.inputs[0].name}' has {rows}; every input needs the same number of rows"
                )
    return inputs, rows
