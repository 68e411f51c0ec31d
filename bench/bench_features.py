"""Benchmark: what joining online features adds to a request -- one pipelined Redis round trip.

Starts a scratch redis-server on 127.0.0.1, loads the keys the real `feast materialize` wrote
(tests/sidecar/fixtures/feast_redis.json: 2 views, 4 features), and times ``FeastRedisReader.fetch``
for one entity per call (a request) and for 32 entities per call (a batch), sequentially on one
event loop. Prints p50/p99 in microseconds.

Then the join's cost per request through the sidecar itself, side by side: the same Identity model
(7 FP32 columns) served by one sidecar that joins 5 of them from the store (the client sends 2) and
by one that joins nothing (the client sends 7), each called sequentially over HTTP on 127.0.0.1.
Prints both p50/p99 and what the join adds.

    python bench/bench_features.py --calls 5000 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.features import FeastRedisReader, FeatureSpec  # noqa: E402

FIXTURE = json.loads((ROOT / "tests" / "sidecar" / "fixtures" / "feast_redis.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(port: int, calls: int) -> dict[str, float]:
    import numpy as np
    import redis.asyncio as redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for key, fields in FIXTURE["hashes"].items():
        await client.hset(bytes.fromhex(key), mapping={bytes.fromhex(f): bytes.fromhex(v) for f, v in fields.items()})
    spec = FeatureSpec(FIXTURE["project"], FIXTURE["join_key"], tuple(FIXTURE["features"]), 1000.0, 10 * 86400.0)
    reader = FeastRedisReader(spec, client, clock=lambda: FIXTURE["now"])
    out: dict[str, float] = {}
    for size in (1, 32):
        entities = [1001 + i % 3 for i in range(size)]
        for _ in range(200):  # warm-up
            await reader.fetch(entities)
        samples = []
        for _ in range(calls):
            t = time.perf_counter()
            got = await reader.fetch(entities)
            samples.append(time.perf_counter() - t)
            assert got[0].ok
        out[f"p50_us_{size}"] = round(float(np.percentile(samples, 50)) * 1e6, 1)
        out[f"p99_us_{size}"] = round(float(np.percentile(samples, 99)) * 1e6, 1)
        print(f"{size:>3} entities/fetch: p50 {out[f'p50_us_{size}']:8.1f} µs  p99 {out[f'p99_us_{size}']:8.1f} µs")
    await client.aclose()
    return out


def identity_model(path: Path, columns: int) -> str:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", columns])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", columns])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], path.stem, [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


async def measure_sidecar(port: int, requests: int, tmp: Path) -> dict[str, float]:
    """p50/p99 of an infer request with and without the join, through real sidecars (aiohttp, onnxruntime)."""
    import aiohttp
    import numpy as np
    import redis.asyncio as redis
    from aiohttp import web
    from google.protobuf.timestamp_pb2 import Timestamp

    from cohortgate.core.contract import HEADER_ENTITY, HEADER_FEATURES
    from sidecar.join import JoinSettings
    from sidecar.server import SIDECAR, SidecarConfig, build_app

    client = redis.Redis(host="127.0.0.1", port=port)
    fresh = Timestamp()
    fresh.FromSeconds(int(time.time()) - 60)
    for key, fields in FIXTURE["hashes"].items():
        mapping = {bytes.fromhex(f): bytes.fromhex(v) for f, v in fields.items()}
        mapping.update({f: fresh.SerializeToString() for f in mapping if f.startswith(b"_ts:")})
        await client.hset(bytes.fromhex(key), mapping=mapping)
    await client.aclose()
    spec = FeatureSpec(FIXTURE["project"], FIXTURE["join_key"], tuple(FIXTURE["features"]), 1000.0, 3600.0)
    defaults = ((0.0,), (0.0,), (0.0,), (0.0, 0.0))
    joining = JoinSettings(spec, f"redis://127.0.0.1:{port}/0", "int64", defaults=defaults)
    model = identity_model(tmp / "m.onnx", 7)
    out: dict[str, float] = {}
    runners, targets = [], []
    for label, features, columns in (("plain", None, 7), ("joined", joining, 2)):
        config = SidecarConfig(model_path=model, name="m", port=free_port(), intra_op_threads=1, features=features)
        app = build_app(config)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", config.port).start()
        await app[SIDECAR].wait_ready()
        runners.append(runner)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, columns], "data": [1.0] * columns}]}
        targets.append((label, features, f"http://127.0.0.1:{config.port}/v2/models/m/infer", body))
    samples: dict[str, list[float]] = {"plain": [], "joined": []}
    async with aiohttp.ClientSession() as session:
        for i in range(200 + requests):  # interleaved, so both see the same (busy) machine
            for label, features, url, body in targets:
                t = time.perf_counter()
                async with session.post(url, json=body, headers={HEADER_ENTITY: "1001"}) as response:
                    await response.read()
                    assert response.status == 200
                    assert features is None or response.headers[HEADER_FEATURES] == "joined"
                if i >= 200:
                    samples[label].append(time.perf_counter() - t)
    for runner in runners:
        await runner.cleanup()
    for label, got in samples.items():
        p50, p99 = (round(float(np.percentile(got, q)) * 1e6, 1) for q in (50, 99))
        out[f"{label}_p50_us"], out[f"{label}_p99_us"] = p50, p99
        print(f"sidecar infer, {label:>6}: p50 {p50:8.1f} µs  p99 {p99:8.1f} µs")
    for q in ("p50", "p99"):
        added = out[f"joined_{q}_us"] - out[f"plain_{q}_us"]
        print(f"the join adds {added:8.1f} µs at {q} ({out[f'joined_{q}_us'] / out[f'plain_{q}_us']:.2f}x)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=2000, help="infer requests per sidecar (0: skip)")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)
            asyncio.run(measure(port, args.calls))
            if args.requests:
                asyncio.run(measure_sidecar(port, args.requests, Path(tmp)))
        finally:
            server.terminate()
            server.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
