"""GPU check for the sidecar: is CUDA really in use, and do its answers match the CPU's?

    python bench/sidecar_gpu_check.py [--model PATH] [--device auto|cuda]

Run it where onnxruntime-gpu is installed (``pip install cohortgate[gpu]``). It prints what
onnxruntime offers, which provider a session actually got (onnxruntime-gpu silently falls back to
CPU when the CUDA/cuDNN libraries it was built for are missing), compares a batch against the CPU
provider, times bare ``session.run`` at a few batch sizes, and serves the model through a real
sidecar on 127.0.0.1 to check that metadata and ``/metrics`` report the same provider.

Exit status: 0 CUDA in use and answers match; 1 no CUDA (fell back); 2 answers differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.demo_models import mlp_model_bytes  # noqa: E402
from sidecar.model import CUDA, ModelLoadError, OnnxModel  # noqa: E402
from sidecar.server import SidecarConfig, serve  # noqa: E402


def rate(model: OnnxModel, rows: int, seconds: float = 1.0) -> float:
    x = model.example_inputs(rows)
    for _ in range(5):
        model.run(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.run(x)
        n += 1
    return n * rows / (time.perf_counter() - start)


def through_sidecar(model_path: Path, device: str, x: np.ndarray) -> tuple[dict, str, np.ndarray]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = SidecarConfig(str(model_path), name="check", port=port, device=device)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(serve(config, stop=stop, handle_signals=False)), daemon=True
    )
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1)
                break
            except OSError:
                if not thread.is_alive():
                    raise RuntimeError("the sidecar exited before it was ready") from None
                time.sleep(0.1)
        meta = json.load(urllib.request.urlopen(f"{base}/v2/models/check"))
        metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
        provider_line = next(
            (ln for ln in metrics.splitlines() if ln.startswith("cohortgate_sidecar_execution_provider{")), ""
        )
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        request = urllib.request.Request(
            f"{base}/v2/models/check/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.load(urllib.request.urlopen(request))
        out = answer["outputs"][0]
        return meta, provider_line, np.array(out["data"], np.float32).reshape(out["shape"])
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="default: a freshly built mlp-4x512")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda"))
    args = parser.parse_args()
    import onnxruntime as ort

    print(
        f"onnxruntime {ort.__version__}, device {ort.get_device()}, providers offered: {ort.get_available_providers()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or Path(tmp) / "mlp-4x512.onnx"
        if args.model is None:
            model_path.write_bytes(mlp_model_bytes())
        try:
            model = OnnxModel(model_path, device=args.device)
        except ModelLoadError as exc:
            print(f"cannot load on {args.device}: {exc}")
            return 1
        cpu = OnnxModel(model_path, device="cpu")
        print(f"session providers: {model.providers} -> in use: {model.provider}")
        x = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)
        diff = float(np.abs(model.run((x,))[0] - cpu.run((x,))[0]).max())
        print(f"max |{model.provider} - CPU| over a 64-row batch: {diff:.2e}")
        for rows in (1, 32, 256, 1024):
            fast, slow = rate(model, rows), rate(cpu, rows)
            print(f"bare session.run, batch {rows:>4}: {model.provider} {fast:>12,.0f}/s   CPU {slow:>10,.0f}/s")
        meta, provider_line, served = through_sidecar(model_path, args.device, x[:4])
        print(f"sidecar metadata: execution_provider={meta['parameters']['execution_provider']}")
        print(f"sidecar metric:   {provider_line}")
        served_diff = float(np.abs(served - cpu.run((x[:4],))[0]).max())
        print(f"max |sidecar - CPU| over 4 rows: {served_diff:.2e}")
    if model.provider != CUDA or meta["parameters"]["execution_provider"] != CUDA:
        print("CUDA is NOT in use (onnxruntime fell back to CPU)")
        return 1
    if diff > 1e-2 or served_diff > 1e-2:
        print("answers differ from the CPU provider")
        return 2
    print("OK: CUDA in use, answers match the CPU provider")
    return 0


if __name__ == "__main__":
    sys.exit(main())
