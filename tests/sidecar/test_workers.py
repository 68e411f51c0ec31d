"""``sidecar --workers 2``: two fronts and one model executor, as real processes on real onnxruntime.

Timeouts are generous and documented (CI is a busy 2-core box where an executor takes seconds to
import onnxruntime and load a model); nothing asserts on wall-clock speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.sidecar.sidecar_helpers import OPSET, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
READY_S = 120.0  # the executor imports onnxruntime and warms the model up; slow on a loaded box
RECOVER_S = 120.0  # the parent restarts a killed executor after 0.5 s, then it loads the model again
SEEN_IN_A_ROW = 20  # fresh connections answered 200 in a row: both fronts are ready (chance 2**-19 not)


def body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def rows(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(10, 5, (n, 30)).astype(np.float32)


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(url: str, doc: dict, timeout: float = 30.0) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def children_of(pid: int) -> dict[int, str]:
    """{pid: command line} of the processes whose parent is ``pid``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == pid:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
    return found


def executor_pid(parent: int) -> int:
    pids = [p for p, cmd in children_of(parent).items() if "sidecar.workers executor" in cmd]
    assert len(pids) == 1, children_of(parent)
    return pids[0]


def wait_all_ready(url: str, proc: subprocess.Popen, log: Path, fronts: int = 2, timeout: float = READY_S) -> None:
    """Until every front has said it is ready (so every one listens: a front still importing would
    leave all connections to the others) and ``SEEN_IN_A_ROW`` fresh connections in a row find one
    ready."""
    deadline = time.monotonic() + timeout
    while log.read_text().count(" ready on http://") < fronts:
        if proc.poll() is not None:
            raise RuntimeError(f"the sidecar exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fronts at {url} did not all start in {timeout:.0f} s")
        time.sleep(0.1)
    in_a_row = 0
    while in_a_row < SEEN_IN_A_ROW:
        if proc.poll() is not None:
            raise RuntimeError(f"the sidecar exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fronts at {url} were not all ready in {timeout:.0f} s")
        try:
            status, _ = get(f"{url}/v2/health/ready", timeout=2)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            status = 0
        in_a_row = in_a_row + 1 if status == 200 else 0
        if status != 200:
            time.sleep(0.1)


@contextlib.contextmanager
def workers(model: Path, log: Path, *args: str, fronts: int = 2) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    cmd = [sys.executable, "-m", "sidecar", "--model", str(model), "--name", "m", "--port", str(port)]
    cmd += ["--workers", str(fronts), "--threads", "1", *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_all_ready(url, proc, log, fronts)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def gather_model(path: Path) -> Path:
    """Input INT64 [n, k] indexes a table of three values: output FP32 [n, k]. An index out of range
    fails in onnxruntime; requests of another ``k`` never share a batch (trailing shapes differ)."""
    x = helper.make_tensor_value_info("input", TensorProto.INT64, ["n", "k"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", "k"])
    table = helper.make_tensor("table", TensorProto.FLOAT, [3], [10.0, 20.0, 30.0])
    node = helper.make_node("Gather", ["table", "input"], ["output"], axis=0)
    model = helper.make_model(helper.make_graph([node], "gather", [x], [y], [table]), opset_imports=OPSET)
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


# ----------------------------------------------------------------------------------------------


async def test_two_fronts_answer_as_one_process_does(models: Path, make_client, tmp_path: Path) -> None:
    single = await make_client("tabular-control", name="m")
    cases = [rows(seed, n) for seed, n in ((1, 1), (2, 3), (3, 17), (4, 1), (5, 64), (6, 2))]
    expected = []
    for x in cases:
        response = await single.post("/v2/models/m/infer", json=body(x))
        assert response.status == 200
        expected.append((await response.json())["outputs"])
    with workers(models / "tabular-control.onnx", tmp_path / "log") as (_, url):
        for _ in range(3):  # fresh connections: both fronts answer some
            for x, want in zip(cases, expected, strict=True):
                status, doc, _ = await asyncio.to_thread(post, f"{url}/v2/models/m/infer", body(x))
                assert status == 200, doc
                assert doc["outputs"] == want
        _, text = get(f"{url}/metrics")
    text = text.decode()
    # every request's tensors went through a front's arena, none through the socket
    assert metric(text, "cohortgate_sidecar_worker_requests_total", path="shm") == 3 * len(cases)
    assert metric(text, "cohortgate_sidecar_worker_requests_total", path="inline") == 0


async def test_requests_from_both_fronts_share_one_batch(models: Path, tmp_path: Path) -> None:
    model = models / "tabular-control.onnx"
    with workers(model, tmp_path / "log", "--max-queue-delay-ms", "1000", "--max-batch-size", "64") as (_, url):
        infer = f"{url}/v2/models/m/infer"
        # a fresh connection per request: the kernel spreads them over both fronts (all 24 on one
        # front has chance 2**-23), and all wait for the same batch (1 s from the first)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

            async def call(i: int) -> int:
                async with session.post(infer, json=body(rows(i, 1))) as response:
                    return response.status

            statuses = await asyncio.gather(*(call(i) for i in range(24)))
        assert statuses == [200] * 24
        _, text = get(f"{url}/metrics")
    text = text.decode()
    assert metric(text, "cohortgate_sidecar_cross_front_batches_total") >= 1
    # the executor's histograms, shown by whichever front answered the scrape
    batches = metric(text, "cohortgate_sidecar_batch_requests_count")
    merged = metric(text, "cohortgate_sidecar_batch_requests_sum")
    assert merged >= 24 and batches < merged


async def test_a_failed_batch_fails_only_its_requests(tmp_path: Path) -> None:
    model = gather_model(tmp_path / "gather.onnx")
    with workers(model, tmp_path / "log", "--max-queue-delay-ms", "300") as (proc, url):
        infer = f"{url}/v2/models/m/infer"
        good = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "INT64", "data": [0, 1, 2]}]}
        bad = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "INT64", "data": [0, 7]}]}
        calls = [asyncio.to_thread(post, infer, bad if i % 3 == 0 else good) for i in range(9)]
        answers = await asyncio.gather(*calls)
        for i, (status, doc, _) in enumerate(answers):
            if i % 3 == 0:
                assert status == 500, doc
                assert doc["error"].startswith("onnxruntime failed"), doc
            else:
                assert status == 200, doc
                assert doc["outputs"][0]["data"] == [10, 20, 30]
        status, doc, _ = await asyncio.to_thread(post, infer, good)  # the executor lives on
        assert status == 200
        assert proc.poll() is None


async def test_a_killed_executor_means_503_json_then_recovery(models: Path, tmp_path: Path) -> None:
    with workers(models / "tabular-control.onnx", tmp_path / "log") as (proc, url):
        infer = f"{url}/v2/models/m/infer"
        status, _, _ = await asyncio.to_thread(post, infer, body(rows(1, 1)))
        assert status == 200
        first = executor_pid(proc.pid)
        os.kill(first, signal.SIGKILL)
        seen: list[int] = []
        deadline = time.monotonic() + RECOVER_S
        while not (503 in seen and seen[-1] == 200):
            assert time.monotonic() < deadline, f"statuses after the kill: {Counter(seen)}, the last {seen[-1]}"
            status, doc, headers = await asyncio.to_thread(post, infer, body(rows(2, 1)))
            seen.append(status)
            if status != 200:
                assert status == 503, doc  # fail closed, never a reset or a 500
                assert "executor" in doc["error"] or "not ready" in doc["error"], doc
                assert headers.get("Retry-After") == "1"
                await asyncio.sleep(0.05)
        assert seen[0] == 503  # the kill was seen before the restart (it takes the model's load)
        assert executor_pid(proc.pid) != first
        await asyncio.to_thread(wait_all_ready, url, proc, tmp_path / "log")  # both fronts reconnected
    assert "restarting in" in (tmp_path / "log").read_text()


async def test_sigterm_drains_every_front_then_the_executor(models: Path, tmp_path: Path) -> None:
    shm_before = {e for e in os.listdir("/dev/shm") if "cohortgate" in e or e.startswith("psm_")}
    model = models / "tabular-control.onnx"
    with workers(model, tmp_path / "log", "--max-queue-delay-ms", "600") as (proc, url):
        executor = executor_pid(proc.pid)
        maps = Path(f"/proc/{executor}/maps").read_text()
        # the executor maps both fronts' arenas (memfd: nothing named in /dev/shm)
        assert len(set(re.findall(r"^\S+ .* /memfd:cohortgate-arena", maps, re.MULTILINE))) >= 2, maps
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

            async def call(i: int) -> tuple[int, dict]:
                async with session.post(f"{url}/v2/models/m/infer", json=body(rows(i, 1))) as response:
                    return response.status, await response.json()

            calls = [asyncio.ensure_future(call(i)) for i in range(12)]
            await asyncio.sleep(0.3)  # the requests are queued in the executor, waiting for the delay
            proc.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*calls)  # a reset would raise here
        assert [status for status, _ in answers] == [200] * 12
        assert all(len(doc["outputs"]) == 2 for _, doc in answers)
        assert await asyncio.to_thread(proc.wait, 90) == 0
        children = children_of(proc.pid)
    assert not children, children
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log, log
    shm_after = {e for e in os.listdir("/dev/shm") if "cohortgate" in e or e.startswith("psm_")}
    assert shm_after <= shm_before, shm_after - shm_before


def test_workers_refuse_what_they_cannot_serve_yet(models: Path, tmp_path: Path) -> None:
    model = str(models / "tabular-control.onnx")
    for extra, sentence in (
        (["--model-file", str(tmp_path / "ref")], "--model-file"),
        (["--model", model, "--grpc-port", str(free_port())], "--grpc-port"),
        (["--model", model, "--shared-memory"], "--shared-memory"),
        (["--model", model, "--workers", "0"], "--workers 0"),
    ):
        (tmp_path / "ref").write_text(model)
        args = ["--workers", "2", *extra] if "--workers" not in extra else extra
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "--port", str(free_port()), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, (extra, result.stderr)
        assert sentence in result.stderr
        assert "Traceback" not in result.stderr


def test_a_model_that_cannot_load_stops_the_sidecar_with_status_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "--workers", "2", "--model", str(tmp_path / "missing.onnx")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=READY_S,
    )
    assert result.returncode == 2, result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
