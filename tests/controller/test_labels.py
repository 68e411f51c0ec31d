"""Model accuracy from late labels (controller/labels.py): served predictions joined with labels.

The figures agree with scikit-learn's metrics on the same data; the join is by request id or by the
exposure token (whose exposure id is the request id's hash); through the API, a sidecar's report
with ``prediction`` and a label posted later give accuracy per variant in ``GET /outcomes``."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, mean_absolute_error, root_mean_squared_error
from statsmodels.stats.proportion import proportion_confint

from cohortgate.controller.api import make_app
from cohortgate.controller.labels import LabelBook
from cohortgate.controller.loop import Controller, ControllerConfig
from cohortgate.controller.outcomes import OutcomeLedger
from cohortgate.core.exposure import exposure_id, mac_key, mint
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState
from tests.controller.test_outcomes_api import AUTH, KEY, TOKEN, policy


def classifier_data(n: int, accuracy: float, seed: int):
    """Binary labels and a model right ``accuracy`` of the time, with calibrated-ish probabilities."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    right = rng.random(n) < accuracy
    top = np.where(right, y, 1 - y)
    p_top = rng.uniform(0.55, 0.99, n)
    p1 = np.where(top == 1, p_top, 1 - p_top)
    return y, top, p1


def feed(book: LabelBook, variant: str, y, top, p1, t: float = 1000.0) -> None:
    for i in range(len(y)):
        rid = f"{variant}-{i}"
        pred = {"top": str(int(top[i])), "p": {"0": float(1 - p1[i]), "1": float(p1[i])}}
        rec = {"request_id": rid, "route": "shop", "variant": variant, "prediction": pred, "t": t}
        assert book.predict(rec) == "accepted"
        assert book.label({"request_id": rid, "value": float(y[i])}, t + 60, (), 3600.0) == "accepted"


def test_accuracy_and_log_loss_agree_with_scikit_learn_and_the_difference_has_an_interval():
    book = LabelBook()
    data = {"control": classifier_data(4000, 0.80, 1), "canary": classifier_data(4000, 0.86, 2)}
    for variant, (y, top, p1) in data.items():
        feed(book, variant, y, top, p1)
    control, canary = book.results("shop", "control")
    assert (control["variant"], canary["variant"]) == ("control", "canary")
    for row in (control, canary):
        y, top, p1 = data[row["variant"]]
        assert row["labels"] == 4000
        assert row["accuracy"]["value"] == pytest.approx(accuracy_score(y, top), abs=1e-8)
        lo, hi = proportion_confint(int((y == top).sum()), 4000, method="wilson")
        assert row["accuracy"]["interval"] == pytest.approx([lo, hi], abs=1e-8)
        assert row["log_loss"]["value"] == pytest.approx(log_loss(y, p1), rel=1e-6)
    diff = canary["vs_control"]["accuracy"]
    assert diff["value"] == pytest.approx(canary["accuracy"]["value"] - control["accuracy"]["value"], abs=1e-8)
    assert diff["interval"][0] > 0  # 6 points over 4 000 labels each: clearly better
    assert "vs_control" not in control


def test_mae_and_rmse_for_a_regressor_agree_with_scikit_learn():
    rng = np.random.default_rng(5)
    y = rng.normal(10, 3, 2000)
    yhat = y + rng.normal(0.5, 1.0, 2000)
    book = LabelBook()
    for i in range(2000):
        rec = {"request_id": f"r{i}", "route": "shop", "variant": "control", "prediction": {"value": yhat[i]}, "t": 0}
        book.predict(rec)
        book.label({"request_id": f"r{i}", "value": y[i]}, 1.0, (), 10.0)
    (row,) = book.results("shop", "control")
    assert row["mae"]["value"] == pytest.approx(mean_absolute_error(y, yhat), abs=1e-8)
    assert row["rmse"] == pytest.approx(root_mean_squared_error(y, yhat), rel=1e-6)
    assert "accuracy" not in row


def test_each_label_counts_once_and_needs_its_prediction_within_the_window():
    book = LabelBook()
    pred = {"request_id": "r1", "route": "shop", "variant": "control", "prediction": {"top": "1"}, "t": 100.0}
    assert book.predict(pred) == "accepted" and book.predict(pred) == "duplicate"
    assert book.label({"request_id": "nope", "value": 1}, 101.0, (), 50.0) == "unknown_request"
    assert book.label({"request_id": "r1", "value": 1}, 200.0, (), 50.0) == "expired"
    assert book.label({"request_id": "r1", "value": 1}, 120.0, (), 50.0) == "accepted"
    assert book.label({"request_id": "r1", "value": 0}, 121.0, (), 50.0) == "duplicate"
    assert book.results("shop")[0]["accuracy"]["value"] == 1.0
    assert book.pending() == 0


def test_a_label_by_exposure_token_meets_the_prediction_of_its_request():
    ledger = OutcomeLedger({}, {"shop": "control"}, keys=(KEY,))
    now = time.time()
    assert ledger.ingest({"kind": "prediction", "request_id": "req-9", "route": "shop", "variant": "canary",
                          "prediction": {"top": "0", "p": {"0": 0.9, "1": 0.1}}, "t": now}) == "accepted"  # fmt: skip
    token = mint(KEY, "shop", "canary", "unit-1", now, eid=exposure_id("req-9"))
    assert ledger.ingest({"kind": "outcome", "metric": "label", "value": 1, "exposure": token, "t": now}) == "accepted"
    forged = mint(mac_key(b"not-the-controllers-key-000"), "shop", "canary", "unit-1", now, eid=exposure_id("req-9"))
    assert ledger.ingest({"kind": "outcome", "metric": "label", "value": 1, "exposure": forged, "t": now}) == "forged"
    (row,) = ledger.labels.results("shop", "control")
    assert row["accuracy"]["value"] == 0.0 and row["log_loss"]["value"] == pytest.approx(-np.log(0.1))
    assert ledger.ingest({"kind": "prediction", "request_id": "x", "route": "shop", "variant": "v",
                          "prediction": {"top": "1", "p": {"1": 7}}, "t": now}) == "bad_record"  # fmt: skip


def test_the_oldest_predictions_make_room_and_are_counted():
    book = LabelBook(max_predictions=3)
    for i in range(5):
        book.predict({"request_id": f"r{i}", "route": "s", "variant": "v", "prediction": {"value": 1}, "t": 0})
    assert book.pending() == 3 and book.counts["predictions_evicted"] == 2
    assert book.label({"request_id": "r0", "value": 1}, 0, (), 10) == "unknown_request"


async def test_sidecar_reports_and_later_labels_give_accuracy_in_get_outcomes(aiohttp_client, monkeypatch):
    monkeypatch.setenv("COHORTGATE_EXPOSURE_KEY", "outcomes-test-key-0123456789")
    sink = InProcessSink()
    await sink.start()
    controller = Controller(policy(), InProcessState(), sink, config=ControllerConfig(interval_s=3600))
    await controller.start()
    api = await aiohttp_client(make_app(controller, TOKEN, sink))
    reports = [  # as sidecar.report.ShadowReport.to_json() sends them with --report-predictions
        {"request_id": f"req-{variant}-{i}", "variant": variant, "model": "shop", "status": 200, "latency_ms": 2.0,
         "digest": "d", "output_digests": {}, "ts": time.time(), "prediction": {"top": str(i % 2)}}
        for i in range(40) for variant in ("control", "canary")
    ]  # fmt: skip
    resp = await api.post("/reports", json=reports, headers=AUTH)
    assert resp.status == 202
    labels = [  # later, for control's requests only, through the token each response carried
        {
            "exposure": mint(KEY, "shop", "control", f"u{i}", time.time(), eid=exposure_id(f"req-control-{i}")),
            "metric": "label",
            "value": i % 2,
        }
        for i in range(40)
    ]
    resp = await api.post("/outcomes", json=labels, headers=AUTH)
    body = await resp.json()
    assert body["counts"] == {"accepted": 40}, body
    doc = await (await api.get("/outcomes?route=shop", headers=AUTH)).json()
    (control,) = doc["labels"]["shop"]  # only control's requests got labels
    assert control["variant"] == "control" and control["labels"] == 40 and control["accuracy"]["value"] == 1.0
    assert doc["predictions_pending"] == 40  # the canary's predictions still wait for theirs
