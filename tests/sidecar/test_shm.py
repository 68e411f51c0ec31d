"""System shared memory (sidecar/shm.py): tritonclient's own shared-memory utilities and its HTTP and gRPC
clients against a sidecar on real ports (register, inputs by reference, outputs into a region, status,
unregister), every refusal with its status and code, off by default, and never for a request that came
through the gateway."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
import tritonclient.utils.shared_memory as shmc
from tritonclient.utils import InferenceServerException

from cohortgate.core.contract import HEADER_CLUSTER
from sidecar import shm
from sidecar.server import SIDECAR, SidecarConfig
from tests.sidecar.sidecar_helpers import ThreadedSidecar, free_port, sidecar_in_thread

MODEL = "tabular"
FEATURES = 30
PROBA_BYTES = 2 * 4  # probabilities: FP32 [n, 2]


@pytest.fixture(scope="module")
def served(models: Path) -> Iterator[tuple[ThreadedSidecar, int]]:
    grpc_port = free_port()
    config = SidecarConfig(
        model_path=str(models / "tabular-control.onnx"),
        name=MODEL,
        port=free_port(),
        grpc_port=grpc_port,
        intra_op_threads=1,
        shared_memory=True,
        shared_memory_max_regions=4,
    )
    with sidecar_in_thread(config) as running:
        yield running, grpc_port


@pytest.fixture
def client(served: tuple[ThreadedSidecar, int]) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(served[0].host_port)
    yield c
    c.unregister_system_shared_memory()  # every test leaves the sidecar without regions
    c.close()


@pytest.fixture
def grpc_client(served: tuple[ThreadedSidecar, int]) -> Iterator[triton_grpc.InferenceServerClient]:
    c = triton_grpc.InferenceServerClient(f"127.0.0.1:{served[1]}")
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture
def region() -> Iterator[Any]:
    """``region(name, byte_size)``: a shared-memory object made by tritonclient, destroyed afterwards."""
    made = []

    def make(name: str, byte_size: int) -> tuple[Any, str]:
        key = f"/cgtest_{name}_{uuid.uuid4().hex[:8]}"
        handle = shmc.create_shared_memory_region(name, key, byte_size)
        made.append(handle)
        return handle, key

    yield make
    for handle in made:
        shmc.destroy_shared_memory_region(handle)


def data(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(10, 5, (n, FEATURES)).astype(np.float32)


def reference(models: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(models / "tabular-control.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


# ------------------------------------------------------------------------------ tritonclient, HTTP


@pytest.mark.parametrize("rows", [1, 128])
def test_http_inputs_by_reference_and_outputs_into_a_region(client, region, models: Path, rows: int) -> None:
    x = data(rows)
    offset = 64  # the input sits after some other bytes of the same object
    in_handle, in_key = region("in", offset + x.nbytes)
    out_handle, out_key = region("out", rows * PROBA_BYTES)
    shmc.set_shared_memory_region(in_handle, [x], offset=offset)
    client.register_system_shared_memory("in", in_key, x.nbytes, offset=offset)
    client.register_system_shared_memory("out", out_key, rows * PROBA_BYTES)

    tensor = triton.InferInput("input", [rows, FEATURES], "FP32")
    tensor.set_shared_memory("in", x.nbytes)
    proba_out = triton.InferRequestedOutput("probabilities")
    proba_out.set_shared_memory("out", rows * PROBA_BYTES)
    label_out = triton.InferRequestedOutput("label", binary_data=True)
    result = client.infer(MODEL, [tensor], outputs=[label_out, proba_out], request_id="shm-1")

    label, proba = reference(models, x)
    np.testing.assert_array_equal(result.as_numpy("label"), label)  # a plain binary output beside
    answered = result.get_output("probabilities")
    assert answered["parameters"] == {"shared_memory_region": "out", "shared_memory_byte_size": rows * PROBA_BYTES}
    assert "data" not in answered and answered["shape"] == [rows, 2]
    written = shmc.get_contents_as_numpy(out_handle, np.float32, [rows, 2])
    np.testing.assert_allclose(written, proba, rtol=1e-6)


def test_http_status_and_unregister(client, region) -> None:
    _, key_a = region("a", 256)
    _, key_b = region("b", 512)
    assert client.get_system_shared_memory_status() == []
    client.register_system_shared_memory("a", key_a, 128, offset=64)
    client.register_system_shared_memory("b", key_b, 512)
    status = sorted(client.get_system_shared_memory_status(), key=lambda r: r["name"])
    assert status == [
        {"name": "a", "key": key_a, "offset": 64, "byte_size": 128},
        {"name": "b", "key": key_b, "offset": 0, "byte_size": 512},
    ]
    assert client.get_system_shared_memory_status("b") == [status[1]]
    client.unregister_system_shared_memory("a")
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["b"]
    client.unregister_system_shared_memory()  # no name: all of them
    assert client.get_system_shared_memory_status() == []
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]


def _refused(call: Any, status: str, sentence: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == status, caught.value.message()
    assert sentence in caught.value.message()


def test_http_registration_refusals(client, region) -> None:
    _, key = region("r", 256)
    _refused(lambda: client.register_system_shared_memory("r", "/cgtest_absent_zz", 64), "400", "cannot open")
    _refused(lambda: client.register_system_shared_memory("r", "/a/../../etc/passwd", 64), "400", "key must be")
    _refused(lambda: client.register_system_shared_memory("r", key, 200, offset=100), "400", "runs past the end")
    client.register_system_shared_memory("r", key, 256)
    _refused(lambda: client.register_system_shared_memory("r", key, 256), "409", "already registered")
    _refused(lambda: client.get_system_shared_memory_status("nope"), "404", "no shared memory region 'nope'")
    _refused(lambda: client.unregister_system_shared_memory("nope"), "404", "no shared memory region 'nope'")
    for name in ("r2", "r3", "r4"):  # the sidecar holds at most four
        client.register_system_shared_memory(name, key, 8)
    _refused(lambda: client.register_system_shared_memory("r5", key, 8), "400", "at most 4")


def test_http_infer_refusals(client, region) -> None:
    x = data(2)
    handle, key = region("in", x.nbytes)
    shmc.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory("in", key, x.nbytes)

    def infer(shape: list[int], byte_size: int, offset: int = 0, name: str = "in", out: int | None = None) -> Any:
        tensor = triton.InferInput("input", shape, "FP32")
        tensor.set_shared_memory(name, byte_size, offset)
        outputs = None
        if out is not None:
            requested = triton.InferRequestedOutput("probabilities")
            requested.set_shared_memory("in", out)
            outputs = [requested]
        return lambda: client.infer(MODEL, [tensor], outputs=outputs)

    _refused(infer([2, FEATURES], x.nbytes, name="nope"), "404", "no shared memory region 'nope'")
    _refused(infer([2, FEATURES], x.nbytes - 4), "400", f"needs {x.nbytes} bytes")
    _refused(infer([1, FEATURES], x.nbytes // 2, offset=x.nbytes // 2 + 4), "400", "runs past the end of region")
    _refused(infer([2, FEATURES], x.nbytes, out=x.nbytes + 4), "400", "runs past the end of region 'in'")
    _refused(infer([2, FEATURES], x.nbytes, out=4), "400", "needs 16 bytes")  # checked once the output is known


def _post(served: ThreadedSidecar, path: str, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        served.url + path, data=orjson.dumps(body), headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, orjson.loads(raw) if raw else {}
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_json_refusals_carry_a_stable_code(served, client, region) -> None:
    running = served[0]
    _, key = region("c", 64)
    status, doc = _post(running, "/v2/systemsharedmemory/region/c/register", {"key": key, "byte_size": 128})
    assert (status, doc["code"], doc["region"]) == (400, "shared_memory_invalid", "c")
    status, doc = _post(running, "/v2/systemsharedmemory/region/c/register", {"offset": 0})
    assert (status, doc["code"]) == (400, "shared_memory_invalid")
    assert _post(running, "/v2/systemsharedmemory/region/c/register", {"key": key, "byte_size": 64}) == (200, {})
    status, doc = _post(running, "/v2/systemsharedmemory/region/c/register", {"key": key, "byte_size": 64})
    assert (status, doc["code"]) == (409, "shared_memory_exists")
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, FEATURES], "data": [0.0] * FEATURES}]}
    body["inputs"][0]["parameters"] = {"shared_memory_region": "c", "shared_memory_byte_size": 120}
    status, doc = _post(running, f"/v2/models/{MODEL}/infer", body)
    assert status == 400 and "neither 'data'" in doc["error"]
    body["inputs"][0].pop("data")
    body["inputs"][0]["parameters"] = {"shared_memory_region": "c"}  # byte size missing
    status, doc = _post(running, f"/v2/models/{MODEL}/infer", body)
    assert (status, doc["code"]) == (400, "shared_memory_invalid")
    assert "shared_memory_byte_size" in doc["error"]


def test_requests_through_the_gateway_are_refused(served, client, region) -> None:
    """Envoy routes only by the processor's cluster header, so every request it forwards carries it."""
    running = served[0]
    _, key = region("g", 120)
    via = {HEADER_CLUSTER: "cg.tabular.control.0"}
    status, doc = _post(running, "/v2/systemsharedmemory/region/g/register", {"key": key, "byte_size": 120}, **via)
    assert (status, doc["code"]) == (403, "shared_memory_disabled")
    assert "never through the gateway" in doc["error"]
    assert client.get_system_shared_memory_status() == []
    client.register_system_shared_memory("g", key, 120)  # registered locally; still not usable via the gateway
    params = {"shared_memory_region": "g", "shared_memory_byte_size": 120}
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, FEATURES], "parameters": params}]}
    status, doc = _post(running, f"/v2/models/{MODEL}/infer", body, **via)
    assert (status, doc["code"]) == (403, "shared_memory_disabled")
    assert _post(running, f"/v2/models/{MODEL}/infer", body)[0] == 200  # the same request, locally


# ------------------------------------------------------------------------------ tritonclient, gRPC


def test_grpc_register_infer_status_unregister(grpc_client, region, models: Path) -> None:
    rows = 3
    x = data(rows)
    in_handle, in_key = region("gin", x.nbytes)
    out_handle, out_key = region("gout", 16 + rows * PROBA_BYTES)
    shmc.set_shared_memory_region(in_handle, [x])
    grpc_client.register_system_shared_memory("gin", in_key, x.nbytes)
    grpc_client.register_system_shared_memory("gout", out_key, 16 + rows * PROBA_BYTES)
    status = grpc_client.get_system_shared_memory_status(as_json=True)["regions"]
    assert status["gin"]["key"] == in_key and int(status["gout"]["byte_size"]) == 16 + rows * PROBA_BYTES

    tensor = triton_grpc.InferInput("input", [rows, FEATURES], "FP32")
    tensor.set_shared_memory("gin", x.nbytes)
    proba_out = triton_grpc.InferRequestedOutput("probabilities")
    proba_out.set_shared_memory("gout", rows * PROBA_BYTES, offset=16)
    outputs = [proba_out, triton_grpc.InferRequestedOutput("label")]  # the shm output first: indices stay aligned
    result = grpc_client.infer(MODEL, [tensor], outputs=outputs)
    label, proba = reference(models, x)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    params = result.get_output("probabilities").parameters
    assert params["shared_memory_region"].string_param == "gout"
    assert params["shared_memory_byte_size"].int64_param == rows * PROBA_BYTES
    assert params["shared_memory_offset"].int64_param == 16
    written = shmc.get_contents_as_numpy(out_handle, np.float32, [rows, 2], offset=16)
    np.testing.assert_allclose(written, proba, rtol=1e-6)

    grpc_client.unregister_system_shared_memory("gin")
    assert list(grpc_client.get_system_shared_memory_status(as_json=True).get("regions", {})) == ["gout"]


def test_grpc_mixed_raw_and_shared_inputs(served, region, models: Path) -> None:
    """A gRPC request's raw_input_contents belong to the inputs not in shared memory, in order."""
    import tritonclient.grpc.service_pb2 as pb

    from sidecar.grpc_service import decode_infer_request
    from sidecar.protocol import Signature, TensorSpec

    signature = Signature(
        "two",
        (TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,)), TensorSpec("c", "FP32", (-1, 2))),
        (TensorSpec("y", "FP32", (-1, 2)),),
    )
    b = np.array([7, 8], np.int64)
    handle, key = region("mixed", b.nbytes)
    shmc.set_shared_memory_region(handle, [b])
    regions = shm.Regions(enabled=True)
    regions.register("mixed", key, 0, b.nbytes)
    request = pb.ModelInferRequest(model_name="two")
    request.inputs.add(name="a", datatype="FP32", shape=[2, 2])
    tensor = request.inputs.add(name="b", datatype="INT64", shape=[2])
    tensor.parameters["shared_memory_region"].string_param = "mixed"
    tensor.parameters["shared_memory_byte_size"].int64_param = b.nbytes
    request.inputs.add(name="c", datatype="FP32", shape=[2, 2])
    a, c = np.ones((2, 2), np.float32), np.full((2, 2), 3, np.float32)
    request.raw_input_contents.extend([a.tobytes(), c.tobytes()])
    decoded = decode_infer_request(signature, request, regions)
    np.testing.assert_array_equal(decoded.inputs[0], a)
    np.testing.assert_array_equal(decoded.inputs[1], b)
    np.testing.assert_array_equal(decoded.inputs[2], c)
    request.raw_input_contents.append(c.tobytes())
    with pytest.raises(shm.SidecarError, match="has 3 entries but the request has 2 inputs outside shared memory"):
        decode_infer_request(signature, request, regions)
    del request.raw_input_contents[-1]
    with pytest.raises(shm.SharedMemoryDisabled):  # the default: off
        decode_infer_request(signature, request)
    regions.close()


def _grpc_refused(call: Any, code: grpc.StatusCode, sentence: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == f"StatusCode.{code.name}", caught.value.message()
    assert sentence in caught.value.message()


def test_grpc_refusals(grpc_client, region) -> None:
    _, key = region("e", 64)
    invalid, not_found, exists = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
    )
    _grpc_refused(lambda: grpc_client.register_system_shared_memory("e", key, 65), invalid, "runs past the end")
    absent = "/cgtest_absent_zz"
    _grpc_refused(lambda: grpc_client.register_system_shared_memory("e", absent, 8), invalid, "cannot open")
    grpc_client.register_system_shared_memory("e", key, 64)
    _grpc_refused(lambda: grpc_client.register_system_shared_memory("e", key, 64), exists, "already registered")
    _grpc_refused(lambda: grpc_client.get_system_shared_memory_status("x"), not_found, "no shared memory region 'x'")
    _grpc_refused(lambda: grpc_client.unregister_system_shared_memory("x"), not_found, "no shared memory region 'x'")
    tensor = triton_grpc.InferInput("input", [1, FEATURES], "FP32")
    tensor.set_shared_memory("e", 120)
    _grpc_refused(lambda: grpc_client.infer(MODEL, [tensor]), invalid, "runs past the end of region 'e' (64 bytes)")
    tensor.set_shared_memory("x", 120)
    _grpc_refused(lambda: grpc_client.infer(MODEL, [tensor]), not_found, "no shared memory region 'x'")
    _grpc_refused(
        lambda: grpc_client.register_system_shared_memory("v", key, 8, headers={HEADER_CLUSTER: "cg.t.c.0"}),
        grpc.StatusCode.PERMISSION_DENIED,
        "never through the gateway",
    )


# ------------------------------------------------------------------------------ off by default


async def test_off_by_default(make_client) -> None:
    client = await make_client()
    sidecar = client.app[SIDECAR]
    assert sidecar.config.shared_memory is False
    for method, path in [
        ("GET", "/v2/systemsharedmemory/status"),
        ("GET", "/v2/systemsharedmemory/region/a/status"),
        ("POST", "/v2/systemsharedmemory/region/a/register"),
        ("POST", "/v2/systemsharedmemory/unregister"),
        ("POST", "/v2/systemsharedmemory/region/a/unregister"),
    ]:
        response = await client.request(method, path, json={"key": "/x", "offset": 0, "byte_size": 8})
        doc = await response.json()
        assert (response.status, doc["code"]) == (403, "shared_memory_disabled"), path
        assert "--shared-memory" in doc["error"]
    params = {"shared_memory_region": "a", "shared_memory_byte_size": 120}
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, FEATURES], "parameters": params}]}
    response = await client.post("/v2/models/tabular-control/infer", json=body)
    assert response.status == 403 and (await response.json())["code"] == "shared_memory_disabled"
    one = [{"name": "input", "datatype": "FP32", "shape": [1, FEATURES], "data": [0.0] * FEATURES}]
    out = {"name": "probabilities", "parameters": params}
    response = await client.post("/v2/models/tabular-control/infer", json={"inputs": one, "outputs": [out]})
    assert response.status == 403
    metadata = await (await client.get("/v2")).json()
    assert "system_shared_memory" not in metadata["extensions"]


def test_grpc_off_by_default(models: Path) -> None:
    config = SidecarConfig(
        model_path=str(models / "tabular-control.onnx"), port=free_port(), grpc_port=free_port(), intra_op_threads=1
    )
    with sidecar_in_thread(config):
        c = triton_grpc.InferenceServerClient(f"127.0.0.1:{config.grpc_port}")
        _grpc_refused(c.get_system_shared_memory_status, grpc.StatusCode.PERMISSION_DENIED, "--shared-memory")
        _grpc_refused(lambda: c.register_system_shared_memory("a", "/x", 8), grpc.StatusCode.PERMISSION_DENIED, "off")
        assert "system_shared_memory" not in c.get_server_metadata().extensions
        c.close()


async def test_shutdown_unregisters_every_region(make_client, region) -> None:
    _, key = region("s", 64)
    client = await make_client(shared_memory=True)
    response = await client.post("/v2/systemsharedmemory/region/s/register", json={"key": key, "byte_size": 64})
    assert response.status == 200
    regions = client.app[SIDECAR].regions
    assert len(regions) == 1
    await client.close()
    assert len(regions) == 0


# ------------------------------------------------------------------------------ the regions themselves


def test_an_input_is_a_copy_the_client_cannot_change_mid_flight(region) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    handle, key = region("copy", x.nbytes)
    shmc.set_shared_memory_region(handle, [x])
    regions = shm.Regions(enabled=True)
    regions.register("copy", key, 0, x.nbytes)
    got = regions.read(shm.Reference("copy", x.nbytes), "x", np.dtype("<f4"), (2, 3))
    shmc.set_shared_memory_region(handle, [np.zeros_like(x)])  # the client writes again
    np.testing.assert_array_equal(got, x)
    regions.close()


def test_symlinks_and_shrunk_objects_are_refused(region) -> None:
    _, key = region("target", 64)
    link = f"cgtest_link_{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.join(shm.SHM_DIR, key.lstrip("/")), os.path.join(shm.SHM_DIR, link))
    regions = shm.Regions(enabled=True)
    try:
        with pytest.raises(shm.RegionInvalid, match="cannot open"):
            regions.register("l", "/" + link, 0, 8)
    finally:
        os.unlink(os.path.join(shm.SHM_DIR, link))
    regions.register("t", key, 0, 64)
    os.truncate(os.path.join(shm.SHM_DIR, key.lstrip("/")), 8)  # the client shrinks its object
    with pytest.raises(shm.RegionInvalid, match="has shrunk"):  # an error, not a SIGBUS
        regions.read(shm.Reference("t", 64), "x", np.dtype("u1"), (64,))
    regions.close()


# ------------------------------------------------------------------------------ the flag


def test_the_flag_turns_it_on_and_refuses_workers(capsys) -> None:
    from cohortgate.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["sidecar", "--model", "m.onnx"]).shared_memory is False
    args = parser.parse_args(["sidecar", "--model", "m.onnx", "--shared-memory", "--workers", "2"])
    assert args.shared_memory is True
    assert args.func(args) == 2  # refused before anything starts
    assert "--shared-memory is not available with --workers" in capsys.readouterr().err


async def test_every_datatype_by_reference_both_ways(make_client, region) -> None:
    """The dtypes graph echoes FP32, FP64, INT32, INT64 and BOOL: each sent from and answered into one region."""
    values = {
        "f32": np.arange(6, dtype="<f4").reshape(2, 3),
        "f64": np.arange(4, dtype="<f8").reshape(2, 2) / 3,
        "i32": np.array([-1, 7], "<i4"),
        "i64": np.array([[2**40, -3], [5, 6]], "<i8"),
        "b": np.array([True, False]),
    }
    kinds = {"f32": "FP32", "f64": "FP64", "i32": "INT32", "i64": "INT64", "b": "BOOL"}
    total = sum(v.nbytes for v in values.values())
    handle, key = region("dt", 2 * total)
    client = await make_client("dtypes", shared_memory=True)
    response = await client.post("/v2/systemsharedmemory/region/dt/register", json={"key": key, "byte_size": 2 * total})
    assert response.status == 200
    inputs, outputs, offset = [], [], 0
    for k, v in values.items():
        shmc.set_shared_memory_region(handle, [v], offset=offset)
        params = {"shared_memory_region": "dt", "shared_memory_byte_size": v.nbytes, "shared_memory_offset": offset}
        inputs.append({"name": f"x_{k}", "datatype": kinds[k], "shape": list(v.shape), "parameters": params})
        out = {**params, "shared_memory_offset": total + offset}
        outputs.append({"name": f"y_{k}", "parameters": out})
        offset += v.nbytes
    response = await client.post("/v2/models/dtypes/infer", json={"inputs": inputs, "outputs": outputs})
    doc = await response.json()
    assert response.status == 200, doc
    offset = total
    for (k, v), answered in zip(values.items(), doc["outputs"], strict=True):
        assert answered["name"] == f"y_{k}"
        assert answered["parameters"]["shared_memory_byte_size"] == v.nbytes and "data" not in answered
        np.testing.assert_array_equal(shmc.get_contents_as_numpy(handle, v.dtype, v.shape, offset=offset), v)
        offset += v.nbytes
