"""Shutdown drains, the CLI as a real process, and shadow reports to real Redis and HTTP sinks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from sidecar.report import (
    HttpSink,
    RedisStreamSink,
    Reporter,
    ShadowReport,
    output_digests,
    sink_from_url,
)
from sidecar.server import SidecarConfig
from tests.sidecar.sidecar_helpers import free_port, sidecar_in_thread, wait_ready

ROOT = Path(__file__).resolve().parents[2]


def body(seed: int) -> dict:
    x = np.random.default_rng(seed).normal(10, 5, (1, 30)).astype(np.float32)
    return {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": x.ravel().tolist()}]}


# Drain -----------------------------------------------------------------------------------------


async def test_shutdown_finishes_queued_requests_then_refuses(models: Path) -> None:
    config = SidecarConfig(
        model_path=str(models / "tabular-control.onnx"),
        name="tabular",
        port=free_port(),
        max_queue_delay_ms=400,  # requests sit in the queue when the stop comes
        intra_op_threads=1,
    )
    with sidecar_in_thread(config) as running:
        async with aiohttp.ClientSession() as session:
            url = f"{running.url}/v2/models/tabular/infer"
            calls = [asyncio.ensure_future(session.post(url, json=body(i))) for i in range(8)]
            await asyncio.sleep(0.15)
            stopping = asyncio.ensure_future(asyncio.to_thread(running.stop))
            responses = await asyncio.gather(*calls)
            assert [r.status for r in responses] == [200] * 8
            for r in responses:
                assert len((await r.json())["outputs"]) == 2
            await stopping
        assert not running.thread.is_alive()
        assert not running.errors
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"{running.url}/v2/health/live")


# The CLI, as a real process --------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cohortgate.cli", *args]


@contextlib.contextmanager
def sidecar_process(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    proc = subprocess.Popen(
        cli("sidecar", "--port", str(port), "--threads", "1", *args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, alive=lambda: proc.poll() is None)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.integration
async def test_cli_sidecar_serves_and_drains_on_sigterm(models: Path) -> None:
    model = str(models / "tabular-canary.onnx")
    with sidecar_process(
        "--model", model, "--name", "tabular", "--variant", "canary", "--max-queue-delay-ms", "400"
    ) as (
        proc,
        url,
    ):
        async with aiohttp.ClientSession() as session:
            meta = await (await session.get(f"{url}/v2/models/tabular")).json()
            assert meta["parameters"]["variant"] == "canary"
            calls = [
                asyncio.ensure_future(session.post(f"{url}/v2/models/tabular/infer", json=body(i))) for i in range(5)
            ]
            await asyncio.sleep(0.15)
            proc.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(*calls)
            assert [r.status for r in responses] == [200] * 5
            assert {r.headers["x-cohortgate-served-by"] for r in responses} == {"canary"}
        assert await asyncio.to_thread(proc.wait, 20) == 0
        log = proc.stdout.read()
        assert "ready on http://127.0.0.1" in log
        assert "Traceback" not in log


@pytest.mark.integration
def test_cli_sidecar_refuses_a_bad_model(tmp_path: Path) -> None:
    result = subprocess.run(
        cli("sidecar", "--model", str(tmp_path / "missing.onnx"), "--port", str(free_port())),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_cli_models_build_is_idempotent_and_prints_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "models"
    first = subprocess.run(cli("models", "build", "--out", str(out)), cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    for name in ("tabular-control", "tabular-canary", "tabular-challenger", "mlp-4x512"):
        assert (out / f"{name}.onnx").is_file()
    accuracies = [float(line.rsplit(" ", 1)[1]) for line in first.stdout.splitlines() if "accuracy" in line]
    assert len(accuracies) == 3
    assert all(a > 0.9 for a in accuracies)
    before = (out / "tabular-canary.onnx").stat().st_mtime_ns
    second = subprocess.run(cli("models", "build", "--out", str(out)), cwd=ROOT, capture_output=True, text=True)
    assert second.stdout.count("kept") == 4
    assert (out / "tabular-canary.onnx").stat().st_mtime_ns == before


def test_build_models_force_rebuilds(tmp_path: Path) -> None:
    from sidecar.demo_models import build_models

    first = build_models(tmp_path, include_mlp=False)
    assert not any(m.skipped for m in first)
    assert all(m.skipped for m in build_models(tmp_path, include_mlp=False))
    assert not any(m.skipped for m in build_models(tmp_path, force=True, include_mlp=False))


def test_demo_models_have_the_interface_the_policy_expects(models: Path) -> None:
    import onnxruntime as ort

    for name in ("tabular-control", "tabular-canary", "tabular-challenger"):
        session = ort.InferenceSession(str(models / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        (only,) = session.get_inputs()
        assert (only.name, only.type, only.shape[1]) == ("input", "tensor(float)", 30)
        assert [(o.name, o.type) for o in session.get_outputs()] == [
            ("label", "tensor(int64)"),
            ("probabilities", "tensor(float)"),
        ]
    session = ort.InferenceSession(str(models / "mlp-4x512.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1] == 512


# Shadow reports --------------------------------------------------------------------------------


def test_digests_are_per_output_and_change_with_the_data() -> None:
    a = (np.array([1, 0]), np.array([[0.1, 0.9], [0.8, 0.2]], np.float32))
    b = (np.array([1, 0]), np.array([[0.2, 0.8], [0.8, 0.2]], np.float32))
    da, pa = output_digests(["label", "probabilities"], a)
    db, pb = output_digests(["label", "probabilities"], b)
    assert da != db
    assert dict(pa)["label"] == dict(pb)["label"]  # same labels: the models agree
    assert dict(pa)["probabilities"] != dict(pb)["probabilities"]


def test_report_fields_round_trip() -> None:
    report = ShadowReport("r", "challenger", "tabular", 200, 1.5, "d", (("label", "x"), ("probabilities", "y")), 3.0)
    assert ShadowReport.from_fields(report.to_fields()) == report
    assert json.loads(json.dumps(report.to_json()))["output_digests"] == {"label": "x", "probabilities": "y"}


def test_sink_urls() -> None:
    assert isinstance(sink_from_url("http://127.0.0.1:9/reports"), HttpSink)
    redis_sink = sink_from_url("redis://127.0.0.1:6379/0?stream=shadow:tabular")
    assert isinstance(redis_sink, RedisStreamSink)
    assert redis_sink.stream == "shadow:tabular"
    for url in ("ftp://x", "memory://"):  # a memory sink from the CLI would only grow: not offered
        with pytest.raises(ValueError, match="http"):
            sink_from_url(url)


class StuckSink:
    """A sink that never answers: reporting must not slow anything down."""

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, reports) -> None:
        self.calls += 1
        await asyncio.sleep(3600)

    async def close(self) -> None:
        pass


async def test_reporting_never_blocks_and_drops_when_full() -> None:
    from sidecar.metrics import SidecarMetrics

    metrics = SidecarMetrics("m")
    sink = StuckSink()
    reporter = Reporter(sink, variant="v", model="m", output_names=["y"], metrics=metrics, capacity=3, batch=1)
    reporter.start()
    for i in range(10):
        reporter.report(f"r{i}", 200, 0.001, (np.zeros(2),))
        await asyncio.sleep(0)
    # Every report() returned while the sink's one send is still stuck: nothing waited for it.
    assert sink.calls == 1
    assert metrics.reports["dropped"] == 10 - 3 - 1  # three queued, one stuck in the sink
    await reporter.close(timeout_s=0.1)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    from tests.controller.conftest import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.02)


@pytest.mark.integration
async def test_reports_to_a_redis_stream(make_client, redis_url: str) -> None:
    import redis.asyncio as redis

    client = await make_client(name="tabular", variant="challenger", report_to=f"{redis_url}?stream=shadow:test")
    for i in range(3):
        response = await client.post("/v2/models/tabular/infer", json=body(i), headers={"x-request-id": f"id-{i}"})
        assert response.status == 200
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:

        async def three() -> bool:
            return await r.xlen("shadow:test") == 3

        await wait_for(three)
        entries = await r.xrange("shadow:test")
    finally:
        await r.aclose()
    reports = [ShadowReport.from_fields(fields) for _, fields in entries]
    assert [x.request_id for x in reports] == ["id-0", "id-1", "id-2"]
    assert {x.variant for x in reports} == {"challenger"}
    assert all(len(x.digest) == 32 and x.status == 200 for x in reports)
    assert {name for name, _ in reports[0].output_digests} == {"label", "probabilities"}


async def test_reports_to_an_http_endpoint(make_client, aiohttp_server) -> None:
    received: list[dict] = []

    async def collect(request: web.Request) -> web.Response:
        received.extend(await request.json())
        return web.Response(status=204)

    collector = web.Application()
    collector.router.add_post("/reports", collect)
    server = await aiohttp_server(collector)
    client = await make_client(name="tabular", variant="control", report_to=str(server.make_url("/reports")))
    await client.post("/v2/models/tabular/infer", json=body(1), headers={"x-request-id": "h-1"})

    async def arrived() -> bool:
        return len(received) == 1

    await wait_for(arrived)
    assert received[0]["request_id"] == "h-1"
    assert received[0]["variant"] == "control"
    assert set(received[0]["output_digests"]) == {"label", "probabilities"}
