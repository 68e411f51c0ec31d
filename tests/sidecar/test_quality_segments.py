"""Per-segment positive counts (issue 20): the sidecar counts, per ``segment=value`` of the gateway's
``x-cohortgate-segment`` label, the rows it served and those it predicted positive, and reports them
with its quality window; the controller's four-fifths rule reads them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cohortgate.controller.quality import QualityMonitor
from cohortgate.core.contract import HEADER_SEGMENT
from cohortgate.core.rollout import initial_state
from cohortgate.core.sketch import QualityReport
from sidecar.errors import ModelLoadError
from sidecar.report import MemorySink
from sidecar.server import SIDECAR
from tests.controller.quality_sim import SEGMENTS, quality_policy
from tests.sidecar.test_contract_sidecar import body, contract_doc


def _rows() -> np.ndarray:
    """Real rows of both classes, alternating (the demo models are trained on this data set)."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    a, b = d.data[d.target == 0][:20], d.data[d.target == 1][:20]
    return np.stack([a, b], axis=1).reshape(40, 30).astype(np.float32)


ROWS = _rows()


def write(tmp_path: Path, doc: dict) -> str:
    path = tmp_path / "c.contract.json"
    path.write_text(json.dumps(doc))
    return str(path)


async def serve(make_client, contract: str, sink: MemorySink, labels: list[str]) -> list[int]:
    """One request of 4 rows per label; the sidecar's window, sent now."""
    client = await make_client(contract=contract, report_sink=sink, variant="canary", quality_interval_s=3600)
    for i, label in enumerate(labels):
        headers = {HEADER_SEGMENT: label} if label else {}
        resp = await client.post(
            "/v2/models/tabular-control/infer", data=body(ROWS[4 * i : 4 * i + 4]), headers=headers
        )
        assert resp.status == 200
    await client.server.app[SIDECAR].quality_reporter.send_now()
    return [sum(r.requests for r in sink.quality)]


def expected_labels(models: Path, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(models / "tabular-control.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["label"], {"input": rows})[0]).ravel()


async def test_positive_counts_per_segment_value_match_onnxruntime(make_client, models: Path, tmp_path: Path) -> None:
    """A binary label allowing 0 and 1 has positive class 1 by default; each pair of the label counts."""
    sink = MemorySink()
    labels = ["device=ios;tier=free", "device=android;tier=free", "device=ios;tier=pro", "", "device=android;tier=pro"]
    await serve(make_client, write(tmp_path, contract_doc("observe")), sink, labels)
    report = sink.quality[0]
    for r in sink.quality[1:]:
        report = report.merge(r)
    truth = expected_labels(models, ROWS[:20])
    want: dict[str, dict[str, int]] = {}
    for i, label in enumerate(labels):
        for key in filter(None, label.split(";")):
            cell = want.setdefault(key, {"positive": 0, "total": 0})
            cell["positive"] += int((truth[4 * i : 4 * i + 4] == 1).sum())
            cell["total"] += 4
    assert report.segments == want
    assert 0 < sum(c["positive"] for c in want.values()) < sum(c["total"] for c in want.values())  # both classes
    assert QualityReport.from_json(json.loads(json.dumps(report.to_json()))).segments == want  # the wire form


async def test_a_declared_positive_class_is_counted(make_client, models: Path, tmp_path: Path) -> None:
    doc = contract_doc("observe")
    doc["outputs"][0]["positive"] = 0
    sink = MemorySink()
    await serve(make_client, write(tmp_path, doc), sink, ["device=web"])
    truth = expected_labels(models, ROWS[:4])
    assert sink.quality[0].segments == {"device=web": {"positive": int((truth == 0).sum()), "total": 4}}


async def test_no_positive_class_no_segment_counts(make_client, tmp_path: Path) -> None:
    doc = contract_doc("observe")
    doc["outputs"] = doc["outputs"][1:]  # no label output: nothing says what positive is
    sink = MemorySink()
    await serve(make_client, write(tmp_path, doc), sink, ["device=ios"])
    assert sink.quality[0].segments == {}
    assert "segments" not in sink.quality[0].to_json()  # the older wire shape, unchanged


@pytest.mark.parametrize(
    ("output", "match"),
    [
        ({"name": "label", "tensor": "label", "type": "category", "allowed": [0, 1], "positive": 2}, "allowed"),
        ({"name": "p1", "tensor": "probabilities", "column": 1, "positive": 1}, "category"),
    ],
)
async def test_a_bad_positive_class_is_refused(make_client, tmp_path: Path, output: dict, match: str) -> None:
    doc = contract_doc("observe")
    doc["outputs"] = [output]
    with pytest.raises(ModelLoadError, match=match):
        await make_client(contract=write(tmp_path, doc))


def test_the_controller_reads_the_reports_segments() -> None:
    """The four-fifths rule, fed only by reports' ``segments``: a canary whose android positive rate
    is a quarter of its ios one is rolled back; control's are equal."""
    policy = quality_policy(quality=SEGMENTS)
    route = policy.by_name["tabular"]
    monitor = QualityMonitor(policy)
    rates = {"control": {"ios": 0.5, "android": 0.5}, "canary": {"ios": 0.6, "android": 0.15}}
    for t in range(5):
        for variant, per in rates.items():
            segments = {f"device={d}": {"positive": int(400 * p), "total": 400} for d, p in per.items()}
            doc = QualityReport("tabular", variant, t, t + 1, route="tabular", segments=segments).to_json()
            assert monitor.add_report(QualityReport.from_json(doc))
    verdicts = monitor.verdicts(route, initial_state(route), None, 5.0)
    assert [v.variant for v in verdicts] == ["canary"]
    assert verdicts[0].evidence["quality"]["signal"] == "disparate_impact"
    assert verdicts[0].evidence["quality"]["low"] == "android"


def test_malformed_segment_counts_are_refused() -> None:
    doc = QualityReport("tabular", "canary", 0, 1).to_json()
    with pytest.raises(ValueError, match="positive"):
        QualityReport.from_json({**doc, "segments": {"device=ios": {"positive": 5, "total": 4}}})
    with pytest.raises(ValueError, match="malformed"):
        QualityReport.from_json({**doc, "segments": {"device=ios": 3}})
