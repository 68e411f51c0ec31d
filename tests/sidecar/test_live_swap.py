"""Live swap: a new model version loads beside the old one, warms up, takes over in one step, the old
one drains its batches and is freed; under a steady load no request fails, and every answer names the
version that computed it."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import pytest

from cohortgate.core.contract import HEADER_MODEL_VERSION
from cohortgate.support.files import write_atomic
from sidecar import repository
from sidecar.server import SIDECAR, SidecarConfig, build_app
from tests.sidecar.supply_helpers import add_model, keypair, push_versions

RATE_HZ = 200  # requests started per second, whatever the answers do (an open loop)
SWAP_TIMEOUT_S = 120  # a cold onnxruntime session on a busy 2-core machine; generous on purpose


async def test_swap_under_steady_load_fails_no_request(aiohttp_client, tmp_path: Path) -> None:
    store = repository.DirectoryStore(tmp_path / "store")
    private, _ = keypair(tmp_path)
    push_versions(store, "adder", 1.0, 2.0)
    for version in ("1", "2"):
        repository.sign(store, "adder", version, private)
    model_file = tmp_path / "adder.model"
    model_file.write_text(store.url("adder/1") + "\n")
    config = SidecarConfig(
        model_path=store.url("adder/1"),
        model_file=str(model_file),
        model_poll_s=0.05,
        trusted_keys=(str(tmp_path / "platform.pub"),),
        intra_op_threads=1,
        max_queue_delay_ms=20,  # ~4 requests wait in the queue at any time: the old model has some to drain
        model_cache_dir=str(tmp_path / "cache"),
    )
    app = build_app(config)
    client = await aiohttp_client(app)
    sidecar = app[SIDECAR]
    await sidecar.wait_ready()
    old = weakref.ref(sidecar.model)
    answers: list[tuple[int, str, float]] = []  # (status, version header, y[0] - x[0]) in completion order

    async def one(i: int) -> None:
        x = float(i % 7)
        body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [x, x]}]}
        async with client.post("/v2/models/adder/infer", json=body) as response:
            doc = await response.json()
            delta = doc["outputs"][0]["data"][0] - x if response.status == 200 else float("nan")
            answers.append((response.status, response.headers.get(HEADER_MODEL_VERSION, ""), delta))

    tasks: list[asyncio.Task] = []
    stop = asyncio.Event()

    async def load() -> None:
        i = 0
        while not stop.is_set():
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(1 / RATE_HZ)

    async def seen(version: str, count: int) -> None:
        while sum(1 for _, v, _ in answers if v == version) < count:
            await asyncio.sleep(0.02)

    loader = asyncio.create_task(load())
    await asyncio.wait_for(seen("adder/1", 50), SWAP_TIMEOUT_S)
    write_atomic(model_file, store.url("adder/2") + "\n")
    await asyncio.wait_for(seen("adder/2", 50), SWAP_TIMEOUT_S)
    stop.set()
    await loader
    await asyncio.wait_for(asyncio.gather(*tasks), SWAP_TIMEOUT_S)  # a swap that strands requests fails here

    assert len(answers) >= 100
    failed = [a for a in answers if a[0] != 200]
    assert failed == [], f"{len(failed)} of {len(answers)} requests failed during the swap"
    # Each answer names the version that computed it: v1 adds 1, v2 adds 2.
    assert {(v, d) for _, v, d in answers} == {("adder/1", 1.0), ("adder/2", 2.0)}
    # One switch: once v2 answered, v1 answered only requests already queued on it (drained).
    versions = [v for _, v, _ in answers]
    first_v2 = versions.index("adder/2")
    assert versions[first_v2:].count("adder/1") <= config.max_queue  # the drained tail, never a flip-flop back
    assert "adder/1" not in versions[first_v2 + 64 :]
    metrics = await (await client.get("/metrics")).text()
    assert 'cohortgate_sidecar_model_swaps_total{model="adder",outcome="swapped"} 1.0' in metrics
    assert 'version="adder/2"' in metrics and 'version="adder/1"' not in metrics
    gc.collect()
    assert old() is None, "the old model is still referenced after the swap"


async def test_a_swap_to_a_badly_signed_version_is_refused_and_the_old_one_keeps_serving(
    aiohttp_client, tmp_path: Path
) -> None:
    store = repository.DirectoryStore(tmp_path / "store")
    private, _ = keypair(tmp_path, "platform")
    rogue, _ = keypair(tmp_path, "rogue")
    push_versions(store, "adder", 1.0, 2.0)
    repository.sign(store, "adder", "1", private)
    repository.sign(store, "adder", "2", rogue)
    config = SidecarConfig(
        model_path=store.url("adder/1"),
        trusted_keys=(str(tmp_path / "platform.pub"),),
        intra_op_threads=1,
        model_cache_dir=str(tmp_path / "cache"),
    )
    app = build_app(config)
    client = await aiohttp_client(app)
    sidecar = app[SIDECAR]
    await sidecar.wait_ready()
    assert await sidecar.swap(store.url("adder/2")) is False
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0, 0]}]}
    response = await client.post("/v2/models/adder/infer", json=body)
    assert response.status == 200 and response.headers[HEADER_MODEL_VERSION] == "adder/1"
    assert (await client.get("/v2/health/ready")).status == 200
    metrics = await (await client.get("/metrics")).text()
    assert 'outcome="refused"} 1.0' in metrics and 'reason="signature"} 1.0' in metrics


@pytest.mark.parametrize("rows", [1, 3])
async def test_swap_by_call_changes_answers_and_headers(aiohttp_client, tmp_path: Path, rows: int) -> None:
    store = repository.DirectoryStore(tmp_path / "store")
    v1, v2 = push_versions(store, "adder", 1.0, 2.0)
    app = build_app(SidecarConfig(model_path=v1.reference, intra_op_threads=1, model_cache_dir=str(tmp_path / "c")))
    client = await aiohttp_client(app)
    await app[SIDECAR].wait_ready()
    body = {"inputs": [{"name": "x", "shape": [rows, 2], "datatype": "FP32", "data": [0.0] * (2 * rows)}]}
    assert (await (await client.post("/v2/models/adder/infer", json=body)).json())["outputs"][0]["data"][0] == 1.0
    assert await app[SIDECAR].swap(v2.reference)
    response = await client.post("/v2/models/adder/infer", json=body)
    assert (await response.json())["outputs"][0]["data"] == [2.0] * (2 * rows)
    assert response.headers[HEADER_MODEL_VERSION] == "adder/2"
    assert add_model(2.0)  # the model the header names is the one that answered
