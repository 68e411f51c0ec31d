"""The fast server's counters as Prometheus metrics, scraped from a real registry."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import grpc
import pytest
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.h2 import H2Connection, H2Counters, H2Limits, register_h2_metrics, serve_fast
from gateway.h2.metrics import COUNTER_HELP, FLOOD_KINDS, PREFIX
from tests.h2.strategies import EchoProcessor, Reader, handshake, ping


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """Every sample of a real exposition, keyed by (sample name, sorted labels)."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def request() -> pb.ProcessingRequest:
    r = pb.ProcessingRequest()
    r.request_headers.headers.headers.add(key=":path", raw_value=b"/v2/models/m/infer")
    return r


def test_every_counter_has_a_metric():
    assert {f.name for f in dataclasses.fields(H2Counters)} == COUNTER_HELP.keys() | FLOOD_KINDS.keys()


def test_scrape_reads_live_counters_and_gauges():
    sock_dir = tempfile.mkdtemp(prefix="h2m")

    async def main():
        server = await serve_fast(EchoProcessor, uds=os.path.join(sock_dir, "m.sock"))
        registry = CollectorRegistry()
        register_h2_metrics(server, registry)
        before = scrape(registry)
        assert before[(PREFIX + "streams_total", ())] == 0
        assert before[(PREFIX + "open_connections", ())] == 0
        try:
            async with grpc.aio.insecure_channel("unix:" + server.address) as channel:
                stub = pbg.ExternalProcessorStub(channel)
                for _ in range(3):
                    assert len([r async for r in stub.Process(iter([request(), request()]))]) == 2
                held = stub.Process()
                await held.write(request())
                await held.read()  # a stream open at scrape time
                samples = scrape(registry)
                await held.done_writing()
                assert await held.code() == grpc.StatusCode.OK
        finally:
            await server.drain(timeout=2.0)
        assert samples[(PREFIX + "connections_total", ())] == 1
        assert samples[(PREFIX + "streams_total", ())] == 4
        assert samples[(PREFIX + "messages_total", ())] == 7
        assert samples[(PREFIX + "open_connections", ())] == 1
        assert samples[(PREFIX + "open_streams", ())] == 1
        for name in COUNTER_HELP:
            assert (PREFIX + name + "_total", ()) in samples, name
        for kind in FLOOD_KINDS.values():
            assert samples[(PREFIX + "floods_total", (("kind", kind),))] == 0
        after = scrape(registry)  # the server is gone; its totals stay readable
        assert after[(PREFIX + "open_connections", ())] == 0
        assert after[(PREFIX + "streams_total", ())] == 4

    try:
        uvloop.run(main())
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_a_flood_shows_up_by_kind_at_the_next_scrape():
    async def main():
        server = await serve_fast(EchoProcessor, host="127.0.0.1", port=0)
        registry = CollectorRegistry()
        register_h2_metrics(server, registry)
        # One connection of this server's, driven in memory: a PING flood.
        conn = H2Connection(EchoProcessor, H2Limits(max_pings=3), server.counters)
        reader = Reader()
        reader.feed(conn.initiate())
        reader.feed(conn.receive(handshake() + ping() * 4))
        assert reader.goaway_code == 0xB
        samples = scrape(registry)
        await server.drain(timeout=1.0)
        assert samples[(PREFIX + "floods_total", (("kind", "ping"),))] == 1
        assert samples[(PREFIX + "floods_total", (("kind", "reset"),))] == 0
        assert samples[(PREFIX + "connection_errors_total", ())] == 1

    uvloop.run(main())


def test_default_registry_and_unregister():
    async def main():
        server = await serve_fast(EchoProcessor, host="127.0.0.1", port=0)
        collector = register_h2_metrics(server)
        try:
            assert REGISTRY.get_sample_value(PREFIX + "connections_total") == 0
            with pytest.raises(ValueError):  # one server per registry: names would clash
                register_h2_metrics(server)
        finally:
            REGISTRY.unregister(collector)
            await server.drain(timeout=1.0)
        assert REGISTRY.get_sample_value(PREFIX + "connections_total") is None

    uvloop.run(main())
