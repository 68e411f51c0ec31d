"""A tiny ext_proc server process for the graceful-shutdown test: ``serve_fast`` until SIGTERM.

    python -m tests.h2.h2_serve_script SOCKET_PATH DRAIN_TIMEOUT

Prints ``ready`` once listening; on SIGTERM drains, prints the server's counters as one JSON line,
and exits 0 if the drain lost no stream (1 if its timeout cut some off).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sys

import uvloop

from gateway.h2 import serve_fast
from tests.h2.strategies import EchoProcessor


async def main(path: str, drain_timeout: float) -> int:
    server = await serve_fast(EchoProcessor, uds=path)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    cut_off = await server.drain(drain_timeout)
    print(json.dumps({**dataclasses.asdict(server.counters), "cut_off": cut_off}), flush=True)
    return 1 if cut_off else 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main(sys.argv[1], float(sys.argv[2]))))
