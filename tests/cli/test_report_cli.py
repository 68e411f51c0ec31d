"""`cohortgate report ROUTE`: from the running controller API (a real aiohttp server on loopback),
offline from a journal, and from the archive the controller writes when an experiment finishes."""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from cohortgate.cli import main
from cohortgate.controller.api import make_app
from cohortgate.controller.loop import Controller, ControllerConfig
from cohortgate.controller.outcomes import append_journal
from cohortgate.controller.outcomes_api import SERVICE_KEY
from cohortgate.core.policy import parse_policy
from cohortgate.store.events import InProcessSink
from cohortgate.store.state import InProcessState

TOKEN = "report-test-token"
POLICY = """\
version: 1
jwt: {issuer: https://auth.test, audience: test, jwks: jwks.json}
routes:
  - name: shop
    match: {path_prefix: /v2/models/shop}
    variants:
      - {name: control, weight: 50, backends: [{url: "http://127.0.0.1:9", region: eu}]}
      - {name: canary, weight: 50, backends: [{url: "http://127.0.0.1:9", region: eu}]}
    metrics:
      - {name: conversion, kind: binary, role: primary, planned_units: 2000}
    experiment:
      {hypothesis: the canary converts better, owner: team-shop, primary_metric: conversion, start: 2026-11-30}
"""


def records(n: int = 800, p0: float = 0.10, p1: float = 0.18, seed: int = 3) -> list[dict]:
    """Exposures and conversions by request id, as the access-log feed and an import give them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        for variant, rate in (("control", p0), ("canary", p1)):
            rid = f"{variant}-{i}"
            t = 1_700_000_000.0 + i
            out.append({"kind": "exposure", "route": "shop", "variant": variant, "unit": f"u-{rid}", "t": t,
                        "request_id": rid})  # fmt: skip
            if rng.random() < rate:
                out.append({"kind": "outcome", "metric": "conversion", "value": 1, "request_id": rid, "t": t + 1})
    return out


def cli(*argv: str) -> int:
    return main(list(argv))


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
async def live(aiohttp_server, tmp_path, policy_file):
    """A controller API on 127.0.0.1 with outcomes in its ledger and three samples of history."""
    sink = InProcessSink()
    await sink.start()
    # a long interval: the API's own sampler never runs during the test, the test samples by hand
    controller = Controller(
        parse_policy(policy_file.read_text(), filename=str(policy_file), base_dir=tmp_path),
        InProcessState(),
        sink,
        config=ControllerConfig(interval_s=3600),
    )
    await controller.start()
    app = make_app(controller, TOKEN, sink)
    server = await aiohttp_server(app, host="127.0.0.1")
    service = app[SERVICE_KEY]
    recs = records()
    for k, chunk in enumerate(np.array_split(np.arange(len(recs)), 3)):
        for i in chunk:
            service.ledger.ingest(recs[i])
        service.sample(now=1_700_000_000.0 + 300 * k)
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    return str(server.make_url("")).rstrip("/"), token_file, service, controller


async def test_get_outcomes_adds_the_design_and_the_lift_history(live):
    from cohortgate.support import http

    api, _, _, _ = live
    reply = await asyncio.to_thread(
        http.call, api + "/outcomes?route=shop", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    doc = reply.json()
    assert set(doc) >= {"results", "counts", "window_s", "design", "history"}  # the old fields kept
    assert doc["design"]["shop"]["experiment"]["primary_metric"] == "conversion"
    assert [v["name"] for v in doc["design"]["shop"]["variants"]] == ["control", "canary"]
    (series,) = doc["history"]["shop"]
    assert series["metric"] == "conversion" and len(series["points"]) == 3
    _, rel, av_lo, av_hi, fh_lo, fh_hi, n1, n0 = series["points"][-1]
    assert av_lo <= fh_lo <= rel <= fh_hi <= av_hi and (n1, n0) == (800, 800)


async def test_report_from_the_running_controller_in_every_format(live, tmp_path, capsys):
    api, token_file, _, _ = live
    flags = ("--api", api, "--token-file", str(token_file))
    assert await asyncio.to_thread(cli, "report", "shop", "--format", "json", *flags) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == f"controller {api}"
    assert doc["experiment"]["owner"] == "team-shop"
    assert doc["traffic"]["units"] == {"control": 800, "canary": 800}
    (conv,) = doc["results"]
    assert conv["metric"] == "conversion" and conv["verdict"] == "win"
    (series,) = doc["history"]
    assert [p[0] for p in series["points"]] == [1_700_000_000.0, 1_700_000_300.0, 1_700_000_600.0]
    assert doc["decisions"][0]["text"].startswith("canary: running; primary conversion win")

    out = tmp_path / "out" / "shop.md"
    assert await asyncio.to_thread(cli, "report", "shop", "--out", str(out), *flags) == 0
    text = out.read_text()
    assert "# Experiment report: route shop" in text and "**Hypothesis:** the canary converts better" in text
    for svg in ("shop-intervals.svg", "shop-lift-conversion-canary.svg"):
        assert f"]({svg})" in text
        assert ET.parse(out.parent / svg).getroot().tag.endswith("svg")

    assert await asyncio.to_thread(cli, "report", "shop", "--format", "html", *flags) == 0
    assert capsys.readouterr().out.count("<svg ") == 2
    assert await asyncio.to_thread(cli, "report", "shop", "--format", "csv", *flags) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("shop,conversion,primary,canary,control,800,800,")


async def test_a_finished_experiment_is_archived_once_and_reported_from_the_archive(live, tmp_path, capsys):
    api, _, service, _ = live
    archive = tmp_path / "experiments"
    service.archive_dir = archive
    service.sample(now=1_700_001_000.0)
    assert not archive.exists()  # still running: nothing archived
    from cohortgate.support import http

    # the rollback goes through the API, as `cohortgate rollback` sends it

    reply = await asyncio.to_thread(
        http.call,
        api + "/actions/rollback",
        "POST",
        body={"route": "shop", "variant": "canary"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert reply.status == 200, reply.body
    service.sample(now=1_700_001_060.0)
    service.sample(now=1_700_001_120.0)
    (path,) = list((archive / "shop").iterdir())  # archived once, not at every sample
    assert (
        await asyncio.to_thread(cli, "report", "shop", "--archived", "--archive-dir", str(archive), "--format", "json")
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["state"]["finished"] and doc["state"]["variants"]["canary"]["phase"] == "rolled_back"
    assert doc["source"] == "controller archive" and doc["experiment"]["hypothesis"] == "the canary converts better"
    assert (
        await asyncio.to_thread(
            cli, "report", "shop", "--archived", path.stem, "--archive-dir", str(archive), "--format", "md"
        )
        == 0
    )
    assert "canary: rolled_back; primary conversion win" in capsys.readouterr().out
    assert await asyncio.to_thread(cli, "report", "shop", "--archived", "123", "--archive-dir", str(archive)) == 2
    assert f"no experiment on route 'shop' finished at 123 (archived: {path.stem})" in capsys.readouterr().err


def test_report_offline_from_a_journal(tmp_path, policy_file, capsys):
    journal = tmp_path / "outcomes.jsonl"
    append_journal(journal, records())
    assert cli("report", "shop", "--journal", str(journal), "--policy", str(policy_file), "--format", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["traffic"]["units"] == {"control": 800, "canary": 800}
    assert doc["results"][0]["verdict"] == "win"
    points = doc["history"][0]["points"]
    assert 50 <= len(points) <= 60  # looked at evenly through the file
    assert [p[0] for p in points] == sorted(p[0] for p in points)
    assert doc["srm"]["checked"] and not doc["srm"]["mismatch"]  # run on the ledger's units: no controller here


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("--journal", "J"), "--journal needs --policy"),
        (("--journal", "J", "--policy", "P"), "has no route 'nope' (routes: shop)"),
        (("--archived", "--archive-dir", "A"), "no archived experiment for route 'nope'"),
    ],
)
def test_mistakes_get_one_sentence_and_status_2(tmp_path, policy_file, capsys, argv, says):
    argv = tuple(
        {"J": str(tmp_path / "j.jsonl"), "P": str(policy_file), "A": str(tmp_path / "none")}.get(a, a) for a in argv
    )
    assert cli("report", "nope", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cohortgate report: ") and says in err and "Traceback" not in err


def test_an_unreachable_controller_is_a_sentence_and_status_1(tmp_path, capsys):
    token_file = tmp_path / "t"
    token_file.write_text("x")
    assert cli("report", "shop", "--api", "http://127.0.0.1:9", "--token-file", str(token_file)) == 1
    assert "cannot reach the controller at http://127.0.0.1:9" in capsys.readouterr().err


def test_labels_imported_later_give_accuracy_per_variant_in_the_report(tmp_path, policy_file, capsys):
    """The sidecar's served predictions (journaled by the controller) meet labels from a CSV import."""
    journal = tmp_path / "outcomes.jsonl"
    preds = [
        {"kind": "prediction", "request_id": f"{v}-{i}", "route": "shop", "variant": v,
         "prediction": {"top": str(i % 2), "p": {"0": 0.3, "1": 0.7} if i % 2 else {"0": 0.7, "1": 0.3}}, "t": 1.0}
        for v in ("control", "canary") for i in range(100)
    ]  # fmt: skip
    append_journal(journal, records(n=100) + preds)
    labels = tmp_path / "labels.csv"
    # control's model is right 70 times in 100, the canary's 90
    rows = [
        f"{v}-{i},label,{(i % 2) if i >= wrong else 1 - i % 2},2.0"
        for v, wrong in (("control", 30), ("canary", 10))
        for i in range(100)
    ]
    labels.write_text("request_id,metric,value,t\n" + "\n".join(rows) + "\n")
    assert cli("outcomes", "import", str(labels), "--journal", str(journal)) == 0
    assert "200 outcomes appended" in capsys.readouterr().out
    assert cli("report", "shop", "--journal", str(journal), "--policy", str(policy_file), "--format", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    control, canary = doc["labels"]
    assert (control["variant"], control["labels"], control["accuracy"]["value"]) == ("control", 100, 0.7)
    assert (canary["variant"], canary["labels"], canary["accuracy"]["value"]) == ("canary", 100, 0.9)
    assert canary["vs_control"]["accuracy"]["value"] == pytest.approx(0.2)
    assert cli("report", "shop", "--journal", str(journal), "--policy", str(policy_file)) == 0
    assert "## Model accuracy from labels" in capsys.readouterr().out
