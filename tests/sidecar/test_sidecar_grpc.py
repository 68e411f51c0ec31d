"""OIP v2 gRPC on the sidecar, checked with the stock ``tritonclient.grpc`` against a real port, plus
the pure request decoding (typed ``contents`` as well as raw bytes) without a server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from sidecar.errors import BadRequest
from sidecar.grpc_service import decode_infer_request, grpc_code
from sidecar.protocol import Signature, TensorSpec
from sidecar.server import SidecarConfig
from tests.sidecar.sidecar_helpers import ThreadedSidecar, free_port, sidecar_in_thread


@pytest.fixture(scope="module")
def served(models: Path) -> Iterator[tuple[ThreadedSidecar, int]]:
    grpc_port = free_port()
    config = SidecarConfig(
        model_path=str(models / "tabular-control.onnx"),
        name="tabular",
        port=free_port(),
        grpc_port=grpc_port,
        variant="control",
        intra_op_threads=1,
    )
    with sidecar_in_thread(config) as running:
        yield running, grpc_port


@pytest.fixture
def client(served: tuple[ThreadedSidecar, int]) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(f"127.0.0.1:{served[1]}")
    yield c
    c.close()


def data(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(10, 5, (n, 30)).astype(np.float32)


def reference(models: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(models / "tabular-control.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tabular")
    assert client.is_model_ready("tabular", "1")
    assert client.get_server_metadata().name == "cohortgate-sidecar"
    meta = client.get_model_metadata("tabular")
    assert meta.name == "tabular"
    assert (meta.inputs[0].name, meta.inputs[0].datatype, list(meta.inputs[0].shape)) == ("input", "FP32", [-1, 30])
    assert {o.name for o in meta.outputs} == {"label", "probabilities"}


def test_unknown_model_is_not_found(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("other")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "this sidecar serves 'tabular'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.is_model_ready("other")
    assert info.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("rows", [1, 7])
def test_infer_matches_onnxruntime(client, models: Path, rows: int) -> None:
    x = data(rows)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("tabular", [tensor], request_id="g-1")
    label, proba = reference(models, x)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_allclose(result.as_numpy("probabilities"), proba, rtol=1e-6)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("g-1", "tabular", "1")


def test_infer_output_selection(client, models: Path) -> None:
    x = data(3)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("tabular", [tensor], outputs=[triton.InferRequestedOutput("probabilities")])
    assert [o.name for o in result.get_response().outputs] == ["probabilities"]
    assert result.as_numpy("label") is None
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference(models, x)[1], rtol=1e-6)


def test_bad_requests_are_invalid_argument(client) -> None:
    x = np.zeros((2, 29), np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as info:
        client.infer("tabular", [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == "input 'input': expected shape [-1,30], got [2,29]"
    wrong = triton.InferInput("input", [1, 30], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 30), np.float64))
    with pytest.raises(InferenceServerException) as info:
        client.infer("tabular", [wrong])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "expected datatype FP32" in info.value.message()


def test_rest_and_grpc_share_the_batcher_and_metrics(client, served) -> None:
    """Both faces count on the one /metrics page: the same model, batcher and counters."""
    import urllib.request

    def requests_count() -> float:
        page = urllib.request.urlopen(served[0].url + "/metrics", timeout=10).read().decode()
        lines = [ln for ln in page.splitlines() if ln.startswith("cohortgate_sidecar_request_seconds_count")]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    before = requests_count()
    x = data(2)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for _ in range(3):
        client.infer("tabular", [tensor])
    assert requests_count() == before + 3  # counted before each answer is sent


def test_the_answer_names_who_served_it_and_traces_the_request_id(served) -> None:
    """Initial metadata carries REST's answer headers (x-cohortgate-served-by, ...), so Envoy's access
    log and a client see which variant answered, over gRPC as over REST."""
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name="tabular", id="meta-1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 30])
    tensor.contents.fp32_contents.extend([1.0] * 30)
    with grpc.insecure_channel(f"127.0.0.1:{served[1]}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id", "r-9"),), timeout=30)
    assert dict(call.initial_metadata())["x-cohortgate-served-by"] == "control"
    assert response.id == "meta-1"
    assert [o.name for o in response.outputs] == ["label", "probabilities"]


# ------------------------------------------------------------------------------ pure decoding

SIG = Signature(
    "m",
    (TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,))),
    (TensorSpec("y", "FP32", (-1,)),),
)


def _request(**contents) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    a = request.inputs.add(name="a", datatype="FP32", shape=[2, 2])
    a.contents.fp32_contents.extend(contents.get("a", [1, 2, 3, 4]))
    b = request.inputs.add(name="b", datatype="INT64", shape=[2])
    b.contents.int64_contents.extend(contents.get("b", [5, 6]))
    return request


def test_decode_typed_contents() -> None:
    decoded = decode_infer_request(SIG, _request())
    np.testing.assert_array_equal(decoded.inputs[0], np.array([[1, 2], [3, 4]], np.float32))
    np.testing.assert_array_equal(decoded.inputs[1], np.array([5, 6], np.int64))
    assert decoded.rows == 2 and decoded.outputs == (0,)


def test_decode_refusals_name_the_tensor() -> None:
    with pytest.raises(BadRequest, match=r"input 'a': shape \[2,2\] needs 4 values in contents.fp32_contents, got 3"):
        decode_infer_request(SIG, _request(a=[1, 2, 3]))
    request = _request()
    request.raw_input_contents.append(b"\0" * 16)
    with pytest.raises(BadRequest, match="raw_input_contents has 1 entries but the request has 2 inputs"):
        decode_infer_request(SIG, request)
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1, 2])
    with pytest.raises(BadRequest, match="missing input 'b'"):
        decode_infer_request(SIG, request)
    request = _request()
    request.outputs.add(name="z")
    with pytest.raises(BadRequest, match="unknown output 'z'; the model has outputs: y"):
        decode_infer_request(SIG, request)


def test_error_statuses_map_to_grpc_codes() -> None:
    assert grpc_code(400) is grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(404) is grpc.StatusCode.NOT_FOUND
    assert grpc_code(422) is grpc.StatusCode.FAILED_PRECONDITION
    assert grpc_code(503) is grpc.StatusCode.UNAVAILABLE
    assert grpc_code(599) is grpc.StatusCode.INTERNAL


# ------------------------------------------------------------------------------ tracing, in the sidecar's own loop

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def test_a_sampled_grpc_call_is_one_child_span_with_batch_facts(make_client) -> None:
    """The span REST records (tests/sidecar/test_tracing.py), from the call's traceparent metadata."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    from cohortgate.support.tracing import Tracing
    from sidecar.grpc_service import start_server
    from sidecar.server import SIDECAR

    client = await make_client(name="tabular", variant="canary")
    sidecar = client.app[SIDECAR]
    exporter = InMemorySpanExporter()
    sidecar.tracing = Tracing("sidecar", None, 0.0, exporter=exporter)
    server, port = await start_server(sidecar, "127.0.0.1", 0, 1 << 20)
    try:
        request = pb.ModelInferRequest(model_name="tabular")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[3, 30])
        tensor.contents.fp32_contents.extend([0.5] * 90)
        metadata = (("traceparent", f"00-{TRACE}-{PARENT}-01"), ("authorization", "Bearer secret-token"))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata, timeout=30)
    finally:
        await server.stop(None)
    sidecar.tracing.provider.force_flush()
    (span,) = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE and format(span.parent.span_id, "016x") == PARENT
    attrs = dict(span.attributes)
    assert attrs["cohortgate.variant"] == "canary" and attrs["cohortgate.rows"] == 3
    assert attrs["http.response.status_code"] == 200 and attrs["cohortgate.batch_rows"] >= 3
    assert "secret-token" not in repr(attrs)
