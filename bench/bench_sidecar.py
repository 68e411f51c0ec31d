"""Benchmark: bare onnxruntime vs the sidecar (batching on and off) vs MLServer, on the 4x512 MLP.

    python bench/bench_sidecar.py [--duration 5] [--repeat 3] [--mlserver-python /tmp/peers/bin/python]

In one run, on one machine:
  * bare onnxruntime: ``session.run`` in a loop at batch 1..256, with the sidecar's session options
    (its intra-op threads) and with every core -- inferences/s, the ceiling;
  * the sidecar, a real ``cohortgate sidecar`` process, with batching on and off, loaded by ``wrk``
    (C, not Python-bound) posting one-row binary-tensor requests at concurrency 1, 16 and 64, and
    128-row binary requests at concurrency 4: requests/s, rows/s, p50/p99, mean batch, and the ratio
    of rows/s to bare onnxruntime's best (same threads) -- for 128-row requests also to bare
    onnxruntime at 128 rows timed right before each run ("alongside"), as a shared host drifts;
  * one-row JSON requests at concurrency 64, for the sidecar and for MLServer when
    ``--mlserver-python`` names a Python with MLServer installed (a custom onnxruntime runtime;
    MLServer's REST API takes JSON tensors), so the peer comparison is like for like.

wrk and the servers share the machine's cores, as a client and a server on one small host would;
on a shared host, use ``--repeat`` (the median is reported).

``--lone-cost`` runs only the opt-in lone-request path (issue 25): one-row binary requests at c1 and
c64, a sidecar with ``--inline-max-us 1000`` against one with the default (off).

``--workers-cost N`` runs only ``sidecar --workers N`` against one process (issue 25): one-row and
128-row binary requests at c1 and c64, interleaved pairs, throughput and the CPU per request of the
whole process tree, as ratios.

``--contract-cost [--contract-mode observe|enforce]`` runs only the data contract's price (issue 20):
two sidecars on the same model, one with a contract over every input column (a range per column,
sketched per window), one without, loaded in turn (A B, B A, ...) by wrk with one-row binary
requests at c64; it prints each pair, the median throughput and CPU ratios, and the gate's own CPU
per request measured in process at the batch size the sidecar formed.

``--shm-cost`` runs only the system shared-memory extension's gain (issue 25): one sidecar with
``--shared-memory``, the same rows sent four ways in turn (JSON in and out, binary in and out,
inputs by reference with binary outputs, inputs and outputs by reference), 1 and 128 rows at c1 and
c16, on the MLP (512 FP32 per row) and, with ``--shm-models``, other models too; it prints each
way's throughput and sidecar CPU per request, and their ratios to binary and to JSON. The regions
are written once before the runs: a real client's cost of writing its tensor into shared memory
(instead of serialising it into the body) is not in the figures, and neither is wrk's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.demo_models import MLP_WIDTH, mlp_model_bytes  # noqa: E402
from sidecar.model import default_intra_op_threads  # noqa: E402

MODEL = "mlp"
BATCHES = (1, 8, 32, 64, 128, 256)


@dataclass
class Result:
    target: str
    body: str  # "binary" or "json"
    concurrency: int
    rows_per_request: int
    rps: float
    p50_ms: float
    p99_ms: float
    mean_batch: float | None
    errors: int
    bare_alongside: float | None = None  # bare onnxruntime at the same rows, measured next to each run

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.rows_per_request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_body(rows: int, binary: bool) -> tuple[bytes, int | None]:
    x = np.random.default_rng(rows).standard_normal((rows, MLP_WIDTH)).astype(np.float32)
    tensor: dict = {"name": "input", "shape": [rows, MLP_WIDTH], "datatype": "FP32"}
    if not binary:
        tensor["data"] = x.ravel().tolist()
        return json.dumps({"inputs": [tensor]}).encode(), None
    tensor["parameters"] = {"binary_data_size": x.nbytes}
    head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return head + x.tobytes(), len(head)


class BareOrt:
    """``session.run`` in a loop, with the sidecar's session options, in this process."""

    def __init__(self, model: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def rate(self, batch: int, seconds: float) -> float:
        """Inferences/s at ``batch`` rows per call."""
        x = np.random.default_rng(1).standard_normal((batch, MLP_WIDTH)).astype(np.float32)
        for _ in range(10):
            self.session.run(None, {"input": x})
        n = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            self.session.run(None, {"input": x})
            n += 1
        return n * batch / elapsed

    def table(self, seconds: float) -> dict[int, float]:
        return {batch: self.rate(batch, seconds) for batch in BATCHES}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)] if m else float("nan")


def wrk(url: str, body_file: Path, header_length: int | None, concurrency: int, seconds: float) -> dict:
    script = body_file.with_suffix(".lua")
    lines = [
        f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()',
        'wrk.method = "POST"',
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if header_length is not None:
        lines[-1] = 'wrk.headers["Content-Type"] = "application/octet-stream"'
        lines.append(f'wrk.headers["Inference-Header-Content-Length"] = "{header_length}"')
    script.write_text("\n".join(lines) + "\n")
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(latency.get("50", "")),
        "p99_ms": _ms(latency.get("99", "")),
        "errors": int(errors.group(1)) if errors else 0,
    }


def scrape_batches(port: int) -> tuple[float, float] | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    total = re.search(r"cohortgate_sidecar_batch_size_sum\{[^}]*\} (\S+)", text)
    count = re.search(r"cohortgate_sidecar_batch_size_count\{[^}]*\} (\S+)", text)
    return (float(total.group(1)), float(count.group(1))) if total and count else None


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"server for {url} did not become ready")
        time.sleep(0.1)


@contextlib.contextmanager
def process(cmd: list[str], ready_url: str, cwd: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(proc, ready_url)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def sidecar(
    model: Path, port: int, threads: int, max_batch: int, extra: tuple[str, ...] = ()
) -> contextlib.AbstractContextManager:
    cmd = [sys.executable, "-m", "sidecar", "--model", str(model), "--name", MODEL, *extra]
    cmd += [
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--max-batch-size",
        str(max_batch),
        "--log-level",
        "WARNING",
    ]
    return process(cmd, f"http://127.0.0.1:{port}/v2/health/ready", ROOT)


MLSERVER_RUNTIME = """
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OrtRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = {threads}
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession("{model}", options, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        y = self._session.run(None, {{"input": x}})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("output", y)])
"""


def mlserver(python: str, model: Path, tmp: Path, port: int, threads: int) -> contextlib.AbstractContextManager:
    folder = tmp / "mlserver"
    folder.mkdir(exist_ok=True)
    (folder / "ort_runtime.py").write_text(textwrap.dedent(MLSERVER_RUNTIME.format(threads=threads, model=model)))
    (folder / "settings.json").write_text(
        json.dumps({"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "debug": False})
    )
    (folder / "model-settings.json").write_text(
        json.dumps({"name": MODEL, "implementation": "ort_runtime.OrtRuntime", "parameters": {"uri": str(model)}})
    )
    mlserver_bin = Path(python).parent / "mlserver"
    env = {**os.environ, "PYTHONPATH": str(folder)}
    return process(
        [str(mlserver_bin), "start", str(folder)], f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready", folder, env
    )


def measure(
    target: str,
    port: int,
    tmp: Path,
    cases: list[tuple[int, bool, int]],
    seconds: float,
    repeat: int,
    bare: BareOrt | None = None,
) -> list[Result]:
    """Run wrk for each (rows per request, binary?, concurrency); the median of ``repeat`` runs.

    For multi-row cases, ``bare`` is timed at the same rows for a second before each run, so the
    ratio compares the two under the same conditions (a shared host drifts within minutes).
    """
    url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
    results = []
    for rows, binary, concurrency in cases:
        body, header_length = request_body(rows, binary)
        body_file = tmp / f"body-{rows}-{'bin' if binary else 'json'}.bin"
        body_file.write_bytes(body)
        wrk(url, body_file, header_length, concurrency, 1)  # warm up
        runs = []
        alongside = []
        for _ in range(repeat):
            if bare is not None and rows > 1:
                alongside.append(bare.rate(rows, 1.0))
            before = scrape_batches(port)
            run = wrk(url, body_file, header_length, concurrency, seconds)
            after = scrape_batches(port)
            if before and after and after[1] > before[1]:
                run["mean_batch"] = (after[0] - before[0]) / (after[1] - before[1])
            runs.append(run)
        median = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
        kind = "binary" if binary else "json"
        results.append(
            Result(
                target,
                kind,
                concurrency,
                rows,
                median["rps"],
                median["p50_ms"],
                median["p99_ms"],
                median.get("mean_batch"),
                sum(r["errors"] for r in runs),
                sorted(alongside)[len(alongside) // 2] if alongside else None,
            )
        )
        spread = ", ".join(f"{r['rps']:,.0f}" for r in runs)
        print(f"  {target:<24} {kind:<6} c{concurrency:<3} {rows:>3} rows: {spread} req/s", file=sys.stderr)
    return results


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(re.search(r"cohortgate_sidecar_requests_total\{[^}]*\} (\S+)", text).group(1))


def ab_pairs(
    model: Path,
    tmp: Path,
    threads: int,
    max_batch: int,
    seconds: float,
    repeat: int,
    *,
    extra: tuple[tuple[str, ...], tuple[str, ...]],
    concurrency: int,
    labels: tuple[str, str],
) -> list[tuple[dict, dict]]:
    """Two sidecars on one model that differ by ``extra`` flags, loaded in turn (A B, B A, A B, ...) by
    wrk with one-row binary requests at ``concurrency``; each run also gets the sidecar's CPU seconds
    per request (from /proc: steadier than throughput when other processes share the cores)."""
    body, header_length = request_body(1, True)
    body_file = tmp / "body-1-bin.bin"
    body_file.write_bytes(body)
    ports = (free_port(), free_port())
    pairs = []
    with (
        sidecar(model, ports[0], threads, max_batch, extra[0]) as a,
        sidecar(model, ports[1], threads, max_batch, extra[1]) as b,
    ):
        procs = dict(zip(ports, (a, b), strict=True))
        urls = {p: f"http://127.0.0.1:{p}/v2/models/{MODEL}/infer" for p in ports}

        def run(port: int) -> dict:
            cpu, n = cpu_seconds(procs[port].pid), served(port)
            result = wrk(urls[port], body_file, header_length, concurrency, seconds)
            result["cpu_s"] = (cpu_seconds(procs[port].pid) - cpu) / max(1.0, served(port) - n)
            return result

        for p in ports:
            wrk(urls[p], body_file, header_length, concurrency, 1)  # warm up
        for i in range(repeat):  # A B, B A, A B, ...: neither side always runs second
            if i % 2:
                second = run(ports[1])
                pair = (run(ports[0]), second)
            else:
                pair = (run(ports[0]), run(ports[1]))
            pairs.append(pair)
            print(
                f"  run {i + 1}: "
                + ", ".join(
                    f"{label} {r['rps']:,.0f} req/s p50 {r['p50_ms']:.3f} ms ({r['cpu_s'] * 1e6:,.0f} CPU-us/req)"
                    for label, r in zip(labels, pair, strict=True)
                ),
                file=sys.stderr,
            )
        pairs_metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/metrics", timeout=10).read().decode()
    pairs[0][1]["metrics"] = pairs_metrics
    return pairs


def _median_ratio(pairs: list[tuple[dict, dict]], key: str) -> tuple[float, float, float]:
    ratios = sorted(b[key] / a[key] for a, b in pairs)
    return ratios[len(ratios) // 2], ratios[0], ratios[-1]


def _mean_batch(metrics: str) -> float:
    """Rows per onnxruntime call, from a sidecar's /metrics text."""
    found = dict(re.findall(r"^cohortgate_sidecar_batch_size_(sum|count)(?:\{[^}]*\})? (\S+)$", metrics, re.M))
    return float(found.get("sum", 0)) / max(1.0, float(found.get("count", 1)))


def gate_us(contract_doc: dict, batch: int, n: int = 20_000) -> float:
    """The data contract's own CPU per one-row request on the event loop, in process: what the sidecar's
    gate does per request (count, sample, sketch, check outputs) plus, in enforce mode, one screen per
    batch of ``batch`` requests (the batcher merges each batch anyway, with or without a contract)."""
    from sidecar.batching import merge
    from sidecar.contract import Contract, parse
    from sidecar.protocol import Signature, TensorSpec
    from sidecar.quality import QualityGate

    sig = Signature(MODEL, (TensorSpec("input", "FP32", (-1, MLP_WIDTH)),), (TensorSpec("y", "FP32", (-1, 1)),))
    gate = QualityGate(Contract(parse(contract_doc), sig), model=MODEL, variant="bench")
    gate.screened = gate.contract.enforce
    rng = np.random.default_rng(0)
    rows = [(rng.uniform(-1, 1, (1, MLP_WIDTH)).astype(np.float32),) for _ in range(1024)]
    merged = [merge(rows[i : i + batch]) for i in range(0, 1024 - batch + 1, batch)]
    out = (np.zeros((1, 1), np.float32),)
    k = max(1, batch)
    started = time.process_time()
    for i in range(n):
        token = gate.check_inputs(rows[i % 1024], 1)
        if gate.screened and i % k == 0:
            gate.screen(merged[(i // k) % len(merged)], [1] * k)
        gate.observe_outputs(out, 1, token)
    gate.take()
    return (time.process_time() - started) / n * 1e6


def contract_cost(model: Path, tmp: Path, threads: int, max_batch: int, seconds: float, repeat: int, mode: str) -> int:
    """Throughput with a contract over all MLP_WIDTH input columns vs none, one-row binary at c64."""
    features = [{"name": f"x{j}", "tensor": "input", "column": j, "min": -10, "max": 10} for j in range(MLP_WIDTH)]
    contract = tmp / "contract.json"
    contract.write_text(json.dumps({"mode": mode, "inputs": features}))
    load_before = os.getloadavg()[0]
    pairs = ab_pairs(
        model, tmp, threads, max_batch, seconds, repeat,
        extra=((), ("--contract", str(contract))), concurrency=64, labels=("without", "with"),
    )  # fmt: skip
    if any(b["errors"] for _, b in pairs):
        print("the contract refused requests: the body should be clean", file=sys.stderr)
        return 1
    median, low, high = _median_ratio(pairs, "rps")
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"data contract over {MLP_WIDTH} input columns, {mode}, one-row binary requests at c64, {repeat} pairs:")
    print(f"  throughput with/without: median {median:.3f} (min {low:.3f}, max {high:.3f})")
    print(f"  cost: {1 - median:.1%} of the sidecar's throughput (the issue's bar: at most 5 %)")
    median, low, high = _median_ratio(pairs, "cpu_s")
    print(
        f"  sidecar CPU per request with/without: median {median:.3f} (min {low:.3f}, max {high:.3f})"
        " -- steadier than throughput when other processes share the cores"
    )
    assert "cohortgate_sidecar_contract_rejected_total" in pairs[0][1]["metrics"]
    batch = max(1, int(_mean_batch(pairs[0][1]["metrics"])))
    own = gate_us({"mode": mode, "inputs": features}, batch)
    without = sorted(a["cpu_s"] for a, _ in pairs)[len(pairs) // 2] * 1e6
    print(
        f"  the gate's own CPU per request, in process at the measured batch size ({batch} rows): {own:.1f} us,"
        f" {own / without:.1%} of a request's {without:,.0f} us without a contract"
    )
    return 0


def lone_cost(model: Path, tmp: Path, threads: int, max_batch: int, seconds: float, repeat: int) -> int:
    """One-row requests, the opt-in lone-request path (--inline-max-us 1000) against the default (off),
    at c1, where it saves the executor hop, and at c64, where it keeps batches from forming."""
    load_before = os.getloadavg()[0]
    for concurrency in (1, 64):
        pairs = ab_pairs(
            model, tmp, threads, max_batch, seconds, repeat,
            extra=((), ("--inline-max-us", "1000")), concurrency=concurrency, labels=("executor", "on the loop"),
        )  # fmt: skip
        print(f"one-row binary requests at c{concurrency}, lone requests on the loop vs the default, {repeat} pairs:")
        for key, what in (("cpu_s", "sidecar CPU per request"), ("p50_ms", "p50 latency"), ("rps", "throughput")):
            median, low, high = _median_ratio(pairs, key)
            print(f"  {what} on the loop / executor: median {median:.3f} (min {low:.3f}, max {high:.3f})")
        cpu = sorted(b["cpu_s"] for _, b in pairs)
        print(f"  CPU per request on the loop: median {cpu[len(cpu) // 2] * 1e6:,.0f} us")
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    return 0


SHM_KINDS = ("json", "binary", "shm-in", "shm-in-out")
_ORT_ITEMSIZE = {"tensor(float)": 4, "tensor(double)": 8, "tensor(int64)": 8, "tensor(int32)": 4, "tensor(bool)": 1}


def _signature(model: Path) -> tuple[int, list[tuple[str, int]]]:
    """The width of the model's one FP32 [-1, W] input 'input', and (name, bytes per row) of each output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (first,) = session.get_inputs()
    width = int(first.shape[1])
    outputs = [
        (o.name, int(np.prod([d for d in o.shape[1:]], dtype=np.int64)) * _ORT_ITEMSIZE[o.type])
        for o in session.get_outputs()
    ]
    return width, outputs


def _shm_bodies(
    port: int, name: str, rows: int, width: int, outputs: list[tuple[str, int]]
) -> tuple[dict[str, tuple[bytes, int | None]], Path]:
    """The four bodies for ``rows`` rows, and the /dev/shm object (registered as region ``name``) they use."""
    x = np.random.default_rng(rows).standard_normal((rows, width)).astype(np.float32)
    tensor: dict = {"name": "input", "shape": [rows, width], "datatype": "FP32"}
    out_bytes = sum(rows * per_row for _, per_row in outputs)
    path = Path("/dev/shm") / f"cgbench_{os.getpid()}_{name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, x.nbytes + out_bytes)
        os.pwrite(fd, x.tobytes(), 0)
    finally:
        os.close(fd)
    register = json.dumps({"key": "/" + path.name, "offset": 0, "byte_size": x.nbytes + out_bytes}).encode()
    urllib.request.urlopen(
        urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/systemsharedmemory/region/{name}/register", data=register, method="POST"
        ),
        timeout=10,
    )
    by_ref = {"shared_memory_region": name, "shared_memory_byte_size": x.nbytes}
    shm_in = {"inputs": [{**tensor, "parameters": by_ref}], "parameters": {"binary_data_output": True}}
    placed, offset = [], x.nbytes
    for out_name, per_row in outputs:
        size = rows * per_row
        params = {"shared_memory_region": name, "shared_memory_byte_size": size, "shared_memory_offset": offset}
        placed.append({"name": out_name, "parameters": params})
        offset += size
    shm_out = {"inputs": [{**tensor, "parameters": by_ref}], "outputs": placed}
    json_body = {"inputs": [{**tensor, "data": x.ravel().tolist()}]}
    head = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    bodies = {
        "json": (json.dumps(json_body).encode(), None),
        "binary": (head + x.tobytes(), len(head)),
        "shm-in": (json.dumps(shm_in).encode(), None),
        "shm-in-out": (json.dumps(shm_out).encode(), None),
    }
    return bodies, path


def shm_cost(models: list[Path], tmp: Path, threads: int, max_batch: int, seconds: float, repeat: int) -> int:
    """JSON vs binary vs shared-memory inputs (and outputs), 1 and 128 rows, c1 and c16, interleaved runs."""
    load_before = os.getloadavg()[0]
    for model in models:
        width, outputs = _signature(model)
        port = free_port()
        made: list[Path] = []
        with sidecar(model, port, threads, max_batch, ("--shared-memory",)) as proc:
            url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
            try:
                for rows in (1, 128):
                    bodies, path = _shm_bodies(port, f"r{rows}", rows, width, outputs)
                    made.append(path)
                    files = {}
                    for kind, (body, _) in bodies.items():
                        files[kind] = tmp / f"shm-{model.stem}-{rows}-{kind}.bin"
                        files[kind].write_bytes(body)
                    for concurrency in (1, 16):
                        for kind in SHM_KINDS:
                            wrk(url, files[kind], bodies[kind][1], concurrency, 1)  # warm up
                        rounds = []
                        for _ in range(repeat):
                            got = {}
                            for kind in SHM_KINDS:
                                cpu, n, before = cpu_seconds(proc.pid), served(port), scrape_batches(port)
                                got[kind] = wrk(url, files[kind], bodies[kind][1], concurrency, seconds)
                                got[kind]["cpu_s"] = (cpu_seconds(proc.pid) - cpu) / max(1.0, served(port) - n)
                                after = scrape_batches(port)
                                if before and after and after[1] > before[1]:
                                    got[kind]["batch"] = (after[0] - before[0]) / (after[1] - before[1])
                            rounds.append(got)
                        _print_shm(model.stem, width, rows, concurrency, rounds)
            finally:
                for path in made:
                    path.unlink(missing_ok=True)
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    return 0


def _print_shm(model: str, width: int, rows: int, concurrency: int, rounds: list[dict[str, dict]]) -> None:
    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    errors = sum(r[k]["errors"] for r in rounds for k in SHM_KINDS)
    print(
        f"{model} ({width} FP32/row), {rows} row(s)/request, c{concurrency}, {len(rounds)} rounds"
        + (f"  ({errors} non-2xx!)" if errors else "")
    )
    for kind in SHM_KINDS:
        rps = median([r[kind]["rps"] for r in rounds])
        cpu = median([r[kind]["cpu_s"] for r in rounds]) * 1e6
        batch = median([r[kind].get("batch", float("nan")) for r in rounds])
        vs = []
        for base in ("binary", "json"):
            if base != kind:
                t = median([r[kind]["rps"] / r[base]["rps"] for r in rounds])
                c = median([r[kind]["cpu_s"] / r[base]["cpu_s"] for r in rounds])
                vs.append(f"vs {base}: throughput x{t:.2f}, CPU x{c:.2f}")
        print(f"  {kind:<10} {rps:>8,.0f} req/s  {cpu:>7,.0f} CPU-us/req  batch {batch:5.1f}   " + "; ".join(vs))


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and every process below it (the fronts and the executor of --workers)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            total += cpu_seconds(current)
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            pending += [int(c) for c in children]
    return total


def workers_cost(
    model: Path, tmp: Path, threads: int, max_batch: int, seconds: float, repeat: int, workers: int = 2
) -> int:
    """``--workers 1`` against ``--workers N``, one-row and 128-row binary requests at c1 and c64:
    throughput and CPU per request of the whole process tree (from /proc; the request count is
    wrk's, since /metrics on a shared port is one front's), in interleaved pairs, as ratios N/1."""
    load_before = os.getloadavg()[0]
    ports = (free_port(), free_port())
    extra: tuple[tuple[str, ...], tuple[str, ...]] = ((), ("--workers", str(workers)))
    with (
        sidecar(model, ports[0], threads, max_batch, extra[0]) as one,
        sidecar(model, ports[1], threads, max_batch, extra[1]) as many,
    ):
        procs = dict(zip(ports, (one, many), strict=True))
        time.sleep(3.0)  # --workers: every front connected to the executor, not only the first one
        for rows in (1, 128):
            body, header_length = request_body(rows, True)
            body_file = tmp / f"workers-{rows}.bin"
            body_file.write_bytes(body)
            for concurrency in (1, 64):
                urls = {p: f"http://127.0.0.1:{p}/v2/models/{MODEL}/infer" for p in ports}
                for p in ports:
                    wrk(urls[p], body_file, header_length, concurrency, 1)  # warm up
                pairs = []
                for _ in range(repeat):
                    pair = []
                    for p in ports:
                        cpu = tree_cpu_seconds(procs[p].pid)
                        run = wrk(urls[p], body_file, header_length, concurrency, seconds)
                        run["cpu_s"] = (tree_cpu_seconds(procs[p].pid) - cpu) / max(1.0, run["rps"] * seconds)
                        pair.append(run)
                    pairs.append((pair[0], pair[1]))
                errors = sum(a["errors"] + b["errors"] for a, b in pairs)
                print(
                    f"{rows} row(s)/request, c{concurrency}, {repeat} pairs"
                    + (f"  ({errors} non-2xx!)" if errors else "")
                )
                for label, r in (("1 process", [a for a, _ in pairs]), (f"{workers} workers", [b for _, b in pairs])):
                    rps = sorted(x["rps"] for x in r)[len(r) // 2]
                    cpu = sorted(x["cpu_s"] for x in r)[len(r) // 2] * 1e6
                    p50 = sorted(x["p50_ms"] for x in r)[len(r) // 2]
                    print(
                        f"  {label:<12} {rps:>9,.0f} req/s {rps * rows:>10,.0f} rows/s  p50 {p50:6.2f} ms "
                        f"{cpu:>6,.0f} CPU-us/req"
                    )
                for key, what in (("rps", "throughput"), ("cpu_s", "CPU per request"), ("p50_ms", "p50")):
                    median, low, high = _median_ratio(pairs, key)
                    print(
                        f"  {what} {workers} workers / 1 process: median {median:.2f} (min {low:.2f}, max {high:.2f})"
                    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} cores; load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="ONNX model, input 'input' FP32 [-1,512] (default: mlp-4x512)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--repeat", type=int, default=1, help="wrk runs per case; the median is kept (default 1)")
    parser.add_argument("--concurrency", default="1,16,64", help="for one-row requests (default 1,16,64)")
    parser.add_argument("--threads", type=int, default=default_intra_op_threads(), help="intra-op threads")
    parser.add_argument("--max-batch-size", type=int, default=64, help="the sidecar's, batching on (default 64)")
    parser.add_argument("--mlserver-python", help="a Python with MLServer installed, to run it as a peer")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--contract-cost", action="store_true", help="only measure a data contract's cost (with vs without, c64)"
    )
    parser.add_argument(
        "--contract-mode", choices=("observe", "enforce"), default="enforce", help="for --contract-cost"
    )
    parser.add_argument(
        "--lone-cost", action="store_true", help="only measure the lone-request path (on vs off, one-row, c1)"
    )
    parser.add_argument(
        "--shm-cost",
        action="store_true",
        help="only measure shared-memory inputs/outputs against JSON and binary bodies (1 and 128 rows, c1, c16)",
    )
    parser.add_argument("--shm-models", type=Path, nargs="*", default=[], help="for --shm-cost: more ONNX models")
    parser.add_argument(
        "--workers-cost",
        type=int,
        metavar="N",
        help="only measure --workers N against one process (1 and 128 rows, c1 and c64, pairs)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not on PATH; this benchmark uses it as its load generator", file=sys.stderr)
        return 2
    if args.shm_cost:
        with tempfile.TemporaryDirectory(prefix="bench-shm-") as tmpdir:
            tmp = Path(tmpdir)
            model = args.model or tmp / "mlp-4x512.onnx"
            if args.model is None:
                model.write_bytes(mlp_model_bytes())
            models = [model.resolve(), *(m.resolve() for m in args.shm_models)]
            return shm_cost(models, tmp, args.threads, args.max_batch_size, args.duration, max(args.repeat, 3))
    if args.workers_cost:
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmpdir:
            tmp = Path(tmpdir)
            model = args.model or tmp / "mlp-4x512.onnx"
            if args.model is None:
                model.write_bytes(mlp_model_bytes())
            common = (model.resolve(), tmp, args.threads, args.max_batch_size, args.duration, max(args.repeat, 3))
            return workers_cost(*common, workers=args.workers_cost)
    if args.lone_cost or args.contract_cost:
        with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmpdir:
            tmp = Path(tmpdir)
            model = args.model or tmp / "mlp-4x512.onnx"
            if args.model is None:
                model.write_bytes(mlp_model_bytes())
            common = (model.resolve(), tmp, args.threads, args.max_batch_size, args.duration, max(args.repeat, 3))
            if args.lone_cost:
                return lone_cost(*common)
            return contract_cost(*common, args.contract_mode)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    binary_cases = [(1, True, c) for c in concurrencies] + [(128, True, 4)]
    json_case = [(1, False, 64)]
    all_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-sidecar-") as tmpdir:
        tmp = Path(tmpdir)
        model = args.model
        if model is None:
            model = tmp / "mlp-4x512.onnx"
            model.write_bytes(mlp_model_bytes())
        model = model.resolve()
        load_before = os.getloadavg()[0]
        print(f"{all_cores} cores; the sidecar uses {args.threads} intra-op thread(s)", file=sys.stderr)
        same = BareOrt(model, args.threads)
        bare = same.table(min(2.0, args.duration / 2))
        bare_all = BareOrt(model, all_cores).table(min(2.0, args.duration / 2)) if all_cores != args.threads else bare
        for label, max_batch, cases in (
            ("sidecar, batching on", args.max_batch_size, binary_cases + json_case),
            ("sidecar, batching off", 1, binary_cases),
        ):
            port = free_port()
            with sidecar(model, port, args.threads, max_batch):
                results += measure(label, port, tmp, cases, args.duration, args.repeat, same)
        peer_note = "MLServer: not run (pass --mlserver-python PATH to a Python that has mlserver)"
        if args.mlserver_python:
            port = free_port()
            try:
                with mlserver(args.mlserver_python, model, tmp, port, args.threads):
                    results += measure(
                        "MLServer (custom ORT runtime)", port, tmp, json_case, args.duration, args.repeat
                    )
                peer_note = ""
            except (RuntimeError, OSError) as exc:
                peer_note = f"MLServer: failed to start ({exc})"

    load_after = os.getloadavg()[0]
    best_batch = max(bare, key=bare.get)
    best = bare[best_batch]
    print(f"\nload average (1 min) before {load_before:.2f}, after {load_after:.2f} (others sharing the cores?)")
    for name, table in ((f"{args.threads} thread(s), as the sidecar", bare), (f"{all_cores} threads", bare_all)):
        b = max(table, key=table.get)
        rates = ", ".join(f"b{k} {v:,.0f}" for k, v in table.items())
        print(f"bare onnxruntime, {name}: {rates} inferences/s -> best {table[b]:,.0f} at batch {b}")
    print()
    header = (
        f"{'target':<30} {'body':<6} {'conc':>4} {'rows/req':>8} {'req/s':>9} {'rows/s':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'batch':>6} {'vs bare':>7} {'vs bare alongside':>17}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        batch = f"{r.mean_batch:.1f}" if r.mean_batch else "-"
        alongside = f"{r.rows_per_s / r.bare_alongside:.0%} of {r.bare_alongside:,.0f}" if r.bare_alongside else "-"
        print(
            f"{r.target:<30} {r.body:<6} {r.concurrency:>4} {r.rows_per_request:>8} {r.rps:>9,.0f} "
            f"{r.rows_per_s:>9,.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {batch:>6} {r.rows_per_s / best:>7.0%} "
            f"{alongside:>17}" + (f"  ({r.errors} non-2xx)" if r.errors else "")
        )
    peers = [r for r in results if r.target.startswith("MLServer")]
    ours = next((r for r in results if r.target == "sidecar, batching on" and r.body == "json"), None)
    if peers and ours:
        print(f"\nsidecar vs MLServer, one-row JSON at c64: {ours.rps / max(p.rps for p in peers):.1f}x")
    if peer_note:
        print(f"\n{peer_note}")
    if args.json:
        payload = {
            "bare": bare,
            "bare_all_cores": bare_all,
            "results": [asdict(r) for r in results],
            "loadavg": [load_before, load_after],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
