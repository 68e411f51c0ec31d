"""The sidecar's gRPC face: OIP v2 ``inference.GRPCInferenceService`` beside the REST routes.

Triton/KServe gRPC clients (``tritonclient.grpc``) name the model in the protobuf body, not in a
path. This service answers them from the same model, batcher, data contract, features join and
reporter as ``POST /v2/models/{name}/infer``, on its own port (``--grpc-port``).

The protobufs are the ones ``tritonclient`` ships (``tritonclient.grpc.service_pb2``): the same
messages every Triton/KServe client sends, so nothing is compiled here. Two halves:

* ``decode_infer_request`` / ``encode_infer_response``: pure, a ``ModelInferRequest`` and the
  model ``Signature`` in, the ``protocol.InferRequest`` the REST path makes out (and back);
  every refusal is the REST path's ``BadRequest`` with the same kind of sentence;
* ``InferenceServicer``: a thin adapter; a ``SidecarError`` becomes the gRPC status of
  ``GRPC_CODES`` with the error's sentence, anything else ``INTERNAL`` with a fixed sentence.

Inputs arrive either as ``raw_input_contents`` (what tritonclient sends) or in the typed
``contents`` fields; outputs always go back as ``raw_output_contents``.

System shared memory (``sidecar/shm.py``, off unless ``--shared-memory``): ``SystemSharedMemory
Status/Register/Unregister`` manage the regions; an input whose parameters name a
``shared_memory_region`` has no ``raw_input_contents`` entry (the entries belong, in order, to the
inputs sent in the message), and an output asked in a region is written there: its
``raw_output_contents`` entry is empty (kept, so the entries still line up with ``outputs``) and its
parameters say where it went. Calls that came through the gateway are refused like REST's.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from cohortgate import __version__
from cohortgate.core.contract import HEADER_ENTITY, HEADER_FEATURES, HEADER_SEGMENT
from sidecar import shm
from sidecar.batching import BatchTiming
from sidecar.errors import BadRequest, InferenceFailed, NotFound, SidecarError, Unavailable
from sidecar.protocol import DATATYPES, InferRequest, Signature, complete_inputs, format_shape
from sidecar.server import REQUEST_ID, SERVER_NAME
from sidecar.tracing import record_infer

if TYPE_CHECKING:
    from sidecar.model import OnnxModel
    from sidecar.server import Sidecar

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
_INTERNAL = "internal error in the sidecar; see its log"

#: A sidecar error's HTTP status -> the gRPC status a gRPC caller gets.
GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.FAILED_PRECONDITION,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}

#: OIP datatype -> the ``InferTensorContents`` field that carries it (FP16 travels raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC status for a sidecar error's HTTP status (unknown ones are INTERNAL)."""
    return GRPC_CODES.get(status, grpc.StatusCode.INTERNAL)


def decode_infer_request(signature: Signature, request: Any, regions: shm.TensorStore = shm.OFF) -> InferRequest:
    """Validate a ``ModelInferRequest`` against ``signature``; raise ``BadRequest`` like REST does
    (or a ``shm.SharedMemoryError`` for a tensor sent by reference that ``regions`` refuses)."""
    tensors = request.inputs
    if not tensors:
        raise BadRequest(f"'inputs' must be a non-empty list of tensors; the model expects {_expect(signature)}")
    refs = [_reference(t.parameters, f"input '{t.name}'") if t.parameters else None for t in tensors]
    sent = len(tensors) - sum(r is not None for r in refs)
    raw = request.raw_input_contents
    if raw and len(raw) != sent:
        outside = " outside shared memory" if sent < len(tensors) else ""
        raise BadRequest(f"raw_input_contents has {len(raw)} entries but the request has {sent} inputs{outside}")
    arrays: list[np.ndarray | None] = [None] * len(signature.inputs)
    position = 0
    for tensor, ref in zip(tensors, refs, strict=True):
        name = tensor.name
        index = signature._inputs_by_name.get(name)
        if index is None:
            raise BadRequest(f"unknown input {name!r}; the model expects {_expect(signature)}")
        if arrays[index] is not None:
            raise BadRequest(f"input '{name}' is given twice")
        spec = signature.inputs[index]
        if tensor.datatype != spec.datatype:
            raise BadRequest(f"input '{name}': expected datatype {spec.datatype}, got {tensor.datatype!r}")
        shape = tuple(tensor.shape)
        if len(shape) != len(spec.shape) or any(e != -1 and e != d for d, e in zip(shape, spec.shape, strict=True)):
            raise BadRequest(f"input '{name}': expected shape {format_shape(spec.shape)}, got {format_shape(shape)}")
        if any(d < 0 for d in shape):
            raise BadRequest(f"input '{name}': 'shape' must be non-negative integers, got {format_shape(shape)}")
        dtype = DATATYPES[spec.datatype]
        count = math.prod(shape)
        array: np.ndarray
        if ref is not None:
            if tensor.HasField("contents"):
                raise BadRequest(f"input '{name}' is in shared memory: it takes no contents")
            array = regions.read(ref, name, dtype, shape)
        elif raw:
            data = raw[position]
            position += 1
            if len(data) != count * dtype.itemsize:
                raise BadRequest(
                    f"input '{name}': raw_input_contents has {len(data)} bytes but {spec.datatype} "
                    f"{format_shape(shape)} needs {count * dtype.itemsize} bytes"
                )
            array = np.frombuffer(data, dtype, count).reshape(shape)
        else:
            field = _CONTENTS.get(spec.datatype)
            values = getattr(tensor.contents, field) if field is not None else ()
            if field is None or len(values) != count:
                got = "no values" if field is None else f"{len(values)} values"
                raise BadRequest(
                    f"input '{name}': shape {format_shape(shape)} needs {count} values in "
                    f"contents.{field or 'raw_input_contents'}, got {got}"
                )
            array = np.asarray(values, dtype=dtype).reshape(shape)
        arrays[index] = array
    inputs, rows = complete_inputs(signature, arrays)
    outputs = []
    out_refs: list[shm.Reference | None] = []
    for requested in request.outputs:
        index = signature._outputs_by_name.get(requested.name)
        if index is None:
            known = ", ".join(s.name for s in signature.outputs)
            raise BadRequest(f"unknown output {requested.name!r}; the model has outputs: {known}")
        outputs.append(index)
        label = f"output '{requested.name}'"
        ref = _reference(requested.parameters, label) if requested.parameters else None
        if ref is not None:
            regions.check(ref, label)
        out_refs.append(ref)
    chosen = tuple(outputs) if outputs else tuple(range(len(signature.outputs)))
    in_shm = tuple(out_refs) if any(r is not None for r in out_refs) else ()
    return InferRequest(request.id or None, inputs, rows, chosen, (True,) * len(chosen), in_shm)


def _reference(parameters: Any, tensor: str) -> shm.Reference | None:
    """The shared-memory reference in a tensor's ``InferParameter`` map, or None."""
    if shm.PARAM_REGION not in parameters and shm.PARAM_BYTE_SIZE not in parameters:
        return None
    values = [_parameter(parameters, key) for key in shm.PARAMS]
    return shm.checked_reference(tensor, values[0], values[1], 0 if values[2] is None else values[2])


def _parameter(parameters: Any, key: str) -> Any:
    if key not in parameters:
        return None
    value = parameters[key]
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice is not None else None


def encode_infer_response(
    signature: Signature, request: InferRequest, outputs: Any, regions: shm.TensorStore = shm.OFF
) -> Any:
    """A ``ModelInferResponse`` with the requested outputs as raw little-endian bytes (or written to
    their shared-memory regions, with an empty raw entry)."""
    response = pb.ModelInferResponse(model_name=signature.name, model_version=signature.version, id=request.id or "")
    refs = request.shm or (None,) * len(request.outputs)
    for index, ref in zip(request.outputs, refs, strict=True):
        spec = signature.outputs[index]
        array = np.ascontiguousarray(outputs[index], dtype=DATATYPES[spec.datatype])
        tensor = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if ref is None:
            response.raw_output_contents.append(array.tobytes())
            continue
        written = regions.write(ref, spec.name, array)
        tensor.parameters[shm.PARAM_REGION].string_param = ref.region
        tensor.parameters[shm.PARAM_BYTE_SIZE].int64_param = written
        if ref.offset:
            tensor.parameters[shm.PARAM_OFFSET].int64_param = ref.offset
        response.raw_output_contents.append(b"")
    return response


def _expect(signature: Signature) -> str:
    return ", ".join(s.describe() for s in signature.inputs)


def _metadata(context: Any) -> dict[str, str]:
    """The call's text metadata (HTTP/2 headers, lower-case names), as REST reads its headers."""
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def _answer_metadata(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """REST's answer headers (served-by, model version and digest, features) as gRPC initial metadata."""
    return tuple((k.lower(), v) for k, v in headers.items() if k.lower() != "content-type")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """OIP v2 gRPC on one ``Sidecar``: the same model, batcher, contract, join and reports as REST."""

    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    # Health and metadata -----------------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self._sidecar.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            self._check_model(request.name, request.version)
        except SidecarError as exc:
            if isinstance(exc, NotFound):
                await context.abort(grpc_code(exc.status), exc.message)
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._sidecar.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=list(self._sidecar.extensions)
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            model = self._check_model(request.name, request.version)
        except SidecarError as exc:
            await context.abort(grpc_code(exc.status), exc.message)
        signature = self._sidecar._client_signature(model)
        response = pb.ModelMetadataResponse(
            name=signature.name, versions=[signature.version], platform=signature.platform
        )
        for spec in signature.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in signature.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    # The hot path --------------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        """Decode, queue on the served model's batcher, encode; count and report like REST."""
        sidecar = self._sidecar
        started = time.perf_counter()
        decoded = outputs = joined = None
        error: SidecarError | None = None
        response = None
        metadata = _metadata(context)
        headers = sidecar._json_headers
        timing = BatchTiming() if sidecar.tracing is not None else None
        try:
            self._check_model(request.model_name, request.model_version)
            if not sidecar.ready:
                raise Unavailable(f"model '{sidecar.name}' is not ready")
            # One snapshot from here to the answer: a live swap between two awaits never mixes models.
            model, batcher, quality, joiner = sidecar.model, sidecar.batcher, sidecar.quality, sidecar.joiner
            signature = model.signature if joiner is None else joiner.signature  # type: ignore[union-attr]
            regions = sidecar.tensor_store(metadata)
            decoded = decode_infer_request(signature, request, regions)
            faults = sidecar._faults
            if faults is not None and faults.fail_next():
                raise InferenceFailed(f"injected fault (--fault-rate {faults.rate})")
            inputs = decoded.inputs
            if joiner is not None:
                joined = await joiner.join(metadata.get(HEADER_ENTITY), inputs)
                headers = {**headers, HEADER_FEATURES: joined.label}
                if joined.inputs is None:  # the fallback model serves the request's own input
                    model, batcher = sidecar.fallback  # type: ignore[misc]
                else:
                    inputs = joined.inputs
            if quality is not None and model is sidecar.model:
                sketched = quality.check_inputs(inputs, decoded.rows)
            else:
                quality = None
            outputs = await batcher.submit(inputs, decoded.rows, timing)  # type: ignore[union-attr]
            if quality is not None:
                quality.observe_outputs(outputs, decoded.rows, sketched, metadata.get(HEADER_SEGMENT) or "")
            response = encode_infer_response(model.signature, decoded, outputs, regions)  # type: ignore[union-attr]
            status = 200
        except SidecarError as exc:
            error, status = exc, exc.status
        except Exception:
            log.exception("gRPC ModelInfer failed")
            error, status = InferenceFailed(_INTERNAL), 500
        elapsed = time.perf_counter() - started
        sidecar.metrics.on_request(status, elapsed)
        if sidecar.tracing is not None:
            rows = decoded.rows if decoded is not None else None
            record_infer(sidecar.tracing, metadata, elapsed, status, sidecar.name, sidecar.served_by, rows, timing)
        if sidecar.reporter is not None:
            request_id = metadata.get(REQUEST_ID) or (decoded.id if decoded is not None else None) or ""
            fallback = (joined.reason or "") if joined is not None else ""
            sidecar.reporter.report(request_id, status, elapsed, outputs if status == 200 else None, fallback=fallback)
        if error is not None:
            await context.abort(grpc_code(error.status), error.message)
        await context.send_initial_metadata(_answer_metadata(headers))
        return response

    # System shared memory -------------------------------------------------------------------
    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        try:
            regions = self._sidecar.shm_guard(_metadata(context)).status(request.name)
        except SidecarError as exc:
            await context.abort(grpc_code(exc.status), exc.message)
        response = pb.SystemSharedMemoryStatusResponse()
        for region in regions:
            status = response.regions[region["name"]]
            status.name, status.key = region["name"], region["key"]
            status.offset, status.byte_size = region["offset"], region["byte_size"]
        return response

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        try:
            regions = self._sidecar.shm_guard(_metadata(context))
            regions.register(request.name, request.key, request.offset, request.byte_size)
        except SidecarError as exc:
            await context.abort(grpc_code(exc.status), exc.message)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        try:
            self._sidecar.shm_guard(_metadata(context)).unregister(request.name)
        except SidecarError as exc:
            await context.abort(grpc_code(exc.status), exc.message)
        return pb.SystemSharedMemoryUnregisterResponse()

    def _check_model(self, name: str, version: str) -> OnnxModel:
        sidecar = self._sidecar
        if name != sidecar.name:
            raise NotFound(f"unknown model '{name}'; this sidecar serves '{sidecar.name}'")
        if version not in ("", "1"):
            raise NotFound(f"model '{name}' has no version '{version}'; versions: 1")
        if sidecar.model is None:
            if sidecar.load_error is not None:
                raise Unavailable(f"model '{name}' cannot be served: {sidecar.load_error}", retry_after_s=30)
            raise Unavailable(f"model '{name}' is loading")
        return sidecar.model


async def start_server(sidecar: Sidecar, host: str, port: int, max_message_bytes: int) -> tuple[Any, int]:
    """Start a grpc.aio server for ``sidecar`` on ``host:port`` (0: any free port); (server, bound port)."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(sidecar), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    return server, bound
