"""The check that existing clients work unchanged: tritonclient's HTTP clients (sync and asyncio)
against a sidecar on a real port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from sidecar.server import SidecarConfig
from tests.sidecar.sidecar_helpers import ThreadedSidecar, free_port, sidecar_in_thread


@pytest.fixture(scope="module")
def served(models: Path) -> Iterator[ThreadedSidecar]:
    config = SidecarConfig(
        model_path=str(models / "tabular-control.onnx"),
        name="tabular",
        port=free_port(),
        variant="control",
        intra_op_threads=1,
    )
    with sidecar_in_thread(config) as running:
        yield running


@pytest.fixture
def client(served: ThreadedSidecar) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(served.host_port, concurrency=4)
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
    assert not client.is_model_ready("other")
    server = client.get_server_metadata()
    assert server["name"] == "cohortgate-sidecar"
    model = client.get_model_metadata("tabular")
    assert model["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 30]}
    assert model["parameters"]["execution_provider"] in ort.get_available_providers()
    config = client.get_model_config("tabular")
    assert config["max_batch_size"] == 64


@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False), (True, False), (False, True)])
def test_infer(client, models: Path, binary_in: bool, binary_out: bool) -> None:
    x = data(4)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    outputs = [
        triton.InferRequestedOutput("label", binary_data=binary_out),
        triton.InferRequestedOutput("probabilities", binary_data=binary_out),
    ]
    result = client.infer("tabular", [tensor], outputs=outputs, request_id="t-1")
    label, proba = reference(models, x)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_allclose(result.as_numpy("probabilities"), proba, rtol=1e-6)
    assert result.get_response()["id"] == "t-1"


def test_infer_defaults_and_output_selection(client, models: Path) -> None:
    x = data(3)
    tensor = triton.InferInput("input", [3, 30], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("tabular", [tensor], model_version="1")  # tritonclient's defaults: all binary
    np.testing.assert_array_equal(result.as_numpy("label"), reference(models, x)[0])
    only = client.infer("tabular", [tensor], outputs=[triton.InferRequestedOutput("label")])
    assert only.as_numpy("probabilities") is None
    assert only.as_numpy("label") is not None


def test_async_infer_many_in_flight(client, models: Path) -> None:
    inputs = [data(n) for n in range(1, 9)]
    handles = []
    for x in inputs:
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        handles.append(client.async_infer("tabular", [tensor]))
    for x, handle in zip(inputs, handles, strict=True):
        np.testing.assert_array_equal(handle.get_result().as_numpy("label"), reference(models, x)[0])


def test_errors_reach_tritonclient_as_messages(client) -> None:
    bad = triton.InferInput("input", [1, 29], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 29), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("tabular", [bad])
    assert caught.value.status() == "400"
    assert "input 'input': expected shape [-1,30], got [1,29]" in caught.value.message()

    wrong_type = triton.InferInput("input", [1, 30], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((1, 30), np.float64))
    with pytest.raises(InferenceServerException, match="expected datatype FP32, got 'FP64'"):
        client.infer("tabular", [wrong_type])

    good = triton.InferInput("input", [1, 30], "FP32")
    good.set_data_from_numpy(np.zeros((1, 30), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("other", [good])
    assert caught.value.status() == "404"
    assert "unknown model 'other'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("other")
    assert caught.value.status() == "404"


async def test_asyncio_client(served: ThreadedSidecar, models: Path) -> None:
    async with triton_aio.InferenceServerClient(served.host_port) as client:
        assert await client.is_server_ready()
        assert (await client.get_model_metadata("tabular"))["name"] == "tabular"
        x = data(5)
        tensor = triton_aio.InferInput("input", [5, 30], "FP32")
        tensor.set_data_from_numpy(x)
        result = await client.infer("tabular", [tensor])
        np.testing.assert_array_equal(result.as_numpy("label"), reference(models, x)[0])
        with pytest.raises(InferenceServerException, match="unknown model"):
            await client.infer("nope", [tensor])
