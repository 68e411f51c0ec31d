"""Benchmark: what joining online features adds to a request -- one pipelined Redis round trip.

Starts a scratch redis-server on 127.0.0.1, loads the keys the real `feast materialize` wrote
(tests/sidecar/fixtures/feast_redis.json: 2 views, 4 features), and times ``FeastRedisReader.fetch``
for one entity per call (a request) and for 32 entities per call (a batch), sequentially on one
event loop. Prints p50/p99 in microseconds.

    python bench/bench_features.py --calls 5000
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
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
        finally:
            server.terminate()
            server.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
