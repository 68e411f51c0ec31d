"""Helpers for the sidecar tests: tiny ONNX graphs and a sidecar on a real port in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from sidecar.report import ReportSink
from sidecar.server import SidecarConfig, serve

OPSET = [helper.make_opsetid("", 17)]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def dtypes_model(path: Path) -> Path:
    """Five inputs of five datatypes, each echoed to an output (``x_f32`` -> ``y_f32``, ...)."""
    kinds = [
        ("f32", TensorProto.FLOAT, ["n", 3]),
        ("f64", TensorProto.DOUBLE, ["n", 2]),
        ("i32", TensorProto.INT32, ["n"]),
        ("i64", TensorProto.INT64, ["n", 2]),
        ("b", TensorProto.BOOL, ["n"]),
    ]
    inputs = [helper.make_tensor_value_info(f"x_{k}", t, s) for k, t, s in kinds]
    outputs = [helper.make_tensor_value_info(f"y_{k}", t, s) for k, t, s in kinds]
    nodes = [helper.make_node("Identity", [f"x_{k}"], [f"y_{k}"]) for k, _, _ in kinds]
    return _save(helper.make_graph(nodes, "dtypes", inputs, outputs), path)


def fixed_batch_model(path: Path) -> Path:
    """Input FP32 [2, 3] (no free first axis, so it cannot be batched) -> Relu."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    return _save(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "fixed", [x], [y]), path)


def lying_batch_model(path: Path) -> Path:
    """Output [n, 3] by its signature, but it keeps only rows whose first value exceeds 1e30: any
    batch comes back with fewer rows than went in and cannot be split."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 3])
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    big = helper.make_tensor("big", TensorProto.FLOAT, [], [1e30])
    nodes = [
        helper.make_node("Gather", ["x", "zero"], ["first"], axis=1),
        helper.make_node("Greater", ["first", "big"], ["keep"]),
        helper.make_node("Compress", ["x", "keep"], ["y"], axis=0),
    ]
    return _save(helper.make_graph(nodes, "lying", [x], [y], [zero, big]), path)


def string_model(path: Path) -> Path:
    """A string tensor, which the sidecar refuses to serve."""
    x = helper.make_tensor_value_info("x", TensorProto.STRING, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, ["n"])
    return _save(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "strings", [x], [y]), path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 20.0, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise RuntimeError(f"the sidecar for {url} exited before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"sidecar at {url} did not become ready")
        time.sleep(0.05)


@dataclass
class ThreadedSidecar:
    """A sidecar serving on a real 127.0.0.1 port from its own event loop in a thread."""

    url: str
    host_port: str
    loop: asyncio.AbstractEventLoop
    stop_event: asyncio.Event
    thread: threading.Thread
    errors: list[BaseException]

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(timeout)


@contextlib.contextmanager
def sidecar_in_thread(config: SidecarConfig, report_sink: ReportSink | None = None) -> Iterator[ThreadedSidecar]:
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    errors: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve(config, stop=stop, report_sink=report_sink, handle_signals=False))
        except BaseException as exc:  # surfaced to the test through ``errors``
            errors.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="sidecar-under-test", daemon=True)
    thread.start()
    url = f"http://{config.host}:{config.port}"
    running = ThreadedSidecar(url, f"{config.host}:{config.port}", loop, stop, thread, errors)
    try:
        wait_ready(url, alive=thread.is_alive)
        yield running
    finally:
        running.stop()
