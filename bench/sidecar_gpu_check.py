"""GPU check for the sidecar: is CUDA really in use, do its answers match the CPU's, and how fast is it?

    python bench/sidecar_gpu_check.py [--device cuda|auto|cpu] [--model PATH] [--duration 4] [--json PATH]

Self-contained: it needs this repository on the path and the sidecar's runtime dependencies
(onnxruntime-gpu, aiohttp, orjson, numpy, prometheus-client; uvloop if present) -- not scikit-learn,
not the ``onnx`` package, not wrk. In under three minutes it:

  1. builds the 4x512 MLP (numpy only) unless ``--model`` names one;
  2. loads it on ``--device`` (default cuda) and reads back the provider onnxruntime actually uses
     (onnxruntime-gpu silently falls back to CPU when the CUDA/cuDNN libraries are missing);
     compares a 64-row batch against the CPU provider; times bare ``session.run`` at batch 1 and 1024;
  3. starts real sidecar processes (``python -m sidecar``) with ``--device DEVICE`` and with
     ``--device auto``, and checks that metadata and the ``execution_provider`` metric name the
     expected provider (CUDAExecutionProvider unless ``--device cpu``);
  4. loads the sidecar, batching on and off, with one-row binary-tensor requests at concurrency 1
     and 64 from a small built-in HTTP/1.1 load generator (several processes, keep-alive);
  5. prints a table and writes everything as JSON to ``--json``, or to ``$OUT/sidecar_gpu_check.json``
     when ``$OUT`` is set;
  6. with ``--workers 1,2,4,8``: ``sidecar --workers N`` (N fronts, one executor on the device; 1 is
     one process) at c256 (``--workers-concurrency``), one-row and 128-row requests, batches up to
     ``--workers-max-batch`` rows, each against bare ``session.run`` on the device at that run's mean
     batch size. ``--workers-only`` skips steps 3 and 4. A GPU session runs
     ``python bench/sidecar_gpu_check.py --workers 1,2,4,8 --workers-only`` (about 3 minutes).

Exit status: 0 all checks pass; 1 the expected provider is not in use; 2 answers differ from the CPU's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.demo_models import MLP_WIDTH, mlp_model_bytes  # noqa: E402
from sidecar.model import CPU, CUDA, ModelLoadError, OnnxModel  # noqa: E402

MODEL = "mlp"
TOLERANCE = 1e-2  # relative; CUDA may use TF32 for the matrix products


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Bare onnxruntime ---------------------------------------------------------------------------------


def bare_rate(model: OnnxModel, rows: int, seconds: float) -> dict:
    x = (np.random.default_rng(rows).standard_normal((rows, MLP_WIDTH)).astype(np.float32),)
    for _ in range(10):
        model.run(x)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        model.run(x)
        n += 1
    return {"batch": rows, "calls_per_s": n / elapsed, "inferences_per_s": n * rows / elapsed}


def relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1e-12, float(np.abs(b).max())))


# A real sidecar process -----------------------------------------------------------------------------


class Sidecar:
    """``python -m sidecar`` on a free port; ``stop`` sends SIGTERM and waits for the drain."""

    def __init__(self, model: Path, device: str, max_batch_size: int, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sidecar", "--model", str(model), "--name", MODEL, "--port", str(self.port)]
        cmd += ["--device", device, "--max-batch-size", str(max_batch_size), "--log-level", "WARNING", *extra]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the process
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sidecar --device {device} did not become ready:\n{self.output()}")
            time.sleep(0.1)
        if "--workers" in extra:  # every front listens and is ready (each logs it at INFO), then
            fronts = int(extra[extra.index("--workers") + 1])  # fresh connections in a row find one ready
            while fronts > 1 and self.log_text().count(" ready on http://") < fronts:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"sidecar {extra} fronts did not all start:\n{self.output()}")
                time.sleep(0.1)
            in_a_row = 0
            while in_a_row < 30 and time.monotonic() < deadline:
                try:
                    ok = urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=1).status == 200
                except OSError:
                    ok = False
                in_a_row = in_a_row + 1 if ok else 0
                if not ok:
                    time.sleep(0.1)

    def get(self, path: str) -> bytes:
        return urllib.request.urlopen(f"{self.url}{path}", timeout=10).read()

    def provider(self) -> tuple[str, str]:
        """(execution_provider from the model metadata, provider label of the metric)."""
        meta = json.loads(self.get(f"/v2/models/{MODEL}"))
        metrics = self.get("/metrics").decode()
        m = re.search(r'cohortgate_sidecar_execution_provider\{[^}]*provider="([^"]+)"[^}]*\} 1', metrics)
        return meta["parameters"]["execution_provider"], m.group(1) if m else ""

    def batches(self) -> tuple[float, float]:
        metrics = self.get("/metrics").decode()
        total = re.search(r"cohortgate_sidecar_batch_size_sum\{[^}]*\} (\S+)", metrics)
        count = re.search(r"cohortgate_sidecar_batch_size_count\{[^}]*\} (\S+)", metrics)
        return float(total.group(1)), float(count.group(1))

    def infer(self, x: np.ndarray) -> np.ndarray:
        body, header_length = request_body(x)
        request = urllib.request.Request(
            f"{self.url}/v2/models/{MODEL}/infer",
            data=body,
            headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            head_len = int(response.headers["Inference-Header-Content-Length"])
        head = json.loads(raw[:head_len])
        out = head["outputs"][0]
        return np.frombuffer(raw, np.float32, offset=head_len).reshape(out["shape"])

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def request_body(x: np.ndarray) -> tuple[bytes, int]:
    """An OIP binary-tensor request: JSON header, then the raw FP32 rows; binary output asked for."""
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
    head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return head + np.ascontiguousarray(x, np.float32).tobytes(), len(head)


# Load generator: keep-alive HTTP/1.1 over asyncio streams, in several processes ----------------------


async def _connection(port: int, request: bytes, start: float, stop: float, latencies: list, errors: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    clock = time.perf_counter
    try:
        while True:
            sent = clock()
            if sent >= stop:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))
            await reader.readexactly(length)
            done = clock()
            if sent >= start and done <= stop:
                if head[9:12] == b"200":
                    latencies.append(done - sent)
                else:
                    errors.append(int(head[9:12]))
    finally:
        writer.close()


def _client_process(port: int, request: bytes, connections: int, start_at: float, seconds: float) -> tuple:
    """Runs in a worker process: ``connections`` loops from ``start_at`` (wall clock) for ``seconds``."""

    async def main() -> tuple:
        latencies: list[float] = []
        errors: list[int] = []
        # perf_counter is per-process; translate the shared wall-clock start into it.
        start = time.perf_counter() + (start_at - time.time())
        stop = start + seconds
        await asyncio.gather(*(_connection(port, request, start, stop, latencies, errors) for _ in range(connections)))
        return latencies, errors

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


def load(port: int, concurrency: int, seconds: float, procs: int, rows: int = 1) -> dict:
    """Requests/s and latency of ``rows``-row binary requests at ``concurrency`` open connections."""
    x = np.random.default_rng(7).standard_normal((rows, MLP_WIDTH)).astype(np.float32)
    body, header_length = request_body(x)
    request = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {header_length}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    procs = max(1, min(procs, concurrency))
    split = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    # spawn, not fork: this process has onnxruntime's (and CUDA's) threads, and a forked child can
    # inherit a lock one of them held.
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        pool.map(abs, range(procs))  # every worker is up
        start_at = time.time() + 0.5 + 0.5  # connect, then half a second of warm-up
        parts = pool.starmap(_client_process, [(port, request, n, start_at, seconds) for n in split])
    latencies = np.array(sorted(lat for part in parts for lat in part[0]))
    errors = sum(len(part[1]) for part in parts)
    if not len(latencies):
        return {"concurrency": concurrency, "rows": rows, "rps": 0.0, "p50_ms": None, "p99_ms": None, "errors": errors}
    return {
        "concurrency": concurrency,
        "rows": rows,
        "rps": len(latencies) / seconds,
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "errors": errors,
    }


# The check ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "auto", "cpu"), help="default cuda")
    parser.add_argument("--model", type=Path, help="input 'input' FP32 [-1,512] (default: a fresh mlp-4x512)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per load run (default 4)")
    parser.add_argument("--concurrency", default="1,64", help="open connections per load run (default 1,64)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="the sidecar's, batching on (default 64)")
    parser.add_argument("--client-procs", type=int, default=max(1, min(4, cores() // 4)), help="load processes")
    parser.add_argument("--json", type=Path, help="write the results here (default: $OUT/sidecar_gpu_check.json)")
    parser.add_argument(
        "--workers", default="", help="also run `sidecar --workers N` for each N in this list, e.g. 1,2,4,8 (step 6)"
    )
    parser.add_argument("--workers-concurrency", type=int, default=256, help="for --workers (default 256)")
    parser.add_argument("--workers-max-batch", type=int, default=1024, help="for --workers: rows (default 1024)")
    parser.add_argument("--workers-only", action="store_true", help="skip steps 3 and 4 (device time is scarce)")
    args = parser.parse_args()
    started = time.monotonic()
    import onnxruntime as ort

    available = ort.get_available_providers()
    expected = CPU if args.device == "cpu" else CUDA
    expected_auto = CUDA if CUDA in available else CPU
    report: dict = {
        "onnxruntime": ort.__version__,
        "device_arg": args.device,
        "providers_offered": available,
        "cores": cores(),
        "checks": {},
    }
    print(f"onnxruntime {ort.__version__} ({ort.get_device()}), {cores()} cores, providers offered: {available}")
    status = 0
    with tempfile.TemporaryDirectory(prefix="sidecar-gpu-check-") as tmp:
        model_path = args.model
        if model_path is None:
            model_path = Path(tmp) / "mlp-4x512.onnx"
            model_path.write_bytes(mlp_model_bytes())
        model_path = model_path.resolve()

        # 2. bare onnxruntime on the device, against the CPU provider
        try:
            model = OnnxModel(model_path, device=args.device)
        except ModelLoadError as exc:
            print(f"FAIL: cannot load on --device {args.device}: {exc}")
            report["error"] = str(exc)
            write_report(args, report)
            return 1
        cpu = OnnxModel(model_path, device="cpu")
        print(f"session providers {list(model.providers)} -> in use: {model.provider}")
        x64 = np.random.default_rng(0).standard_normal((64, MLP_WIDTH)).astype(np.float32)
        reference = cpu.run((x64,))[0]
        bare_diff = relative_diff(model.run((x64,))[0], reference)
        in_use = report["session_provider"] = model.provider
        report["bare"] = [bare_rate(model, rows, 2.0) for rows in (1, 1024)]
        del model, cpu  # free the device before the sidecars take it
        check(report, "session provider", in_use == expected, f"{in_use} (want {expected})")
        check(report, "bare answers match CPU", bare_diff < TOLERANCE, f"relative max diff {bare_diff:.1e}")

        # 3. + 4. sidecars: provider checks, answers, load
        report["sidecar"] = []
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        basic = () if args.workers_only else (("batching on", args.max_batch_size), ("batching off", 1))
        for label, max_batch in basic:
            server = Sidecar(model_path, args.device, max_batch)
            try:
                meta_provider, metric_provider = server.provider()
                check(report, f"sidecar {label}: metadata provider", meta_provider == expected, meta_provider)
                check(report, f"sidecar {label}: metric provider", metric_provider == expected, metric_provider)
                served = server.infer(x64[:4])
                served_diff = relative_diff(served, reference[:4])
                check(report, f"sidecar {label}: answers match CPU", served_diff < TOLERANCE, f"{served_diff:.1e}")
                for concurrency in concurrencies:
                    before = server.batches()
                    run = load(server.port, concurrency, args.duration, args.client_procs)
                    after = server.batches()
                    run["mean_batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                    run["target"] = f"sidecar {args.device}, {label}"
                    report["sidecar"].append(run)
                    print(f"  {run['target']:<28} c{concurrency:<3} {run['rps']:>10,.0f} req/s", flush=True)
            finally:
                server.stop()
        if args.workers:
            workers_runs(args, report, model_path, reference[:4], x64[:4])
        if args.device != "auto" and not args.workers_only:
            server = Sidecar(model_path, "auto", args.max_batch_size)
            try:
                meta_provider, metric_provider = server.provider()
            finally:
                server.stop()
            ok = meta_provider == metric_provider == expected_auto
            check(report, "sidecar --device auto: provider", ok, f"{meta_provider} (want {expected_auto})")

    report["seconds"] = round(time.monotonic() - started, 1)
    print()
    print(f"{'bare onnxruntime':<34} {'batch':>6} {'calls/s':>10} {'inferences/s':>13}")
    provider = report["session_provider"]
    for b in report["bare"]:
        print(f"  {provider:<32} {b['batch']:>6} {b['calls_per_s']:>10,.0f} {b['inferences_per_s']:>13,.0f}")
    print()
    print(f"{'sidecar, one-row binary requests':<34} {'conc':>6} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} batch")
    for r in report["sidecar"]:
        p50 = f"{r['p50_ms']:.2f}" if r["p50_ms"] is not None else "-"
        p99 = f"{r['p99_ms']:.2f}" if r["p99_ms"] is not None else "-"
        errors = f"  ({r['errors']} errors)" if r["errors"] else ""
        print(
            f"  {r['target']:<32} {r['concurrency']:>6} {r['rps']:>10,.0f} {p50:>8} {p99:>8} "
            f"{r['mean_batch']:>6.1f}{errors}"
        )
    print_workers(report)
    print()
    for name, (ok, detail) in report["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    failed = [name for name, (ok, _) in report["checks"].items() if not ok]
    if any("provider" in name for name in failed):
        status = 1
    elif failed:
        status = 2
    report["status"] = status
    print(f"\n{'OK' if status == 0 else 'FAILED'} in {report['seconds']}s")
    write_report(args, report)
    return status


def workers_runs(
    args: argparse.Namespace, report: dict, model_path: Path, reference: np.ndarray, x: np.ndarray
) -> None:
    """6. ``sidecar --workers N`` (1 = one process) at ``--workers-concurrency``, one-row and 128-row
    requests, against bare onnxruntime on the device at each run's mean batch size."""
    report["workers"] = []
    for n in [int(w) for w in args.workers.split(",")]:
        server = Sidecar(model_path, args.device, args.workers_max_batch, ("--workers", str(n), "--log-level", "INFO"))
        try:
            diff = relative_diff(server.infer(x), reference)
            check(report, f"sidecar --workers {n}: answers match CPU", diff < TOLERANCE, f"{diff:.1e}")
            for rows in (1, 128):
                before = server.batches()  # the executor's histograms, from whichever front answers
                run = load(server.port, args.workers_concurrency, args.duration, args.client_procs, rows)
                after = server.batches()
                run["mean_batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                run["workers"] = n
                report["workers"].append(run)
                print(
                    f"  sidecar --workers {n:<2} {rows:>3} rows c{args.workers_concurrency}: {run['rps']:>9,.0f} req/s "
                    f"{run['rps'] * rows:>11,.0f} rows/s, mean batch {run['mean_batch']:.0f}",
                    flush=True,
                )
        finally:
            server.stop()
    model = OnnxModel(model_path, device=args.device)  # bare, at each run's mean batch
    bare: dict[int, float] = {}
    for run in report["workers"]:
        batch = max(1, round(run["mean_batch"]))
        if batch not in bare:
            bare[batch] = bare_rate(model, batch, 1.0)["inferences_per_s"]
        run["bare_same_batch"] = bare[batch]
    del model


def print_workers(report: dict) -> None:
    runs = report.get("workers")
    if not runs:
        return
    print()
    print(
        f"{'sidecar --workers N':<22} {'rows':>4} {'req/s':>9} {'rows/s':>11} {'p50 ms':>7} {'batch':>6} "
        "vs bare at that batch"
    )
    for r in runs:
        p50 = f"{r['p50_ms']:.2f}" if r["p50_ms"] is not None else "-"
        errors = f"  ({r['errors']} errors)" if r["errors"] else ""
        rows_s = r["rps"] * r["rows"]
        print(
            f"  --workers {r['workers']:<10} {r['rows']:>4} {r['rps']:>9,.0f} {rows_s:>11,.0f} {p50:>7} "
            f"{r['mean_batch']:>6.0f} {rows_s / r['bare_same_batch']:>6.0%} of {r['bare_same_batch']:,.0f}{errors}"
        )


def check(report: dict, name: str, ok: bool, detail: str) -> None:
    report["checks"][name] = (ok, detail)


def write_report(args: argparse.Namespace, report: dict) -> None:
    path = args.json
    if path is None and os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "sidecar_gpu_check.json"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
