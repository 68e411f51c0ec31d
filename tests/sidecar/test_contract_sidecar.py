"""The data contract in a running sidecar (real onnxruntime): 422 in enforce mode, served and counted in observe
mode, counts on /metrics, and quality reports (sketches, never values) arriving at a controller endpoint."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiohttp import web

from cohortgate.core.contract import QUALITY_REPORTS_PATH
from cohortgate.core.sketch import QualityReport
from sidecar.report import HttpSink, MemorySink
from sidecar.server import SIDECAR, SidecarConfig, build_app

ROWS = np.random.default_rng(0).uniform(10, 20, size=(6, 30)).astype(np.float32)
TIMEOUT_S = 30  # generous: a busy 2-core CI box


def contract_doc(mode: str) -> dict:
    """Every column of `input` within [0, 100]; column 0 is an int in [5, 30]; outputs: the label is 0 or 1."""
    inputs = [{"name": "radius", "tensor": "input", "column": 0, "type": "int", "min": 5, "max": 30}]
    inputs += [{"name": f"f{j}", "tensor": "input", "column": j, "min": 0, "max": 100} for j in range(1, 30)]
    outputs = [
        {"name": "label", "tensor": "label", "type": "category", "allowed": [0, 1]},
        {"name": "p1", "tensor": "probabilities", "column": 1, "min": 0, "max": 1},
    ]
    return {"mode": mode, "inputs": inputs, "outputs": outputs}


def body(rows: np.ndarray) -> bytes:
    return orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}]}
    )


def binary(rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The binary tensor extension: the only way to send a NaN (JSON has none)."""
    raw = rows.astype("<f4").tobytes()
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(rows.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    )
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def violations(feature: str, rule: str, count: float) -> str:
    labels = f'feature="{feature}",model="tabular-control",rule="{rule}",side="input"'
    return f"cohortgate_sidecar_contract_violations_total{{{labels}}} {count}"


def clean() -> np.ndarray:
    x = ROWS.copy()
    x[:, 0] = np.round(x[:, 0])
    return x


@pytest.fixture
def contract_file(tmp_path: Path):
    def write(mode: str) -> str:
        path = tmp_path / f"{mode}.contract.json"
        path.write_text(json.dumps(contract_doc(mode)))
        return str(path)

    return write


async def metrics_text(client) -> str:
    return await (await client.get("/metrics")).text()


async def test_enforce_answers_422_naming_the_feature_and_serves_clean_requests(make_client, contract_file) -> None:
    client = await make_client(contract=contract_file("enforce"))
    ok = await client.post("/v2/models/tabular-control/infer", data=body(clean()))
    assert ok.status == 200
    bad = clean()
    bad[2, 7] = 1e6  # f7 out of range
    bad[3, 0] = 12.5  # radius not a whole number
    refused = await client.post("/v2/models/tabular-control/infer", data=body(bad))
    assert refused.status == 422
    doc = await refused.json()
    assert doc["code"] == "contract_violation"
    assert (doc["feature"], doc["rule"]) == ("radius", "type")  # the first feature in contract order
    assert "feature 'radius'" in doc["error"] and "1 row(s)" in doc["error"]
    assert "1000000" not in doc["error"]  # the sentence names the rule, never echoes the value
    text = await metrics_text(client)
    assert violations("radius", "type", 1.0) in text
    assert violations("f7", "range", 1.0) in text
    assert 'cohortgate_sidecar_contract_rejected_total{model="tabular-control"} 1.0' in text


async def test_enforce_checks_each_batch_and_refuses_only_the_bad_requests_in_it(make_client, contract_file) -> None:
    """Enforce mode checks a whole batch at once (the batcher's screen); a batch holding a bad request
    must still serve its neighbours, refuse that one alone, and count it once."""
    client = await make_client(contract=contract_file("enforce"), max_batch_size=64)
    sidecar = client.server.app[SIDECAR]
    assert sidecar.quality.screened and sidecar.batcher.screen == sidecar.quality.screen
    bad = clean()[:1].copy()
    bad[0, 5] = -1.0  # f5 below its range
    rows = [clean()[i % 6 : i % 6 + 1] for i in range(24)]
    rows[7], rows[19] = bad, bad
    answers = await asyncio.gather(*(client.post("/v2/models/tabular-control/infer", data=body(r)) for r in rows))
    statuses = [a.status for a in answers]
    assert statuses == [422 if i in (7, 19) else 200 for i in range(24)]
    for i in (7, 19):
        doc = await answers[i].json()
        assert (doc["code"], doc["feature"], doc["rule"]) == ("contract_violation", "f5", "range")
    served = [await answers[i].json() for i in (0, 8, 20)]
    alone = [
        await (await client.post("/v2/models/tabular-control/infer", data=body(rows[i]))).json() for i in (0, 8, 20)
    ]
    assert [d["outputs"] for d in served] == [d["outputs"] for d in alone]  # neighbours answered as if alone
    text = await metrics_text(client)
    assert violations("f5", "range", 2.0) in text
    assert 'cohortgate_sidecar_contract_rejected_total{model="tabular-control"} 2.0' in text


async def test_observe_serves_and_counts(make_client, contract_file) -> None:
    client = await make_client(contract=contract_file("observe"))
    bad = clean()
    bad[:, 5] = np.nan  # f5 is not nullable
    data, headers = binary(bad)
    served = await client.post("/v2/models/tabular-control/infer", data=data, headers=headers)
    assert served.status == 200  # the model answers what it answers; the contract only counts
    text = await metrics_text(client)
    assert violations("f5", "null", 6.0) in text
    assert 'cohortgate_sidecar_contract_rejected_total{model="tabular-control"} 0.0' in text


async def test_the_mode_flag_overrides_the_contract(make_client, contract_file) -> None:
    client = await make_client(contract=contract_file("observe"), contract_mode="enforce")
    bad = clean()
    bad[0, 0] = 99
    assert (await client.post("/v2/models/tabular-control/infer", data=body(bad))).status == 422


async def test_contract_beside_the_model_is_found(aiohttp_client, models: Path, tmp_path: Path) -> None:
    model = tmp_path / "scored.onnx"
    model.write_bytes((models / "tabular-control.onnx").read_bytes())
    (tmp_path / "scored.contract.json").write_text(json.dumps(contract_doc("enforce")))
    app = build_app(SidecarConfig(model_path=str(model), intra_op_threads=1))
    client = await aiohttp_client(app)
    await app[SIDECAR].wait_ready()
    bad = clean()
    bad[1, 3] = -1.0
    refused = await client.post("/v2/models/scored/infer", data=body(bad))
    assert refused.status == 422 and (await refused.json())["feature"] == "f3"


async def test_a_bad_contract_keeps_the_sidecar_unready_and_says_why(make_client, tmp_path: Path) -> None:
    path = tmp_path / "bad.contract.json"
    path.write_text(json.dumps({"inputs": [{"name": "x", "tensor": "nope", "column": 0}]}))
    with pytest.raises(Exception, match="names input 'nope'"):
        await make_client(contract=str(path))


async def test_quality_reports_reach_a_controller_endpoint(aiohttp_server, make_client, contract_file) -> None:
    """A stand-in controller (aiohttp) at QUALITY_REPORTS_PATH gets windows of sketches and counts, never values."""
    received: list[dict] = []
    authorized: list[str | None] = []
    arrived = asyncio.Event()

    async def quality(request: web.Request) -> web.Response:
        received.append(await request.json())
        authorized.append(request.headers.get("Authorization"))
        arrived.set()
        return web.json_response({"accepted": 1}, status=202)

    async def shadow(request: web.Request) -> web.Response:
        return web.json_response({"accepted": 1}, status=202)

    controller = web.Application()
    controller.router.add_post(QUALITY_REPORTS_PATH, quality)
    controller.router.add_post("/reports", shadow)
    server = await aiohttp_server(controller)
    token = contract_file("observe") + ".token"
    Path(token).write_text("s3cret\n")
    sink = HttpSink(f"http://127.0.0.1:{server.port}/reports", token_file=token)
    client = await make_client(
        contract=contract_file("observe"),
        report_sink=sink,
        variant="canary",
        route="scoring",
        quality_interval_s=0.2,
    )
    bad = clean()
    bad[0, 9] = 500.0  # f9 above its range: served (observe) and counted
    for rows in (clean(), bad, clean()[:1]):
        assert (await client.post("/v2/models/tabular-control/infer", data=body(rows))).status == 200
    await asyncio.wait_for(arrived.wait(), TIMEOUT_S)
    report = QualityReport.from_json(received[0])
    for doc in received[1:]:
        report = report.merge(QualityReport.from_json(doc))
    assert (report.model, report.variant, report.route) == ("tabular-control", "canary", "scoring")
    assert report.requests == 3 and report.rows == 13
    assert report.violations == {"f9": {"range": 1}}
    assert report.inputs["f9"].above == 1 and report.inputs["f9"].total == 13
    assert report.inputs["radius"].total == 13
    assert report.outputs["label"].total == 13  # the predictions' sketch: what prediction drift is computed from
    assert report.window_end > report.window_start
    assert authorized[0] == "Bearer s3cret"
    assert "500.0" not in json.dumps(received)  # sketches only: no raw value leaves the sidecar
    text = await metrics_text(client)
    assert 'cohortgate_sidecar_quality_reports_total{model="tabular-control",outcome="sent"}' in text


async def test_a_live_swap_sends_the_old_models_window_whole(make_client, contract_file, models: Path) -> None:
    sink = MemorySink()
    client = await make_client(
        contract=contract_file("observe"), report_sink=sink, variant="v", quality_interval_s=3600
    )
    sidecar = client.server.app[SIDECAR]
    for _ in range(2):
        assert (await client.post("/v2/models/tabular-control/infer", data=body(clean()))).status == 200
    assert await sidecar.swap(str(models / "tabular-canary.onnx"))
    await sidecar.quality_reporter.send_now()
    assert [r.requests for r in sink.quality][:1] == [2]  # the old model's window, before any new request


async def test_a_store_version_carries_its_contract_in_the_signed_manifest(
    aiohttp_client, models: Path, tmp_path: Path, contract_file
) -> None:
    from sidecar import repository
    from sidecar.errors import ArtifactRefused

    store = repository.open_store(str(tmp_path / "store"))
    model = (models / "tabular-control.onnx").read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mode": "strict"}))
    with pytest.raises(ArtifactRefused, match="mode"):  # refused before anything is written
        repository.push(store, "scoring", "1", model, data_contract=repository.data_contract_from(str(bad)))
    info = repository.push(
        store, "scoring", "1", model, data_contract=repository.data_contract_from(contract_file("enforce"))
    )
    app = build_app(SidecarConfig(model_path=info.reference, intra_op_threads=1))
    client = await aiohttp_client(app)
    await app[SIDECAR].wait_ready()
    x = clean()
    x[0, 12] = -3.0
    refused = await client.post("/v2/models/scoring/infer", data=body(x))
    assert refused.status == 422 and (await refused.json())["feature"] == "f12"
