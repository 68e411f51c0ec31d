"""The sidecar over real HTTP with plain aiohttp: every route, every error, batching, metrics."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.model import ModelLoadError
from sidecar.report import MemorySink
from sidecar.server import SIDECAR, SidecarConfig, build_app
from tests.sidecar.test_sidecar_protocol import triton_body


def reference(models: Path, model: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """What onnxruntime answers on its own, for comparison."""
    session = ort.InferenceSession(str(models / f"{model}.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def features(n: int, seed: int = 0) -> np.ndarray:
    from sidecar.demo_models import breast_cancer_split

    x = breast_cancer_split()[1]
    return x[seed : seed + n]


def infer_json(x: np.ndarray, **extra) -> dict:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return {"inputs": [tensor]} | extra


def metric(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(part in m.group(1) for part in wanted.split(",")):
            return float(m.group(2))
    raise KeyError(f"{name}{{{wanted}}} not in metrics")


# Health and metadata -------------------------------------------------------------------------


async def test_health_and_server_metadata(make_client) -> None:
    client = await make_client()
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/tabular-control/ready"):
        response = await client.get(path)
        assert response.status == 200, path
    response = await client.get("/v2")
    doc = await response.json()
    assert doc["name"] == "cohortgate-sidecar"
    assert "binary_tensor_data" in doc["extensions"]


def expected_auto_provider() -> str:
    """What ``--device auto`` should pick, from the install and the machine rather than from
    onnxruntime's own answer: CUDA only with the onnxruntime-gpu wheel and a visible NVIDIA device."""
    try:
        importlib.metadata.distribution("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return "CPUExecutionProvider"
    return "CUDAExecutionProvider" if Path("/dev/nvidia0").exists() else "CPUExecutionProvider"


async def test_model_metadata_reports_the_provider_asked_for(make_client) -> None:
    client = await make_client(name="tabular", device="cpu")
    doc = await (await client.get("/v2/models/tabular")).json()
    assert doc["parameters"]["execution_provider"] == "CPUExecutionProvider"
    assert doc["parameters"]["providers"] == ["CPUExecutionProvider"]


async def test_model_metadata_reports_signature_and_provider(make_client) -> None:
    client = await make_client(name="tabular", variant="control")
    for path in ("/v2/models/tabular", "/v2/models/tabular/versions/1"):
        response = await client.get(path)
        assert response.status == 200
        assert response.headers["x-cohortgate-served-by"] == "control"
        doc = await response.json()
        assert doc["name"] == "tabular"
        assert doc["platform"] == "onnxruntime_onnx"
        assert doc["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
        assert doc["outputs"] == [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        ]
        assert doc["parameters"]["execution_provider"] == expected_auto_provider()
        assert doc["parameters"]["execution_provider"] in doc["parameters"]["providers"]
        assert doc["parameters"]["variant"] == "control"


async def test_model_config_for_tritonclient(make_client) -> None:
    client = await make_client(name="tabular", max_batch_size=16)
    doc = await (await client.get("/v2/models/tabular/config")).json()
    assert doc["max_batch_size"] == 16
    assert doc["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [30]}]


# Inference -----------------------------------------------------------------------------------


async def test_json_inference_matches_onnxruntime(make_client, models) -> None:
    client = await make_client(name="tabular")
    x = features(5)
    response = await client.post("/v2/models/tabular/infer", json=infer_json(x, id="abc"))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    doc = await response.json()
    assert doc["id"] == "abc"
    assert doc["model_name"] == "tabular"
    label, proba = reference(models, "tabular-control", {"input": x})
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert outputs["label"]["datatype"] == "INT64"
    assert outputs["label"]["data"] == label.tolist()
    assert outputs["probabilities"]["shape"] == [5, 2]
    np.testing.assert_allclose(np.array(outputs["probabilities"]["data"]).reshape(5, 2), proba, rtol=1e-6)


async def test_binary_inference_matches_onnxruntime(make_client, models) -> None:
    import tritonclient.http as triton

    client = await make_client(name="tabular")
    x = features(7)
    body, header_length = triton_body({"input": x})
    response = await client.post(
        "/v2/models/tabular/versions/1/infer", data=body, headers={"Inference-Header-Content-Length": header_length}
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    raw = await response.read()
    result = triton.InferenceServerClient.parse_response_body(
        raw, header_length=int(response.headers["Inference-Header-Content-Length"])
    )
    label, proba = reference(models, "tabular-control", {"input": x})
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), proba)


async def test_output_selection(make_client) -> None:
    client = await make_client(name="tabular")
    body = infer_json(features(2), outputs=[{"name": "probabilities"}])
    doc = await (await client.post("/v2/models/tabular/infer", json=body)).json()
    assert [o["name"] for o in doc["outputs"]] == ["probabilities"]


@pytest.mark.parametrize("binary", [False, True])
async def test_every_datatype_round_trips(make_client, binary: bool) -> None:
    import tritonclient.http as triton

    client = await make_client(model="dtypes")
    arrays = {
        "x_f32": np.array([[1.5, -2.0, 3.25], [0.0, 1e-3, 7.0]], np.float32),
        "x_f64": np.array([[np.pi, -1e300], [2.0, 0.5]], np.float64),
        "x_i32": np.array([-(2**31), 2**31 - 1], np.int32),
        "x_i64": np.array([[2**62, -5], [0, 1]], np.int64),
        "x_b": np.array([True, False]),
    }
    outputs = [triton.InferRequestedOutput(f"y_{k[2:]}", binary_data=binary) for k in arrays]
    body, header_length = triton_body(arrays, binary=binary, outputs=outputs)
    headers = {"Inference-Header-Content-Length": header_length} if header_length else {}
    response = await client.post("/v2/models/dtypes/infer", data=body, headers=headers)
    assert response.status == 200, await response.text()
    length = response.headers.get("Inference-Header-Content-Length")
    result = triton.InferenceServerClient.parse_response_body(
        await response.read(), header_length=int(length) if length else None
    )
    for name, array in arrays.items():
        got = result.as_numpy(f"y_{name[2:]}")
        assert got.dtype == array.dtype, name
        np.testing.assert_array_equal(got, array)


# Errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"this is not json", "not valid JSON"),
        (json.dumps({"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": [0] * 30}]}), "'x'"),
        (
            json.dumps({"inputs": [{"name": "input", "shape": [1, 29], "datatype": "FP32", "data": [0] * 29}]}),
            "[-1,30]",
        ),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 30], "datatype": "INT64", "data": [0] * 30}]}), "FP32"),
    ],
)
async def test_bad_input_is_400_json_naming_what_was_expected(make_client, body, needle: str) -> None:
    client = await make_client(name="tabular")
    response = await client.post("/v2/models/tabular/infer", data=body)
    assert response.status == 400
    assert response.headers["Content-Type"].startswith("application/json")
    doc = await response.json()
    assert needle in doc["error"]
    assert "Traceback" not in doc["error"]


async def test_wrong_input_name_error_names_the_expected_input(make_client) -> None:
    client = await make_client(name="tabular")
    body = {"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": [0] * 30}]}
    doc = await (await client.post("/v2/models/tabular/infer", json=body)).json()
    assert doc == {"error": "unknown input 'x'; the model expects input FP32 [-1,30]"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/models/other", 404),
        ("GET", "/v2/models/other/ready", 404),
        ("POST", "/v2/models/other/infer", 404),
        ("GET", "/v2/models/tabular/versions/2", 404),
        ("POST", "/v2/models/tabular/versions/2/infer", 404),
        ("GET", "/nothing/here", 404),
        ("DELETE", "/v2/repository/index", 404),
        ("GET", "/v2/models/tabular/infer", 405),
        ("POST", "/v2/health/live", 405),
    ],
)
async def test_unknown_routes_and_models_are_json(make_client, method: str, path: str, status: int) -> None:
    client = await make_client(name="tabular")
    response = await client.request(method, path, json={"inputs": []})
    assert response.status == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert (await response.json())["error"]


async def test_body_over_the_limit_is_413(make_client) -> None:
    client = await make_client(name="tabular", max_body_bytes=1000)
    response = await client.post("/v2/models/tabular/infer", json=infer_json(features(10)))
    assert response.status == 413
    assert "limit is 1000" in (await response.json())["error"]

    async def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(20):
            yield b" " * 100

    response = await client.post("/v2/models/tabular/infer", data=chunks())
    assert response.status == 413
    assert "exceeds the limit" in (await response.json())["error"]


async def test_full_queue_is_503_with_retry_after(make_client) -> None:
    # A long delay holds requests in a queue of two; the rest are turned away at once.
    client = await make_client(name="tabular", max_queue=2, max_queue_delay_ms=400)
    responses = await asyncio.gather(
        *(client.post("/v2/models/tabular/infer", json=infer_json(features(1, i))) for i in range(6))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [200, 200, 503, 503, 503, 503]
    refused = next(r for r in responses if r.status == 503)
    assert refused.headers["Retry-After"] == "1"
    assert "queue is full" in (await refused.json())["error"]


async def test_fault_rate_fails_that_fraction_with_json_500(make_client) -> None:
    client = await make_client(name="tabular", fault_rate=0.25, variant="canary")
    statuses = []
    for i in range(8):
        response = await client.post("/v2/models/tabular/infer", json=infer_json(features(1, i)))
        statuses.append(response.status)
        if response.status == 500:
            assert "injected fault" in (await response.json())["error"]
            assert response.headers["x-cohortgate-served-by"] == "canary"
    assert statuses == [200, 200, 200, 500, 200, 200, 200, 500]
    text = await (await client.get("/metrics")).text()
    assert metric(text, "cohortgate_sidecar_request_failures_total", model="tabular", status="500") == 2


async def test_a_batch_that_cannot_be_split_fails_each_request_clearly(make_client) -> None:
    client = await make_client(model="lying", max_queue_delay_ms=100)
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    responses = await asyncio.gather(*(client.post("/v2/models/lying/infer", json=body) for _ in range(3)))
    for response in responses:
        assert response.status == 500
        assert "returned 0 rows for a batch of 3 rows" in (await response.json())["error"]


async def test_a_model_with_a_fixed_first_axis_is_served_unbatched(make_client) -> None:
    client = await make_client(model="fixed")
    meta = await (await client.get("/v2/models/fixed")).json()
    assert meta["parameters"]["max_batch_size"] == 1
    body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [-1, 2, -3, 4, -5, 6]}]}
    doc = await (await client.post("/v2/models/fixed/infer", json=body)).json()
    assert doc["outputs"][0]["data"] == [0, 2, 0, 4, 0, 6]


async def test_ready_turns_true_only_after_the_warm_up(aiohttp_client, models) -> None:
    """While the model loads and warms up, the port is live but not ready, and infer says so."""
    import threading

    app = build_app(SidecarConfig(model_path=str(models / "tabular-control.onnx"), name="tabular"))
    sidecar = app[SIDECAR]
    gate = threading.Event()
    load_and_warm_up = sidecar._load_blocking

    def held() -> object:  # the real load and warm-up, once the test lets it start
        gate.wait(10)
        return load_and_warm_up()

    sidecar._load_blocking = held
    client = await aiohttp_client(app)
    assert (await client.get("/v2/health/live")).status == 200
    for path in ("/v2/health/ready", "/v2/models/tabular/ready"):
        response = await client.get(path)
        assert response.status == 503, path
        assert response.headers["Retry-After"]
    refused = await client.post("/v2/models/tabular/infer", json=infer_json(features(1)))
    assert refused.status == 503
    assert (await refused.json()) == {"error": "model 'tabular' is loading"}
    text = await (await client.get("/metrics")).text()
    assert metric(text, "cohortgate_sidecar_ready", model="tabular") == 0
    gate.set()
    await sidecar.wait_ready()
    assert (await client.get("/v2/health/ready")).status == 200
    assert (await client.post("/v2/models/tabular/infer", json=infer_json(features(1)))).status == 200


async def test_a_model_that_cannot_load_never_turns_ready(aiohttp_client, models) -> None:
    app = build_app(SidecarConfig(model_path=str(models / "strings.onnx")))
    client = await aiohttp_client(app)
    with pytest.raises(ModelLoadError, match="tensor\\(string\\)"):
        await app[SIDECAR].wait_ready()
    assert (await client.get("/v2/health/live")).status == 200
    response = await client.get("/v2/health/ready")
    assert response.status == 503
    refused = await client.post("/v2/models/strings/infer", data=b"{}")
    assert refused.status == 503
    assert "cannot be served" in (await refused.json())["error"]


# Batching ------------------------------------------------------------------------------------


async def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(make_client, models) -> None:
    client = await make_client(model="mlp-4x512", name="mlp")
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((1 + i % 3, 512)).astype(np.float32) for i in range(48)]

    async def call(x: np.ndarray) -> np.ndarray:
        import tritonclient.http as triton

        body, header_length = triton_body({"input": x})
        response = await client.post(
            "/v2/models/mlp/infer", data=body, headers={"Inference-Header-Content-Length": header_length}
        )
        assert response.status == 200
        raw = await response.read()
        length = int(response.headers["Inference-Header-Content-Length"])
        return triton.InferenceServerClient.parse_response_body(raw, header_length=length).as_numpy("output")

    results = await asyncio.gather(*(call(x) for x in inputs))
    session = ort.InferenceSession(str(models / "mlp-4x512.onnx"), providers=["CPUExecutionProvider"])
    for x, got in zip(inputs, results, strict=True):
        want = session.run(None, {"input": x})[0]  # unbatched
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    text = await (await client.get("/metrics")).text()
    batches = metric(text, "cohortgate_sidecar_batch_requests_count", model="mlp")
    requests = metric(text, "cohortgate_sidecar_batch_requests_sum", model="mlp")
    assert requests == 48
    assert requests / batches > 1, "concurrent requests should share onnxruntime calls"
    assert metric(text, "cohortgate_sidecar_batch_size_bucket", model="mlp", le="1.0") < batches


async def test_metrics_page(make_client) -> None:
    client = await make_client(name="tabular")
    await client.post("/v2/models/tabular/infer", json=infer_json(features(3)))
    await client.post("/v2/models/tabular/infer", data=b"nope")
    text = await (await client.get("/metrics")).text()
    assert metric(text, "cohortgate_sidecar_requests_total", model="tabular") == 2
    assert metric(text, "cohortgate_sidecar_request_failures_total", model="tabular", status="400") == 1
    assert metric(text, "cohortgate_sidecar_request_seconds_count", model="tabular") == 2
    assert metric(text, "cohortgate_sidecar_queue_seconds_count", model="tabular") == 1
    assert metric(text, "cohortgate_sidecar_compute_seconds_count", model="tabular") >= 1
    assert metric(text, "cohortgate_sidecar_batch_size_sum", model="tabular") >= 3
    assert metric(text, "cohortgate_sidecar_queue_depth", model="tabular") == 0
    assert metric(text, "cohortgate_sidecar_ready", model="tabular") == 1
    assert metric(text, "cohortgate_sidecar_execution_provider", model="tabular", provider="CPUExecutionProvider") == 1
    types = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert types["cohortgate_sidecar_request_seconds"] == "histogram"
    assert types["cohortgate_sidecar_batch_size"] == "histogram"
    assert types["cohortgate_sidecar_queue_depth"] == "gauge"
    assert types["cohortgate_sidecar_requests"] == "counter"


# Shadow reports ------------------------------------------------------------------------------


async def test_reports_carry_request_id_variant_digest_and_latency(make_client) -> None:
    sink = MemorySink()
    client = await make_client(name="tabular", variant="challenger", report_sink=sink)
    x = features(2)
    for request_id in ("req-1", "req-2"):
        response = await client.post(
            "/v2/models/tabular/infer", json=infer_json(x), headers={"x-request-id": request_id}
        )
        assert response.status == 200
        assert response.headers["x-cohortgate-served-by"] == "challenger"
    await client.post("/v2/models/tabular/infer", data=b"bad", headers={"x-request-id": "req-3"})
    for _ in range(100):
        if len(sink.reports) == 3:
            break
        await asyncio.sleep(0.01)
    one, two, bad = sink.reports
    assert (one.request_id, one.variant, one.model, one.status) == ("req-1", "challenger", "tabular", 200)
    assert one.digest and one.digest == two.digest  # same input, same answer
    assert dict(one.output_digests).keys() == {"label", "probabilities"}
    assert one.latency_ms > 0
    assert (bad.request_id, bad.status, bad.digest) == ("req-3", 400, "")
