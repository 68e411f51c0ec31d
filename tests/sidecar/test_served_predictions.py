"""``--report-predictions``: the sidecar's reports carry what it served (never the input), opt-in."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort

from sidecar.prediction import served_prediction
from sidecar.report import MemorySink, ShadowReport
from tests.sidecar.test_sidecar_server import features, infer_json


async def reports(sink: MemorySink, n: int) -> list[ShadowReport]:
    for _ in range(200):
        if len(sink.reports) >= n:
            break
        await asyncio.sleep(0.01)
    return sink.reports


async def test_a_one_row_answer_reports_its_top_class_and_probabilities(make_client, models) -> None:
    sink = MemorySink()
    client = await make_client(name="tabular", variant="canary", report_sink=sink, report_predictions=True)
    x = features(3)
    for i in range(3):
        resp = await client.post(
            "/v2/models/tabular/infer", json=infer_json(x[i : i + 1]), headers={"x-request-id": f"r{i}"}
        )
        assert resp.status == 200
    resp = await client.post("/v2/models/tabular/infer", json=infer_json(x[:2]), headers={"x-request-id": "two-rows"})
    assert resp.status == 200
    got = {r.request_id: r for r in await reports(sink, 4)}
    session = ort.InferenceSession(str(models / "tabular-control.onnx"), providers=["CPUExecutionProvider"])
    labels, probs = session.run(["label", "probabilities"], {"input": x})
    for i in range(3):
        p = got[f"r{i}"].prediction
        assert p is not None and p["top"] == str(int(labels[i]))  # what onnxruntime answers on its own
        assert p["p"] == {str(k): round(float(v), 6) for k, v in enumerate(probs[i])}
        assert got[f"r{i}"].to_json()["prediction"] == p
        assert set(p) == {"top", "p"}  # nothing of the input
    assert got["two-rows"].prediction is None  # one request id, two predictions: no label could join one


async def test_predictions_are_off_unless_asked(make_client) -> None:
    sink = MemorySink()
    client = await make_client(name="tabular", variant="control", report_sink=sink)
    resp = await client.post("/v2/models/tabular/infer", json=infer_json(features(1)), headers={"x-request-id": "a"})
    assert resp.status == 200
    (report,) = await reports(sink, 1)
    assert report.prediction is None and "prediction" not in report.to_json() and "prediction" not in report.to_fields()


def test_the_prediction_survives_a_redis_stream_entry() -> None:
    r = ShadowReport("id", "v", "m", 200, 1.0, "d", (), 1.0, prediction={"top": "1", "p": {"0": 0.2, "1": 0.8}})
    assert ShadowReport.from_fields(r.to_fields()) == r


def test_outputs_read_by_name_and_shape() -> None:
    f32 = np.float32
    assert served_prediction(["label"], [np.array([2])]) == {"top": "2"}
    assert served_prediction(["probabilities"], [np.array([[0.1, 0.7, 0.2]], f32)])["top"] == "1"
    assert served_prediction(["score"], [np.array([[3.5]], f32)]) == {"value": 3.5}  # a regressor
    assert served_prediction(["score"], [np.array([[1.0, 2.0]], f32)]) is None  # an embedding: not a prediction
    assert served_prediction(["a", "b"], [np.array([1.0]), np.array([2.0])]) is None  # cannot tell which
    assert served_prediction(["score"], [np.array([np.nan], f32)]) is None
