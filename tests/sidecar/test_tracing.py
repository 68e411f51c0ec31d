"""The sidecar's span: the batcher hands each traced request its queue wait, batch size and compute
time, and the server records one ``cohortgate.infer`` span as the child of the forwarded traceparent.
Spans go to the SDK's in-memory exporter (the OTLP wire is covered by tests/integration)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cohortgate.support.tracing import Tracing
from sidecar.batching import Batcher, BatchTiming
from sidecar.server import SIDECAR
from tests.sidecar.test_sidecar_server import features, infer_json

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def test_the_batcher_fills_the_timing_of_each_request_that_asks() -> None:
    def run(inputs):
        return (inputs[0] * 2,)

    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(run, executor, max_batch_size=8)
        batcher.start()
        a, b = BatchTiming(), BatchTiming()
        # queued before the worker runs: one batch of 3 + 2 rows
        futures = [
            batcher.submit((np.ones((3, 2), np.float32),), 3, a),
            batcher.submit((np.ones((2, 2), np.float32),), 2, b),
            batcher.submit((np.ones((1, 2), np.float32),), 1),  # no timing asked: none kept
        ]
        outputs = await asyncio.gather(*futures)
        await batcher.close()
    assert [o[0].shape[0] for o in outputs] == [3, 2, 1]
    for t in (a, b):
        assert (t.batch_requests, t.batch_rows) == (3, 6)
        assert t.queue_s >= 0 and t.compute_s > 0
    assert BatchTiming() == BatchTiming(0.0, 0.0, 0, 0)  # untouched until a batch ran


@pytest.fixture
def exporter():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    return InMemorySpanExporter()


async def traced_client(make_client, exporter, ratio: float = 0.0):
    client = await make_client(name="tabular", variant="canary")
    sidecar = client.app[SIDECAR]
    assert sidecar.tracing is None  # off by default
    sidecar.tracing = Tracing("sidecar", None, ratio, exporter=exporter)
    return client, sidecar.tracing


async def test_a_sampled_request_is_one_child_span_with_batch_facts(make_client, exporter) -> None:
    client, tracing = await traced_client(make_client, exporter)
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-01", "authorization": "Bearer secret-token"}
    response = await client.post("/v2/models/tabular/infer", json=infer_json(features(4)), headers=headers)
    assert response.status == 200
    tracing.provider.force_flush()
    (span,) = exporter.get_finished_spans()
    assert span.name == "cohortgate.infer"
    assert format(span.context.trace_id, "032x") == TRACE
    assert format(span.parent.span_id, "016x") == PARENT
    attrs = dict(span.attributes)
    assert attrs["cohortgate.model"] == "tabular" and attrs["cohortgate.variant"] == "canary"
    assert attrs["http.response.status_code"] == 200 and attrs["cohortgate.rows"] == 4
    assert attrs["cohortgate.batch_rows"] >= 4 and attrs["cohortgate.batch_requests"] >= 1
    assert attrs["cohortgate.queue_wait_s"] >= 0 and attrs["cohortgate.inference_s"] > 0
    assert span.end_time > span.start_time
    assert "secret-token" not in repr(attrs) and "secret-token" not in repr(span.resource.attributes)
    assert span.resource.attributes["service.name"] == "cohortgate-sidecar"


async def test_unsampled_and_parentless_requests_record_nothing(make_client, exporter) -> None:
    client, tracing = await traced_client(make_client, exporter, ratio=0.0)
    body = infer_json(features(1))
    for headers in ({"traceparent": f"00-{TRACE}-{PARENT}-00"}, {}):
        response = await client.post("/v2/models/tabular/infer", json=body, headers=headers)
        assert response.status == 200
    tracing.provider.force_flush()
    assert exporter.get_finished_spans() == ()


async def test_a_failed_request_is_traced_with_its_status(make_client, exporter) -> None:
    client, tracing = await traced_client(make_client, exporter, ratio=1.0)
    response = await client.post("/v2/models/tabular/infer", json={"inputs": []})
    assert response.status == 400
    tracing.provider.force_flush()
    (span,) = exporter.get_finished_spans()
    assert span.attributes["http.response.status_code"] == 400
    assert "cohortgate.batch_rows" not in span.attributes  # it never reached a batch


def test_tracing_off_never_imports_opentelemetry(control_model) -> None:
    code = (
        "import sys; from sidecar.server import SidecarConfig, Sidecar; "
        f"s = Sidecar(SidecarConfig(model_path={control_model!r})); "
        "assert s.tracing is None; "
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_cli_passes_the_flags(control_model) -> None:
    import argparse

    from sidecar.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["sidecar", "--model", control_model, "--otlp-endpoint", "http://127.0.0.1:4318", "--trace-sample", "0.5"]
    )
    assert (args.otlp_endpoint, args.trace_sample) == ("http://127.0.0.1:4318", 0.5)
